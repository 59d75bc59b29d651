//! Each kernel's CPU forward (the plain-Rust statement of what the CUDA kernel computes) against
//! the stock-candle composition it replaces, on random inputs: f32 to f32 precision; bf16 within
//! one rounding (the composition rounds the same intermediates, only summation order differs).

mod common;

use candle_core::{D, DType, Device, Result, Tensor};
use common::{
    SingleProjection, differing_bits, max_rel, modulation, norm_weight, q_norm, randn, rel_l2,
    rope_tables, single_projection,
};
use klein_kernels::{
    ChannelAffine, FlashAttention, GateResidual, GateResidualNorm, GroupMoments, GroupNorm,
    GroupNormAffine, JointQkNormRope, LayerNormModulate, QkNormRope, RmsNorm, RopeStyle, SwiGlu,
    reference,
};

/// bf16 keeps 8 significant bits: one rounding is at most 2⁻⁸ relative.
const BF16_ULP: f32 = 1.0 / 256.0;

fn check(name: &str, dtype: DType, got: &Tensor, want: &Tensor) -> Result<()> {
    check_conditioned(name, dtype, got, want, 1.0)
}

/// [`check`] where the composition's own f32 error is `condition` times larger (e.g. a norm of
/// inputs whose mean is many standard deviations from zero).
fn check_conditioned(
    name: &str,
    dtype: DType,
    got: &Tensor,
    want: &Tensor,
    condition: f32,
) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{name}");
    let (rel, max) = (rel_l2(got, want)?, max_rel(got, want)?);
    println!("{name} {dtype:?}: rel-L2 {rel:.2e}, max {max:.2e}");
    let (rel_tol, max_tol) = match dtype {
        DType::F32 => (1e-6 * condition, 1e-5 * condition),
        _ => (BF16_ULP / 4.0, 2.0 * BF16_ULP),
    };
    assert!(
        rel <= rel_tol && max <= max_tol,
        "{name} {dtype:?}: rel-L2 {rel}, max {max}"
    );
    Ok(())
}

#[test]
fn layer_norm_modulate_matches_the_composition() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let x = (randn(&[2, 7, 48], dtype, &dev)? * 3.0)?;
        let m = modulation(2, 48, dtype, &dev)?;
        let op = LayerNormModulate { eps: 1e-6 };
        let got = x.apply_op3_no_bwd(&m[0], &m[1], &op)?;
        let want = reference::layer_norm_modulate(&x, &m[0], &m[1], 1e-6)?;
        check("layer_norm_modulate", dtype, &got, &want)?;
    }
    Ok(())
}

#[test]
fn gate_residual_matches_the_composition() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let (x, y) = (
            randn(&[2, 5, 40], dtype, &dev)?,
            randn(&[2, 5, 40], dtype, &dev)?,
        );
        let m = modulation(2, 40, dtype, &dev)?;
        let got = x.apply_op3_no_bwd(&y, &m[2], &GateResidual)?;
        check(
            "gate_residual",
            dtype,
            &got,
            &reference::gate_residual(&x, &y, &m[2])?,
        )?;
    }
    Ok(())
}

/// The residual and its norm in one op: exactly the two ops one after the other, and the
/// composition within one rounding.
#[test]
fn gate_residual_norm_is_the_residual_then_its_norm() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let (x, y) = (
            (randn(&[2, 5, 40], dtype, &dev)? * 3.0)?,
            randn(&[2, 5, 40], dtype, &dev)?,
        );
        let m = modulation(2, 40, dtype, &dev)?;
        let op = GateResidualNorm {
            eps: 1e-6,
            shift: m[0].clone(),
            scale: m[1].clone(),
        };
        let both = x.apply_op3_no_bwd(&y, &m[2], &op)?;
        assert_eq!(both.dims(), [2, 2, 5, 40]);
        let r = x.apply_op3_no_bwd(&y, &m[2], &GateResidual)?;
        let n = r.apply_op3_no_bwd(&m[0], &m[1], &LayerNormModulate { eps: 1e-6 })?;
        assert_eq!(rel_l2(&both.get(0)?, &r)?, 0.0);
        assert_eq!(rel_l2(&both.get(1)?, &n)?, 0.0);
        let want_r = reference::gate_residual(&x, &y, &m[2])?;
        let want_n = reference::layer_norm_modulate(&want_r, &m[0], &m[1], 1e-6)?;
        check("gate_residual_norm residual", dtype, &both.get(0)?, &want_r)?;
        check("gate_residual_norm norm", dtype, &both.get(1)?, &want_n)?;
        let (pr, pn) = klein_kernels::gate_residual_norm(&x, &y, &m[2], &m[0], &m[1], 1e-6)?;
        assert_eq!((rel_l2(&pr, &want_r)?, rel_l2(&pn, &want_n)?), (0.0, 0.0));
    }
    Ok(())
}

#[test]
fn swiglu_matches_the_composition() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        // A single-block-like projection: [q k v | gate | up] with width 24 (strided rows).
        let p = (randn(&[2, 6, 3 * 16 + 2 * 24], dtype, &dev)? * 2.0)?;
        let (gate, up) = (p.narrow(D::Minus1, 48, 24)?, p.narrow(D::Minus1, 72, 24)?);
        let got = gate.apply_op2_no_bwd(&up, &SwiGlu)?;
        check("swiglu", dtype, &got, &reference::swiglu(&gate, &up)?)?;
        // Two separate projections (Qwen3's gate_proj and up_proj).
        let (gate, up) = (gate.contiguous()?, up.contiguous()?);
        let got = gate.apply_op2_no_bwd(&up, &SwiGlu)?;
        check("swiglu pair", dtype, &got, &reference::swiglu(&gate, &up)?)?;
        // In place, into the last columns of a wider buffer; the first columns stay as they were.
        let joint = Tensor::zeros((2, 6, 10 + 24), dtype, &dev)?;
        joint
            .narrow(D::Minus1, 10, 24)?
            .inplace_op3(&gate, &up, &SwiGlu)?;
        check(
            "swiglu into",
            dtype,
            &joint.narrow(D::Minus1, 10, 24)?,
            &reference::swiglu(&gate, &up)?,
        )?;
        let untouched = joint.narrow(D::Minus1, 0, 10)?.abs()?.sum_all()?;
        assert_eq!(untouched.to_dtype(DType::F32)?.to_scalar::<f32>()?, 0.0);
    }
    Ok(())
}

/// The single block's `[attention | SwiGLU]` in one buffer equals the two concatenated, and the
/// flash op reads heads viewed in place in a projection (strided) as it reads contiguous ones.
#[test]
fn joint_attention_and_swiglu_equal_their_concatenation() -> Result<()> {
    let dev = Device::Cpu;
    let (h, hd) = (2, 16);
    let SingleProjection {
        q, k, v, gate, up, ..
    } = single_projection((1, 9), (h, hd, 16), DType::F32, &dev)?;
    assert!(!q.is_contiguous(), "the heads are strided views");
    let op = FlashAttention::unmasked(hd);
    let strided = q.apply_op3_no_bwd(&k, &v, &op)?;
    let dense = q
        .contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    assert_eq!(rel_l2(&strided, &dense)?, 0.0);
    let joint = klein_kernels::flash_attention_with_swiglu(&q, &k, &v, &gate, &up)?;
    let want = Tensor::cat(
        &[
            klein_kernels::flash_attention(&q, &k, &v)?,
            reference::swiglu(&gate, &up)?,
        ],
        D::Minus1,
    )?;
    assert_eq!(rel_l2(&joint, &want)?, 0.0);
    Ok(())
}

/// The double block's joint queries (text then image rows, each stream's weight, RoPE rows
/// continuing) normalised for the attention equal normalising each stream first; the queries
/// must start at RoPE row 0, and the op refuses q's tail off Hopper.
#[test]
fn attention_with_joint_q_norm_equals_normalising_each_stream_first() -> Result<()> {
    let dev = Device::Cpu;
    let (h, hd, txt, img) = (2, 128, 5, 7);
    let rows = |s: usize| randn(&[1, s, h * hd], DType::F32, &dev);
    let heads = |s: usize| randn(&[1, h, s, hd], DType::F32, &dev);
    let (q_txt, q_img) = (rows(txt)?, rows(img)?);
    let (k, v_txt, v_img) = (heads(txt + img)?, heads(txt)?, heads(img)?);
    let (cos, sin) = rope_tables(txt + img, hd, &dev)?;
    let (w_txt, w_img) = (
        norm_weight(hd, DType::F32, &dev)?,
        norm_weight(hd, DType::F32, &dev)?,
    );
    let mut norm = q_norm(&w_txt, (&cos, &sin), 0);
    let got = klein_kernels::flash_attention_split_v_norm_q(
        &q_txt, &norm, &q_img, &w_img, &k, &v_txt, &v_img,
    )?;
    let normed = |x: &Tensor, w: &Tensor, offset: usize| {
        reference::qk_norm_rope(x, w, &cos, &sin, h, offset, 1e-6, RopeStyle::Interleaved)
    };
    let q = Tensor::cat(
        &[normed(&q_txt, &w_txt, 0)?, normed(&q_img, &w_img, txt)?],
        2,
    )?;
    let want = reference::attention(&q, &k, &Tensor::cat(&[&v_txt, &v_img], 2)?)?;
    check("attention with the joint q's norm", DType::F32, &got, &want)?;
    // The op itself reads q's tail only on Hopper: on the CPU it refuses it, with or without
    // q's norm.
    for q_norm in [None, Some(norm.clone())] {
        let op = FlashAttention {
            q_norm,
            q_tail: Some((q_img.clone(), w_img.clone())),
            ..FlashAttention::unmasked(hd)
        };
        let err = q_txt.apply_op3_no_bwd(&k, &v_txt, &op).unwrap_err();
        assert!(err.to_string().contains("only Hopper's kernel"), "{err}");
    }
    norm.rope_offset = 1;
    assert!(
        klein_kernels::flash_attention_split_v_norm_q(
            &q_txt, &norm, &q_img, &w_img, &k, &v_txt, &v_img
        )
        .is_err()
    );
    Ok(())
}

/// The single block with q's norm in the attention: the raw q columns of a projection give
/// what normalising and rotating them first gives (on the CPU the function runs exactly that;
/// Hopper's kernel is held to the same bits by the GPU suite), and the op itself refuses q_norm
/// off Hopper.
#[test]
fn attention_with_q_norm_equals_normalising_q_first() -> Result<()> {
    let dev = Device::Cpu;
    let (h, hd, s) = (2, 128, 9);
    let SingleProjection {
        q_rows,
        k,
        v,
        gate,
        up,
        ..
    } = single_projection((1, s), (h, hd, 64), DType::F32, &dev)?;
    let (cos, sin) = rope_tables(3 + s, hd, &dev)?;
    let norm = q_norm(&norm_weight(hd, DType::F32, &dev)?, (&cos, &sin), 3);
    let got =
        klein_kernels::flash_attention_with_swiglu_norm_q(&q_rows, &norm, &k, &v, &gate, &up)?;
    let q = reference::qk_norm_rope(
        &q_rows,
        &norm.weight,
        &cos,
        &sin,
        h,
        3,
        1e-6,
        RopeStyle::Interleaved,
    )?;
    let want = Tensor::cat(
        &[
            reference::attention(&q, &k, &v)?,
            reference::swiglu(&gate, &up)?,
        ],
        D::Minus1,
    )?;
    check("attention with q's norm", DType::F32, &got, &want)?;
    let op = FlashAttention {
        q_norm: Some(norm),
        ..FlashAttention::unmasked(hd)
    };
    let err = q_rows.apply_op3_no_bwd(&k, &v, &op).unwrap_err();
    assert!(err.to_string().contains("only Hopper's kernel"), "{err}");
    Ok(())
}

/// The double block's values in two parts: the op reading v and its tail equals the op on
/// their concatenation, as does the public function (which concatenates off Hopper); a tail
/// that does not complete the keys is refused.
#[test]
fn split_values_equal_their_concatenation() -> Result<()> {
    let dev = Device::Cpu;
    let (h, hd, s_txt, s_img) = (2, 16, 64, 37);
    let q = randn(&[1, h, s_txt + s_img, hd], DType::F32, &dev)?;
    let k = randn(&[1, h, s_txt + s_img, hd], DType::F32, &dev)?;
    let v_txt = randn(&[1, h, s_txt, hd], DType::F32, &dev)?;
    let v_img = randn(&[1, h, s_img, hd], DType::F32, &dev)?;
    let cat = Tensor::cat(&[&v_txt, &v_img], 2)?;
    let op = FlashAttention::unmasked(hd);
    let want = q.apply_op3_no_bwd(&k, &cat, &op)?;
    let split = FlashAttention {
        v_tail: Some(v_img.clone()),
        ..op.clone()
    };
    assert_eq!(
        rel_l2(&q.apply_op3_no_bwd(&k, &v_txt, &split)?, &want)?,
        0.0
    );
    let public = klein_kernels::flash_attention_split_v(&q, &k, &v_txt, &v_img)?;
    assert_eq!(
        rel_l2(&public, &klein_kernels::flash_attention(&q, &k, &cat)?)?,
        0.0
    );
    let short = FlashAttention {
        v_tail: Some(v_img.narrow(2, 0, 5)?),
        ..op
    };
    let err = q
        .apply_op3_no_bwd(&k, &v_txt, &short)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("do not match") && err.contains("tail"),
        "{err}"
    );
    Ok(())
}

#[test]
fn rms_norm_matches_the_composition() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let x = (randn(&[2, 5, 64], dtype, &dev)? * 3.0)?;
        let weight = ((randn(&[64], dtype, &dev)? * 0.3)? + 1.0)?;
        let got = x.apply_op2_no_bwd(&weight, &RmsNorm { eps: 1e-6 })?;
        check(
            "rms_norm",
            dtype,
            &got,
            &reference::rms_norm(&x, &weight, 1e-6)?,
        )?;
    }
    Ok(())
}

#[test]
fn qk_norm_rope_matches_the_composition() -> Result<()> {
    let dev = Device::Cpu;
    let (heads, hd) = (3, 32);
    for dtype in [DType::F32, DType::BF16] {
        // The k columns of a fused projection (strided rows), tokens 4.. of the rope table.
        let p = randn(&[2, 9, 3 * heads * hd], dtype, &dev)?;
        let src = p.narrow(D::Minus1, heads * hd, heads * hd)?;
        let weight = ((randn(&[hd], dtype, &dev)? * 0.3)? + 1.0)?;
        let (cos, sin) = rope_tables(4 + 9, hd, &dev)?;
        // Rotate-half tables hold model-dtype values (Qwen3 rounds them).
        let round = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
        let (cos_r, sin_r) = (round(&cos)?, round(&sin)?);
        for (style, cos, sin) in [
            (RopeStyle::Interleaved, &cos, &sin),
            (RopeStyle::RotateHalf, &cos_r, &sin_r),
        ] {
            let op = QkNormRope {
                weight: weight.clone(),
                heads,
                rope_offset: 4,
                eps: 1e-6,
                style,
            };
            let got = src.apply_op3_no_bwd(cos, sin, &op)?;
            let want = reference::qk_norm_rope(&src, &weight, cos, sin, heads, 4, 1e-6, style)?;
            check(&format!("qk_norm_rope {style:?}"), dtype, &got, &want)?;
        }
    }
    Ok(())
}

/// The joint op's reference equals the two streams' compositions concatenated: text rows take
/// RoPE rows 0.., image rows follow.
#[test]
fn joint_qk_norm_rope_matches_the_concatenated_composition() -> Result<()> {
    let dev = Device::Cpu;
    let (heads, hd) = (3, 32);
    for dtype in [DType::F32, DType::BF16] {
        let txt = randn(&[2, 5, 3 * heads * hd], dtype, &dev)?.narrow(D::Minus1, 0, heads * hd)?;
        let img = randn(&[2, 7, heads * hd], dtype, &dev)?;
        let weight = |scale: f64| (randn(&[hd], dtype, &dev)? * scale)? + 1.0;
        let (tw, iw) = (weight(0.3)?, weight(0.2)?);
        let (cos, sin) = rope_tables(12, hd, &dev)?;
        let op = JointQkNormRope {
            txt_weight: tw.clone(),
            img: img.clone(),
            img_weight: iw.clone(),
            heads,
            eps: 1e-6,
        };
        let got = txt.apply_op3_no_bwd(&cos, &sin, &op)?;
        let style = RopeStyle::Interleaved;
        let want = Tensor::cat(
            &[
                reference::qk_norm_rope(&txt, &tw, &cos, &sin, heads, 0, 1e-6, style)?,
                reference::qk_norm_rope(&img, &iw, &cos, &sin, heads, 5, 1e-6, style)?,
            ],
            2,
        )?;
        check("joint_qk_norm_rope", dtype, &got, &want)?;
    }
    Ok(())
}

#[test]
fn flash_attention_matches_the_composition() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        // Lengths that are not multiples of the kernel's 64-row tiles.
        let q = randn(&[2, 3, 37, 32], dtype, &dev)?;
        let k = randn(&[2, 3, 70, 32], dtype, &dev)?;
        let v = randn(&[2, 3, 70, 32], dtype, &dev)?;
        let op = FlashAttention::unmasked(32);
        let got = q.apply_op3_no_bwd(&k, &v, &op)?;
        check(
            "flash_attention",
            dtype,
            &got,
            &reference::attention(&q, &k, &v)?,
        )?;
    }
    Ok(())
}

/// Qwen3's attention: 6 query heads on 2 key/value heads, causal, right padding of different
/// lengths per batch item (padding rows still see every real token before them).
#[test]
fn masked_attention_matches_the_composition() -> Result<()> {
    let dev = Device::Cpu;
    let lens = [37u32, 21];
    let mask = Tensor::from_iter(
        lens.iter()
            .flat_map(|&n| (0..37u32).map(move |j| u32::from(j < n))),
        &dev,
    )?
    .reshape((2, 37))?;
    for dtype in [DType::F32, DType::BF16] {
        let q = randn(&[2, 6, 37, 32], dtype, &dev)?;
        let k = randn(&[2, 2, 37, 32], dtype, &dev)?;
        let v = randn(&[2, 2, 37, 32], dtype, &dev)?;
        for causal in [true, false] {
            let op = FlashAttention {
                causal,
                key_mask: Some(mask.clone()),
                ..FlashAttention::unmasked(32)
            };
            let got = q.apply_op3_no_bwd(&k, &v, &op)?;
            let want = reference::masked_attention(&q, &k, &v, &mask, causal)?;
            check(
                &format!("masked_attention causal {causal}"),
                dtype,
                &got,
                &want,
            )?;
        }
    }
    Ok(())
}

/// The masked composition is the plain one when nothing is masked, and a padded key changes
/// nothing for queries that cannot see it anyway.
#[test]
fn masked_attention_masks_what_it_should() -> Result<()> {
    let dev = Device::Cpu;
    let (q, k, v) = (
        randn(&[1, 2, 9, 16], DType::F32, &dev)?,
        randn(&[1, 2, 9, 16], DType::F32, &dev)?,
        randn(&[1, 2, 9, 16], DType::F32, &dev)?,
    );
    let all = Tensor::ones((1, 9), DType::U32, &dev)?;
    let open = reference::masked_attention(&q, &k, &v, &all, false)?;
    assert!(rel_l2(&open, &reference::attention(&q, &k, &v)?)? < 1e-6);
    // Causal with the last key padded: rows 0..8 never see key 8 anyway.
    let causal = reference::masked_attention(&q, &k, &v, &all, true)?;
    let last_padded = Tensor::from_iter((0..9u32).map(|j| u32::from(j < 8)), &dev)?.unsqueeze(0)?;
    let padded = reference::masked_attention(&q, &k, &v, &last_padded, true)?;
    let rows = |t: &Tensor| t.narrow(1, 0, 8);
    assert_eq!(rel_l2(&rows(&padded)?, &rows(&causal)?)?, 0.0);
    assert!(rel_l2(&padded.narrow(1, 8, 1)?, &causal.narrow(1, 8, 1)?)? > 1e-3);
    // Row 0 of causal attention is v's first row, per head.
    let first = causal.narrow(1, 0, 1)?.reshape((2, 16))?;
    let v0 = v.narrow(2, 0, 1)?.reshape((2, 16))?;
    assert!(rel_l2(&first, &v0)? < 1e-6);
    Ok(())
}

/// transformers' rotate-half by hand: x = [1, 2, 3, 4] pairs (1, 3) and (2, 4).
#[test]
fn rope_rotates_half_pairs() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)?.reshape((1, 1, 1, 4))?;
    let a = 0.3f32;
    let cos = Tensor::new(&[[a.cos(), 1.0]], &dev)?;
    let sin = Tensor::new(&[[a.sin(), 0.0]], &dev)?;
    let y = reference::rope_rotate_half(&x, &cos, &sin)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let want = [a.cos() - 3.0 * a.sin(), 2.0, 3.0 * a.cos() + a.sin(), 4.0];
    for (g, w) in y.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{y:?}");
    }
    Ok(())
}

#[test]
fn the_dispatchers_take_the_composition_on_the_cpu() -> Result<()> {
    let dev = Device::Cpu;
    let x = randn(&[1, 3, 8], DType::BF16, &dev)?;
    assert!(!klein_kernels::fused(&x));
    let m = modulation(1, 8, DType::BF16, &dev)?;
    let got = klein_kernels::layer_norm_modulate(&x, &m[0], &m[1], 1e-6)?;
    let want = reference::layer_norm_modulate(&x, &m[0], &m[1], 1e-6)?;
    assert_eq!(rel_l2(&got, &want)?, 0.0);
    Ok(())
}

#[test]
fn rope_rotates_interleaved_pairs() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)?.reshape((1, 1, 1, 4))?;
    let a = 0.3f32;
    let cos = Tensor::new(&[[a.cos(), 1.0]], &dev)?;
    let sin = Tensor::new(&[[a.sin(), 0.0]], &dev)?;
    let y = reference::rope_interleaved(&x, &cos, &sin)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let want = [a.cos() - 2.0 * a.sin(), 2.0 * a.cos() + a.sin(), 3.0, 4.0];
    for (g, w) in y.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{y:?}");
    }
    Ok(())
}

#[test]
fn group_norm_matches_the_composition() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        for silu in [false, true] {
            // Inputs 15 standard deviations off zero: the statistics must not cancel (the op
            // keeps them in f64; the composition's f32 ones lose about that factor).
            let x = ((randn(&[2, 12, 5, 7], DType::F32, &dev)? * 2.0)? + 30.0)?.to_dtype(dtype)?;
            let weight = ((randn(&[12], DType::F32, &dev)? * 0.3)? + 1.0)?;
            let bias = randn(&[12], DType::F32, &dev)?;
            let op = GroupNorm {
                groups: 4,
                eps: 1e-6,
                silu,
            };
            let got = x.apply_op3_no_bwd(&weight, &bias, &op)?;
            let want = reference::group_norm(&x, &weight, &bias, 4, 1e-6, silu)?;
            check_conditioned(
                &format!("group_norm (silu {silu})"),
                dtype,
                &got,
                &want,
                15.0,
            )?;
        }
    }
    Ok(())
}

/// A group norm's affine alone ([`GroupNormAffine`], what a convolution's prologue applies):
/// the composition's scale and shift, and applied by `channel_affine` it is the group norm.
#[test]
fn group_norm_affine_is_the_norms_affine() -> Result<()> {
    let dev = Device::Cpu;
    let x = ((randn(&[2, 12, 5, 7], DType::F32, &dev)? * 2.0)? + 3.0)?;
    let weight = ((randn(&[12], DType::F32, &dev)? * 0.3)? + 1.0)?;
    let bias = randn(&[12], DType::F32, &dev)?;
    let op = GroupNormAffine {
        groups: 4,
        eps: 1e-6,
    };
    let both = x.apply_op3_no_bwd(&weight, &bias, &op)?;
    assert_eq!(both.dims(), &[2, 2, 12]);
    let (scale, shift) = reference::group_norm_affine(&x, &weight, &bias, 4, 1e-6)?;
    check("group_norm_affine scale", DType::F32, &both.get(0)?, &scale)?;
    check("group_norm_affine shift", DType::F32, &both.get(1)?, &shift)?;
    let normed = klein_kernels::channel_affine(&x, &both.get(0)?, &both.get(1)?, true)?;
    let want = reference::group_norm(&x, &weight, &bias, 4, 1e-6, true)?;
    check("channel_affine of the affine", DType::F32, &normed, &want)?;
    Ok(())
}

/// Off cuDNN a convolution's prologue is its composition, applied first: the affine and SiLU of
/// the input, then the convolution.
#[test]
fn a_convolutions_prologue_is_applied_first_off_cudnn() -> Result<()> {
    use klein_kernels::{Conv, ConvPrecision, ConvWeights, Prologue};
    let dev = Device::Cpu;
    let x = randn(&[1, 4, 5, 6], DType::F32, &dev)?;
    let w = ConvWeights::new(
        randn(&[3, 4, 3, 3], DType::F32, &dev)?,
        randn(&[3], DType::F32, &dev)?,
        ConvPrecision::SplitTf32,
    )?;
    let (scale, shift) = (
        randn(&[1, 4], DType::F32, &dev)?,
        randn(&[1, 4], DType::F32, &dev)?,
    );
    let prologue = Prologue {
        affine: Some((scale.clone(), shift.clone(), true)),
    };
    let conv = Conv {
        padding: 1,
        stride: 1,
        precision: ConvPrecision::SplitTf32,
        algo: None,
    };
    let got = klein_kernels::conv2d_with(&x, &w, None, conv, &prologue)?;
    assert_eq!(got.dims(), &[1, 3, 5, 6]);
    let input = reference::channel_affine(&x, &scale, &shift, true)?;
    let want = reference::conv2d(&input, &w.weight, &w.bias, None, conv)?;
    assert_eq!(rel_l2(&got, &want)?, 0.0);
    Ok(())
}

/// A tiled decode's halves of a group norm: the moments over a region of the planes (f64 both
/// ways, so only summation order differs) and the per-channel affine (+ SiLU).
#[test]
fn group_moments_and_channel_affine_match_the_composition() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let x = ((randn(&[2, 12, 6, 9], DType::F32, &dev)? * 2.0)? + 3.0)?.to_dtype(dtype)?;
        for (rows, cols) in [((0, 6), (0, 9)), ((1, 4), (2, 9))] {
            let got = x.apply_op1_no_bwd(&GroupMoments {
                groups: 4,
                rows,
                cols,
            })?;
            let want = reference::group_moments(&x, 4, rows, cols)?;
            assert_eq!(got.dims(), &[8, 2]);
            let rel = rel_l2(&got, &want)?;
            println!("group_moments {dtype:?} rows {rows:?} cols {cols:?}: rel-L2 {rel:.2e}");
            assert!(rel <= 1e-12, "rel-L2 {rel}");
        }
        let scale = randn(&[2, 12], DType::F32, &dev)?;
        let shift = randn(&[2, 12], DType::F32, &dev)?;
        for silu in [false, true] {
            let got = x.apply_op3_no_bwd(&scale, &shift, &ChannelAffine { silu })?;
            let want = reference::channel_affine(&x, &scale, &shift, silu)?;
            check(&format!("channel_affine (silu {silu})"), dtype, &got, &want)?;
        }
    }
    Ok(())
}

#[test]
fn ops_refuse_inputs_outside_their_contract() -> Result<()> {
    let dev = Device::Cpu;
    let q = randn(&[1, 2, 5, 16], DType::F32, &dev)?;
    let k = randn(&[1, 2, 7, 8], DType::F32, &dev)?;
    let op = FlashAttention::unmasked(16);
    let err = q.apply_op3_no_bwd(&k, &k, &op).unwrap_err();
    assert!(err.to_string().contains("do not match"), "{err}");
    let k = randn(&[1, 2, 7, 16], DType::F32, &dev)?;
    let causal = FlashAttention {
        causal: true,
        ..op.clone()
    };
    let err = q.apply_op3_no_bwd(&k, &k, &causal).unwrap_err();
    assert!(err.to_string().contains("as many queries as keys"), "{err}");
    let masked = FlashAttention {
        key_mask: Some(Tensor::ones((1, 5), DType::U32, &dev)?),
        ..op.clone()
    };
    let err = q.apply_op3_no_bwd(&k, &k, &masked).unwrap_err();
    assert!(err.to_string().contains("key mask"), "{err}");
    let none = randn(&[1, 2, 0, 16], DType::F32, &dev)?;
    let err = q.apply_op3_no_bwd(&none, &none, &op).unwrap_err();
    assert!(err.to_string().contains("no keys"), "{err}");

    let x = randn(&[2, 3, 8], DType::F32, &dev)?;
    let wrong = modulation(1, 8, DType::F32, &dev)?;
    let op = LayerNormModulate { eps: 1e-6 };
    let err = x.apply_op3_no_bwd(&wrong[0], &wrong[1], &op).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");

    let err = x
        .apply_op2_no_bwd(&x.narrow(D::Minus1, 0, 6)?, &SwiGlu)
        .unwrap_err();
    assert!(err.to_string().contains("do not match"), "{err}");
    let err = x
        .apply_op2_no_bwd(&wrong[0].reshape((1, 8))?, &RmsNorm { eps: 1e-6 })
        .unwrap_err();
    assert!(err.to_string().contains("weight of its last dim"), "{err}");

    let op = GroupNorm {
        groups: 3,
        eps: 1e-6,
        silu: false,
    };
    let img = randn(&[1, 8, 2, 2], DType::F32, &dev)?;
    let affine = randn(&[8], DType::F32, &dev)?;
    let err = img.apply_op3_no_bwd(&affine, &affine, &op).unwrap_err();
    assert!(err.to_string().contains("divisible by 3 groups"), "{err}");
    let outside = GroupMoments {
        groups: 4,
        rows: (1, 3),
        cols: (0, 2),
    };
    let err = img.apply_op1_no_bwd(&outside).unwrap_err();
    assert!(err.to_string().contains("not a region of 2 × 2"), "{err}");
    let err = img
        .apply_op3_no_bwd(&affine, &affine, &ChannelAffine { silu: false })
        .unwrap_err();
    assert!(err.to_string().contains("contiguous (1, 8)"), "{err}");
    let err = img
        .apply_op3_no_bwd(
            &affine,
            &affine,
            &GroupNormAffine {
                groups: 3,
                eps: 1e-6,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("divisible by 3 groups"), "{err}");
    Ok(())
}

/// The unit-range value is rounded to the decoder's dtype before the ×255: x = 0.0116 gives
/// y = x / 2 + 0.5 = 0.50580 in f32 (255 y = 128.98 → 129), but 0.50391 in bf16 (128.496 →
/// 128); ties go to even and the output is channel-last.
#[test]
fn rgb_u8_rounds_in_the_decoder_dtype() -> Result<()> {
    let x = Tensor::new(&[0.0116f32, 0.0116, 0.0116], &Device::Cpu)?.reshape((1, 3, 1, 1))?;
    let pixels = |t: &Tensor| klein_kernels::rgb_u8(t)?.flatten_all()?.to_vec1::<u8>();
    assert_eq!(pixels(&x)?, [129, 129, 129]);
    assert_eq!(pixels(&x.to_dtype(DType::BF16)?)?, [128, 128, 128]);
    // Planes [0, 1], [-1.5, 1.5], [0, 0]: y = 0.5 is 127.5 → 128 (to even), y = 1 → 255, and
    // below 0 / above 1 clamp; pixels come out as (R, G, B) triples.
    let x =
        Tensor::new(&[0.0f32, 1.0, -1.5, 1.5, 0.0, 0.0], &Device::Cpu)?.reshape((1, 3, 1, 2))?;
    assert_eq!(pixels(&x)?, [128, 0, 128, 255, 255, 128]);
    Ok(())
}

/// fp8 weights with their scale: every byte, at several scales (one whose products are f32
/// subnormals) and in every output dtype, is exactly the composition it replaces (candle's f32
/// value, the multiply, the cast); other dtypes are refused.
#[test]
fn fp8_scaling_is_the_scaled_composition() -> Result<()> {
    let dev = Device::Cpu;
    let bytes: Vec<u8> = (0..=255).collect();
    let w = Tensor::from_raw_buffer(&bytes, DType::F8E4M3, &[16, 16], &dev)?;
    for scale in [1.0f32, 0.012_345_678, 3.7e-3, -2.5, 1.0e-40] {
        let composed = w
            .to_dtype(DType::F32)?
            .broadcast_mul(&Tensor::new(scale, &dev)?)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let got = klein_kernels::scale_fp8(&w, scale, dtype)?;
            let want = composed.to_dtype(dtype)?;
            assert_eq!(differing_bits(&got, &want)?, 0, "scale {scale}, {dtype:?}");
        }
    }
    assert!(klein_kernels::scale_fp8(&w.to_dtype(DType::F32)?, 1.0, DType::F32).is_err());
    assert!(klein_kernels::scale_fp8(&w, 1.0, DType::U8).is_err());
    Ok(())
}
