//! The CUDA kernels against the stock-candle compositions on the GPU, random bf16 inputs of the
//! klein-4B shapes (and odd ones). Built with `--features cuda`; runs on CUDA device 0
//! (`tools/gpu/device.sh parity`).

#![cfg(feature = "cuda")]

mod common;

use candle_core::{D, DType, Device, Result, Tensor};
use common::{max_rel, modulation, randn, rel_l2, rope_tables};
use klein_kernels::reference;

/// bf16 keeps 8 significant bits: one rounding is at most 2⁻⁸ relative.
const BF16_ULP: f32 = 1.0 / 256.0;

fn gpu() -> Device {
    Device::new_cuda(0).expect("CUDA device 0")
}

/// The fused elementwise kernels round the same intermediates as the composition: they may
/// differ by one rounding where f32 summation order tips it.
fn check_elementwise(name: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{name}");
    let (rel, max) = (rel_l2(got, want)?, max_rel(got, want)?);
    println!("{name}: rel-L2 {rel:.2e}, max {max:.2e}");
    assert!(
        rel <= BF16_ULP / 4.0 && max <= 2.0 * BF16_ULP,
        "{name}: rel-L2 {rel}, max {max}"
    );
    Ok(())
}

#[test]
fn elementwise_kernels_match_the_composition() -> Result<()> {
    let dev = gpu();
    // Image tokens of a 512² request and the klein-4B widths.
    let (b, s, d, heads, hd, f) = (2, 1024 + 77, 3072, 24, 128, 9216);
    let x = (randn(&[b, s, d], DType::BF16, &dev)? * 4.0)?;
    let m = modulation(b, d, DType::BF16, &dev)?;
    check_elementwise(
        "layer_norm_modulate",
        &klein_kernels::layer_norm_modulate(&x, &m[0], &m[1], 1e-6)?,
        &reference::layer_norm_modulate(&x, &m[0], &m[1], 1e-6)?,
    )?;
    let y = randn(&[b, s, d], DType::BF16, &dev)?;
    check_elementwise(
        "gate_residual",
        &klein_kernels::gate_residual(&x, &y, &m[2])?,
        &reference::gate_residual(&x, &y, &m[2])?,
    )?;
    let p = (randn(&[b, s, 3 * d + 2 * f], DType::BF16, &dev)? * 2.0)?;
    check_elementwise(
        "swiglu",
        &klein_kernels::swiglu(&p, 3 * d, 3 * d + f, f)?,
        &reference::swiglu(
            &p.narrow(D::Minus1, 3 * d, f)?,
            &p.narrow(D::Minus1, 3 * d + f, f)?,
        )?,
    )?;
    let weight = ((randn(&[hd], DType::BF16, &dev)? * 0.3)? + 1.0)?;
    let (cos, sin) = rope_tables(512 + s, hd, &dev)?;
    let k = p.narrow(D::Minus1, d, d)?;
    check_elementwise(
        "qk_norm_rope",
        &klein_kernels::qk_norm_rope(&k, &weight, &cos, &sin, heads, 512, 1e-6)?,
        &reference::qk_norm_rope(&k, &weight, &cos, &sin, heads, 512, 1e-6)?,
    )?;
    Ok(())
}

/// Attention on bf16 inputs against the f32 composition on the same inputs. The kernel rounds
/// twice, P to bf16 before P·V (as torch's flash and cuDNN kernels do) and the output: two
/// independent roundings of at most 2⁻⁸ relative each are about 0.8·2⁻⁸ in rel-L2, so 2⁻⁸
/// bounds it; a wrong tile, mask or rescale is off by O(1). The all-bf16 composition's error
/// (7.3e-3 at the 1024² shape) is printed next to it for scale.
#[test]
fn flash_attention_matches_the_f32_composition() -> Result<()> {
    let dev = gpu();
    let cases = [
        (1, 24, 4608, 4608, 128), // the 1024² transformer step
        (2, 3, 37, 70, 128),      // partial tiles on both axes
        (1, 2, 300, 300, 64),
        (2, 2, 77, 141, 32), // the tiny fixtures' head dim
    ];
    for (b, h, s_q, s_kv, hd) in cases {
        let q = randn(&[b, h, s_q, hd], DType::BF16, &dev)?;
        let k = randn(&[b, h, s_kv, hd], DType::BF16, &dev)?;
        let v = randn(&[b, h, s_kv, hd], DType::BF16, &dev)?;
        assert!(klein_kernels::flash_attention_fused(&q));
        let got = klein_kernels::flash_attention(&q, &k, &v)?;
        let want = reference::attention(&q, &k, &v)?.to_dtype(DType::F32)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let bf16_run = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let bf16_run = bf16_run.transpose(1, 2)?.reshape((b, s_q, h * hd))?;
        let (rel, spread) = (rel_l2(&got, &want)?, rel_l2(&bf16_run, &want)?);
        println!(
            "flash_attention {b}x{h}x{s_q}x{s_kv}x{hd}: rel-L2 {rel:.2e} (all-bf16 composition {spread:.2e})"
        );
        assert!(rel <= BF16_ULP, "rel-L2 {rel}");
    }
    Ok(())
}

/// The VAE's GroupNorm (+ SiLU) at decoder shapes. f32: the kernel keeps its statistics in f64,
/// the composition in f32, both well inside the f32 parity tolerance (1e-4): held to 1e-5.
/// bf16: the same roundings as the composition.
#[test]
fn group_norm_matches_the_composition() -> Result<()> {
    let dev = gpu();
    for (shape, silu) in [([1, 128, 512, 512], true), ([2, 512, 64, 96], false)] {
        let x = ((randn(&shape, DType::F32, &dev)? * 2.0)? + 1.0)?;
        let weight = ((randn(&[shape[1]], DType::F32, &dev)? * 0.3)? + 1.0)?;
        let bias = randn(&[shape[1]], DType::F32, &dev)?;
        assert!(klein_kernels::group_norm_fused(&x));
        let got = klein_kernels::group_norm(&x, &weight, &bias, 32, 1e-6, silu)?;
        let want = reference::group_norm(&x, &weight, &bias, 32, 1e-6, silu)?;
        let rel = rel_l2(&got, &want)?;
        println!("group_norm f32 {shape:?} silu {silu}: rel-L2 {rel:.2e}");
        assert!(rel <= 1e-5, "rel-L2 {rel}");
        let x = x.to_dtype(DType::BF16)?;
        check_elementwise(
            &format!("group_norm bf16 {shape:?} silu {silu}"),
            &klein_kernels::group_norm(&x, &weight, &bias, 32, 1e-6, silu)?,
            &reference::group_norm(&x, &weight, &bias, 32, 1e-6, silu)?,
        )?;
    }
    Ok(())
}
