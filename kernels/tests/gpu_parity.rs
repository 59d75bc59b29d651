//! The CUDA kernels against the stock-candle compositions on the GPU, random bf16 inputs of the
//! klein-4B shapes (and odd ones). Built with `--features cuda`; runs on CUDA device 0
//! (`tools/gpu/device.sh parity`).

#![cfg(feature = "cuda")]

mod common;

use candle_core::{D, DType, Device, Result, Tensor, quantized::QTensor};
use common::{
    SingleProjection, differing_bits, max_rel, modulation, norm_weight, q_norm, randn, rel_l2,
    rope_tables, single_projection,
};
use klein_kernels::{
    RopeStyle, TuningCache,
    quant::{QuantFormat, quantize_rows},
    reference,
};

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

/// `reference::silu` on a bf16 CUDA tensor is candle's bf16 kernel alone: the same bits as the
/// f32 SiLU rounded once (the composition it replaces), on its 16-byte path (contiguous,
/// aligned), its tail and its strided path, over ordinary values, large ones and the edges.
#[test]
fn bf16_silu_is_the_f32_silu_rounded_once() -> Result<()> {
    let dev = gpu();
    let edges = Tensor::new(
        &[
            0f32, -0.0, 1e-30, -1e-30, 88.0, -88.0, 100.0, -100.0, 3e38, -3e38, 0.5, -0.5,
        ],
        &dev,
    )?
    .to_dtype(DType::BF16)?;
    let wide = (randn(&[3, 3075], DType::BF16, &dev)? * 16.0)?;
    let cases = [
        ("edges", edges),
        ("rows of 3075", wide.clone()),
        ("a strided view", wide.narrow(1, 5, 1000)?.t()?),
        ("temb-shaped", randn(&[2, 3072], DType::BF16, &dev)?),
    ];
    for (name, x) in cases {
        let got = reference::silu(&x)?;
        let want = x.to_dtype(DType::F32)?.silu()?.to_dtype(DType::BF16)?;
        let differing = differing_bits(&got, &want)?;
        println!(
            "silu, {name}: {differing} of {} elements differ",
            x.elem_count()
        );
        assert_eq!(differing, 0, "silu, {name}");
    }
    Ok(())
}

/// The klein-4B widths at a 512² request's image tokens (16-byte accesses), and odd widths
/// whose rows are not 16-byte aligned (the kernels' bf16-pair paths).
#[test]
fn elementwise_kernels_match_the_composition() -> Result<()> {
    let dev = gpu();
    for (b, s, d, heads, hd, f) in [(2, 1024 + 77, 3072, 24, 128, 9216), (1, 37, 196, 2, 98, 94)] {
        let x = (randn(&[b, s, d], DType::BF16, &dev)? * 4.0)?;
        let m = modulation(b, d, DType::BF16, &dev)?;
        check_elementwise(
            &format!("layer_norm_modulate d {d}"),
            &klein_kernels::layer_norm_modulate(&x, &m[0], &m[1], 1e-6)?,
            &reference::layer_norm_modulate(&x, &m[0], &m[1], 1e-6)?,
        )?;
        let y = randn(&[b, s, d], DType::BF16, &dev)?;
        let r = klein_kernels::gate_residual(&x, &y, &m[2])?;
        check_elementwise(
            &format!("gate_residual d {d}"),
            &r,
            &reference::gate_residual(&x, &y, &m[2])?,
        )?;
        // The rows a last single block keeps: each batch item contiguous, the items apart.
        let (rows, y_rows) = (x.narrow(1, 7, s - 7)?, y.narrow(1, 7, s - 7)?.contiguous()?);
        check_elementwise(
            &format!("gate_residual rows d {d}"),
            &klein_kernels::gate_residual(&rows, &y_rows, &m[2])?,
            &reference::gate_residual(&rows, &y_rows, &m[2])?,
        )?;
        // The residual and its norm in one kernel (the pair paths where the rows do not take
        // it): exactly the two kernels.
        let (fused_r, fused_n) =
            klein_kernels::gate_residual_norm(&x, &y, &m[2], &m[0], &m[1], 1e-6)?;
        let n = klein_kernels::layer_norm_modulate(&r, &m[0], &m[1], 1e-6)?;
        assert_eq!(
            rel_l2(&fused_r, &r)?,
            0.0,
            "gate_residual_norm residual d {d}"
        );
        assert_eq!(rel_l2(&fused_n, &n)?, 0.0, "gate_residual_norm norm d {d}");
        let p = (randn(&[b, s, 3 * d + 2 * f], DType::BF16, &dev)? * 2.0)?;
        let (gate, up) = (
            p.narrow(D::Minus1, 3 * d, f)?,
            p.narrow(D::Minus1, 3 * d + f, f)?,
        );
        check_elementwise(
            &format!("swiglu f {f}"),
            &klein_kernels::swiglu(&gate, &up)?,
            &reference::swiglu(&gate, &up)?,
        )?;
        let weight = ((randn(&[hd], DType::BF16, &dev)? * 0.3)? + 1.0)?;
        let (cos, sin) = rope_tables(512 + s, hd, &dev)?;
        for (name, cols) in [("q", 0), ("k", d)] {
            let src = p.narrow(D::Minus1, cols, d)?;
            check_elementwise(
                &format!("qk_norm_rope {name} hd {hd}"),
                &klein_kernels::qk_norm_rope(&src, &weight, &cos, &sin, heads, 512, 1e-6, FLUX)?,
                &reference::qk_norm_rope(&src, &weight, &cos, &sin, heads, 512, 1e-6, FLUX)?,
            )?;
        }
        // The double blocks' joint [txt; img]: text rows from this projection, image rows from
        // another (both strided column views), each with its own weight.
        let img = (randn(&[b, 77, 3 * d], DType::BF16, &dev)? * 2.0)?.narrow(D::Minus1, d, d)?;
        let img_weight = ((randn(&[hd], DType::BF16, &dev)? * 0.2)? + 1.0)?;
        let txt = p.narrow(D::Minus1, 0, d)?;
        let joint = Tensor::cat(
            &[
                reference::qk_norm_rope(&txt, &weight, &cos, &sin, heads, 0, 1e-6, FLUX)?,
                reference::qk_norm_rope(&img, &img_weight, &cos, &sin, heads, s, 1e-6, FLUX)?,
            ],
            2,
        )?;
        check_elementwise(
            &format!("qk_norm_rope_joint hd {hd}"),
            &klein_kernels::qk_norm_rope_joint(
                (&txt, &weight),
                (&img, &img_weight),
                &cos,
                &sin,
                heads,
                1e-6,
            )?,
            &joint,
        )?;
    }
    Ok(())
}

const FLUX: RopeStyle = RopeStyle::Interleaved;

/// The Qwen3 text encoder's kernels at Qwen3-4B shapes (512 tokens, hidden 2560, 32 heads of
/// 128, MLP 9728).
#[test]
fn encoder_kernels_match_the_composition() -> Result<()> {
    let dev = gpu();
    let (b, l, d, heads, hd, f) = (2, 512, 2560, 32, 128, 9728);
    let x = (randn(&[b, l, d], DType::BF16, &dev)? * 4.0)?;
    let weight = ((randn(&[d], DType::BF16, &dev)? * 0.3)? + 1.0)?;
    check_elementwise(
        "rms_norm",
        &klein_kernels::rms_norm(&x, &weight, 1e-6)?,
        &reference::rms_norm(&x, &weight, 1e-6)?,
    )?;
    let q = (randn(&[b, l, heads * hd], DType::BF16, &dev)? * 2.0)?;
    let weight = ((randn(&[hd], DType::BF16, &dev)? * 0.3)? + 1.0)?;
    // Qwen3's tables: f32 angles of positions 0..512, values rounded to bf16.
    let (cos, sin) = rope_tables(l, hd, &dev)?;
    let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
    let (cos, sin) = (round(&cos)?, round(&sin)?);
    // Against the composition on the CPU, which rounds each product and the sum as torch does:
    // candle's CUDA bf16 rope came out 2.2e-3 rel-L2 from it (H200, 2026-11-26).
    let qwen = RopeStyle::RotateHalf;
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
    check_elementwise(
        "qk_norm_rope rotate-half",
        &cpu(&klein_kernels::qk_norm_rope(
            &q, &weight, &cos, &sin, heads, 0, 1e-6, qwen,
        )?)?,
        &reference::qk_norm_rope(
            &cpu(&q)?,
            &cpu(&weight)?,
            &cpu(&cos)?,
            &cpu(&sin)?,
            heads,
            0,
            1e-6,
            qwen,
        )?,
    )?;
    let (gate, up) = (
        (randn(&[b, l, f], DType::BF16, &dev)? * 2.0)?,
        randn(&[b, l, f], DType::BF16, &dev)?,
    );
    check_elementwise(
        "swiglu pair",
        &klein_kernels::swiglu(&gate, &up)?,
        &reference::swiglu(&gate, &up)?,
    )?;
    Ok(())
}

/// Every format that `dequantize` turns into bf16 in one kernel pass gives exactly candle's f32
/// dequantization rounded to bf16, bit for bit (signed zeros included: Q5_0's (q − 16)·d keeps
/// a negative d's sign). On the Qwen3 gate_proj's shape, and on one whose block count fills no
/// launch block evenly (111 super-blocks, 888 blocks of 32 weights: the kernels' tail).
#[test]
fn fused_dequantization_matches_candle() -> Result<()> {
    let dev = gpu();
    let bits = |t: &Tensor| -> Result<Vec<u16>> {
        let values = t.flatten_all()?.to_vec1::<half::bf16>()?;
        Ok(values.into_iter().map(half::bf16::to_bits).collect())
    };
    for (rows, cols) in [(9728, 2560), (37, 768)] {
        let w = Tensor::randn(0f32, 0.02, (rows, cols), &Device::Cpu)?;
        for format in klein_kernels::fused_dequantize_formats() {
            let w = QTensor::quantize_onto(&w, format, &dev)?;
            let got = klein_kernels::dequantize(&w, DType::BF16)?;
            let want = w.dequantize(&dev)?.to_dtype(DType::BF16)?;
            assert_eq!(got.dims(), want.dims(), "{format:?}");
            let (got, want) = (bits(&got)?, bits(&want)?);
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            println!(
                "dequantize {format:?} ({rows}, {cols}): {differ} of {} values differ",
                want.len()
            );
            assert_eq!(differ, 0, "{format:?} ({rows}, {cols})");
        }
    }
    Ok(())
}

/// Rows of 512 weights (two k-quant super-blocks) that the quantizers treat apart, after random
/// rows of scales from 1e-4 to 1e3: zeros, a constant, one sign only, ±0 mixed with small
/// values, one large outlier, each 32-block constant at its own value, f32 subnormals.
fn quantization_rows() -> Result<Tensor> {
    let cpu = Device::Cpu;
    let w = 512;
    let mut rows = Vec::new();
    for e in -4..=3 {
        rows.push((Tensor::randn(0f32, 1.0, (2, w), &cpu)? * 10f64.powi(e))?);
    }
    let normal = Tensor::randn(0f32, 1.0, (1, w), &cpu)?;
    rows.push(Tensor::zeros((1, w), DType::F32, &cpu)?);
    rows.push(Tensor::full(0.5f32, (1, w), &cpu)?);
    rows.push(normal.abs()?);
    rows.push(normal.abs()?.neg()?);
    let signed_zeros: Vec<f32> = (0..w)
        .map(|i| match i % 4 {
            0 => 0.0,
            1 => -0.0,
            2 => 1e-3 * (i as f32).sin(),
            _ => 0.0,
        })
        .collect();
    rows.push(Tensor::from_vec(signed_zeros, (1, w), &cpu)?);
    let mut outlier = normal.flatten_all()?.to_vec1::<f32>()?;
    outlier[77] = 1000.0;
    rows.push(Tensor::from_vec(outlier, (1, w), &cpu)?);
    let steps: Vec<f32> = (0..w).map(|i| (i / 32) as f32 * 0.25 - 1.0).collect();
    rows.push(Tensor::from_vec(steps, (1, w), &cpu)?);
    rows.push((normal * 1e-39)?);
    Tensor::cat(&rows, 0)
}

/// f16 fields of one block of each format (scales, mins), by byte offset.
fn f16_fields(format: QuantFormat) -> &'static [usize] {
    match format {
        QuantFormat::Q8_0 | QuantFormat::Q4_0 => &[0],
        QuantFormat::Q4_1 | QuantFormat::Q4K => &[0, 2],
        QuantFormat::Q6K => &[208],
    }
}

/// Load-time quantization on the GPU writes the host quantizer's blocks, byte for byte: every
/// format, from f32, bf16 and f16, on [`quantization_rows`] and on a weight larger than one
/// upload part (two parts, the second partial); a weight of no rows gives no blocks, rows that
/// are not whole blocks an error. The one
/// latitude is a zero f16 scale or min whose sign differs: the host's own `f32::max` returns
/// either zero (a debug and a release build differ), and its weights dequantize alike.
#[test]
fn device_quantization_writes_the_host_blocks() -> Result<()> {
    let dev = gpu();
    let large = Tensor::randn(0f32, 0.02, (9000, 2048), &Device::Cpu)?;
    let cases = [
        (
            quantization_rows()?,
            vec![DType::F32, DType::BF16, DType::F16],
        ),
        (large, vec![DType::F32]),
    ];
    for (rows, dtypes) in &cases {
        for &dtype in dtypes {
            let host = rows.to_dtype(dtype)?;
            for format in QuantFormat::ALL {
                let on_gpu = quantize_rows(&host, format.ggml(), &dev)?;
                assert!(on_gpu.device().is_cuda(), "{format:?}");
                let mut got = on_gpu.data()?.into_owned();
                let want = quantize_rows(&host, format.ggml(), &Device::Cpu)?
                    .data()?
                    .into_owned();
                assert_eq!(got.len(), want.len(), "{format:?} {dtype:?}");
                let block = format.ggml().type_size();
                let mut zero_signs = 0;
                for start in (0..want.len()).step_by(block) {
                    for &at in f16_fields(format) {
                        let field = start + at..start + at + 2;
                        let is_zero = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]) & 0x7fff == 0;
                        if got[field.clone()] != want[field.clone()]
                            && is_zero(&got[field.clone()])
                            && is_zero(&want[field.clone()])
                        {
                            zero_signs += 1;
                            got[field.clone()].copy_from_slice(&want[field]);
                        }
                    }
                }
                let differ = (0..want.len() / block)
                    .filter(|b| got[b * block..(b + 1) * block] != want[b * block..(b + 1) * block])
                    .collect::<Vec<_>>();
                println!(
                    "quantize {format:?} from {dtype:?} {:?}: {} of {} blocks differ, {zero_signs} zero scales of the other sign",
                    host.dims(),
                    differ.len(),
                    want.len() / block
                );
                assert!(
                    differ.is_empty(),
                    "{format:?} from {dtype:?}: {} blocks differ, the first {:?}",
                    differ.len(),
                    &differ[..differ.len().min(8)]
                );
            }
        }
    }
    let none = Tensor::zeros((0, 512), DType::BF16, &Device::Cpu)?;
    let empty = quantize_rows(&none, QuantFormat::Q4K.ggml(), &dev)?;
    assert_eq!(empty.shape().dims(), &[0, 512], "a weight of no rows");
    let ragged = Tensor::zeros((2, 100), DType::BF16, &Device::Cpu)?;
    let err = quantize_rows(&ragged, QuantFormat::Q8_0.ggml(), &dev).unwrap_err();
    assert!(err.to_string().contains("not whole"), "{err}");
    Ok(())
}

/// A checkpoint's bytes as [`klein_kernels::quant::MappedTensors`]: named tensors, stored.
struct Stored(Vec<(String, Tensor, Vec<u8>)>);

impl klein_kernels::quant::MappedTensors for Stored {
    fn tensor(&self, name: &str) -> Option<(DType, Vec<usize>, &[u8])> {
        let (_, t, bytes) = self.0.iter().find(|(n, ..)| n == name)?;
        Some((t.dtype(), t.dims().to_vec(), bytes))
    }
}

/// `t`'s little-endian bytes, as a safetensors file stores them.
fn stored_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => candle_core::bail!("no stored bytes for {other:?}"),
    })
}

/// Quantizing from a checkpoint's bytes (`quantize_mapped`, what the services' loaders run on a
/// GPU) writes the blocks of quantizing the stacked host rows (`quantize_rows`), byte for byte:
/// every format, from f32, bf16 and f16, a stack of two tensors, and a tensor larger than one
/// upload part (so the second tensor's blocks start inside a part's worth of offsets). A
/// missing tensor, another dtype or another shape give `None` (the builder's read instead).
#[test]
fn quantization_from_mapped_bytes_writes_the_stacked_rows_blocks() -> Result<()> {
    use klein_kernels::quant::{quantize_mapped, with_mapped};
    let dev = gpu();
    let cases = [
        (
            quantization_rows()?,
            vec![DType::F32, DType::BF16, DType::F16],
        ),
        (
            Tensor::randn(0f32, 0.02, (9000, 2048), &Device::Cpu)?,
            vec![DType::F32],
        ),
    ];
    for (rows, dtypes) in &cases {
        for &dtype in dtypes {
            let a = rows.to_dtype(dtype)?;
            let b = (rows.flip(&[0])? * 1.5)?.to_dtype(dtype)?;
            let source = Stored(vec![
                ("a.weight".into(), a.clone(), stored_bytes(&a)?),
                ("b.weight".into(), b.clone(), stored_bytes(&b)?),
            ]);
            let (r, w) = a.dims2()?;
            let names = ["a.weight".to_string(), "b.weight".to_string()];
            let stacked = Tensor::cat(&[&a, &b], 0)?;
            let source: std::sync::Arc<dyn klein_kernels::quant::MappedTensors> =
                std::sync::Arc::new(source);
            for format in QuantFormat::ALL {
                let f = format.ggml();
                let (got, missing, converted, reshaped) = with_mapped(source.clone(), || {
                    let other = if dtype == DType::F32 {
                        DType::BF16
                    } else {
                        DType::F32
                    };
                    Ok::<_, candle_core::Error>((
                        quantize_mapped(&names, dtype, (r, w), f, &dev)?,
                        quantize_mapped(&["c.weight".into()], dtype, (r, w), f, &dev)?,
                        quantize_mapped(&names, other, (r, w), f, &dev)?,
                        quantize_mapped(&names, dtype, (r * 2, w / 2), f, &dev)?,
                    ))
                })?;
                assert!(missing.is_none() && converted.is_none() && reshaped.is_none());
                let got = got.expect("read from the mapped bytes");
                assert_eq!(got.shape().dims(), &[2 * r, w]);
                let want = quantize_rows(&stacked, f, &dev)?;
                assert!(
                    got.data()? == want.data()?,
                    "{format:?} from {dtype:?} {:?}: the mapped bytes' blocks differ",
                    a.dims()
                );
            }
        }
    }
    let outside = quantize_mapped(
        &["a.weight".into()],
        DType::F32,
        (1, 32),
        QuantFormat::Q8_0.ggml(),
        &dev,
    )?;
    assert!(outside.is_none(), "no mapped checkpoint outside a scope");
    Ok(())
}

/// fp8 weights with their scale, on the GPU, give exactly the CPU's values (the composition
/// there, `cpu_reference::fp8_scaling_is_the_scaled_composition`): every byte, several scales, each output dtype, a weight-sized tensor.
#[test]
fn fp8_scaling_matches_the_cpu() -> Result<()> {
    let dev = gpu();
    let mut bytes: Vec<u8> = (0..=255).collect();
    bytes.extend((0..3072 * 1000).map(|i| ((i * 2_654_435_761u64) >> 13) as u8));
    let host = Tensor::from_raw_buffer(
        &bytes,
        DType::F8E4M3,
        &[bytes.len() / 256, 256],
        &Device::Cpu,
    )?;
    let w = host.to_device(&dev)?;
    for scale in [1.0f32, 0.012_345_678, -2.5] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let got = klein_kernels::scale_fp8(&w, scale, dtype)?;
            let want = klein_kernels::scale_fp8(&host, scale, dtype)?;
            let differ = differing_bits(&got, &want)?;
            assert_eq!(differ, 0, "scale {scale}, {dtype:?}");
        }
    }
    Ok(())
}

/// A linear case: x's dims, N, and the rows kept of x's second axis.
type LinearCase<'a> = (&'a [usize], usize, Option<(usize, usize)>);

/// Random bf16 x (narrowed as the case says) and W (N, K) for a linear case.
fn linear_operands((x_dims, n, narrow): LinearCase<'_>, dev: &Device) -> Result<(Tensor, Tensor)> {
    use candle_core::IndexOp;
    let k = *x_dims.last().expect("rank 2 or 3");
    let x = randn(x_dims, DType::BF16, dev)?;
    let x = match narrow {
        Some((start, len)) => x.i((.., start..start + len, ..))?,
        None => x,
    };
    let w = (randn(&[n, k], DType::BF16, dev)? * 0.05)?.to_dtype(DType::BF16)?;
    Ok((x, w))
}

/// The linear layers' cuBLASLt product against candle's matmul (cuBLAS; both accumulate in
/// f32): the 1024² double block's MLP input (large enough to be tuned), an odd one, a sequence
/// narrowed in a batch of two (the double block's output projections), and a 2D x. Each runs on
/// a fresh thread (a fresh algorithm table) untuned, then tuned, then tuned again with the
/// first tuning's choices cached (taken without timing), then with every other rank a cache
/// could name (kept only where bit-identical, else tuned afresh): no run may change a bit.
#[test]
fn linear_matches_candle_and_tuning_changes_no_bit() -> Result<()> {
    use candle_core::Module;
    let dev = gpu();
    let cases: [LinearCase; 4] = [
        (&[1, 4096, 3072], 18432, None),
        (&[2, 37, 40], 24, None),
        (&[2, 9, 64], 48, Some((2, 7))),
        (&[300, 128], 200, None),
    ];
    for (x_dims, n, narrow) in cases {
        let (x, w) = linear_operands((x_dims, n, narrow), &dev)?;
        let linear = klein_kernels::Linear::new(w.clone());
        let run = |cache: Option<TuningCache>| {
            let (linear, x) = (linear.clone(), x.clone());
            std::thread::spawn(move || match cache {
                Some(cache) => klein_kernels::tune_linear(&cache, || linear.forward(&x)),
                None => Ok((linear.forward(&x)?, Vec::new())),
            })
            .join()
            .expect("linear thread")
        };
        let (plain, _) = run(None)?;
        let want = candle_nn::Linear::new(w, None).forward(&x)?;
        assert_eq!(plain.dims(), want.dims());
        let rel = rel_l2(&plain, &want)?;
        println!("linear {x_dims:?} (narrowed {narrow:?}) -> {n}: rel-L2 to candle {rel:.2e}");
        assert!(rel <= BF16_ULP / 4.0, "rel-L2 {rel}");

        let (tuned, report) = run(Some(TuningCache::default()))?;
        assert_eq!(rel_l2(&tuned, &plain)?, 0.0, "tuned {x_dims:?} -> {n}");
        let mut cache = TuningCache::default();
        cache.record(&report);
        for t in &report {
            println!("linear tuned: {t}");
            assert!(!t.cached);
        }
        let (again, from_cache) = run(Some(cache))?;
        assert_eq!(rel_l2(&again, &plain)?, 0.0, "cached {x_dims:?} -> {n}");
        assert_eq!(from_cache.len(), report.len());
        for (c, t) in from_cache.iter().zip(&report) {
            println!("linear cached: {c}");
            assert!(
                c.cached && c.chosen == t.chosen && c.tile == t.tile,
                "{c} after {t}"
            );
        }
        for t in &report {
            for rank in (0..t.candidates.max(8) + 2).filter(|&r| r != t.chosen) {
                let mut stale = TuningCache::default();
                stale.record(&[klein_kernels::Tuned {
                    chosen: rank,
                    ..t.clone()
                }]);
                let (y, kept) = run(Some(stale))?;
                assert_eq!(rel_l2(&y, &plain)?, 0.0, "rank {rank} cached: {kept:?}");
                let kept = &kept[0];
                println!("linear with rank {rank} cached: {kept}");
                assert!(!kept.cached || kept.chosen == rank, "{kept}");
                assert!(rank < kept.candidates || !kept.cached, "{kept}");
            }
        }
    }
    Ok(())
}

/// `x Wᵀ + c` with c read in cuBLASLt's epilogue: within a quarter of a bf16 ulp (rel-L2) of
/// the f32 product plus c, rounded once; the shapes of a layer taking LoRA terms (the single
/// block's projection), of a term's `up` product (a rank-wide x), a narrowed x, and a 2-D x.
#[test]
fn linear_with_an_addend_matches_the_f32_sum() -> Result<()> {
    let dev = gpu();
    let cases: [LinearCase; 4] = [
        (&[1, 4608, 3072], 27648, None),
        (&[1, 4608, 64], 3072, None),
        (&[2, 9, 64], 48, Some((2, 7))),
        (&[300, 128], 200, None),
    ];
    for (x_dims, n, narrow) in cases {
        let (x, w) = linear_operands((x_dims, n, narrow), &dev)?;
        let mut c_dims = x.dims().to_vec();
        *c_dims.last_mut().expect("rank 2 or 3") = n;
        let c = randn(&c_dims, DType::BF16, &dev)?;
        let got = klein_kernels::Linear::new(w.clone()).forward_add(&x, &c)?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let want =
            (f32(&x)?.broadcast_matmul(&f32(&w)?.t()?)? + f32(&c)?)?.to_dtype(DType::BF16)?;
        let rel = rel_l2(&got, &want)?;
        println!("linear + c {x_dims:?} (narrowed {narrow:?}) -> {n}: rel-L2 {rel:.2e}");
        assert!(rel <= BF16_ULP / 4.0, "rel-L2 {rel}");
    }
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
        (1, 24, 4608, 4608, 128), // the 1024² transformer step (Hopper: 144-key tiles)
        (1, 24, 1536, 1536, 128), // the 512² step (Hopper: 128-key tiles)
        (2, 3, 37, 70, 128),      // partial tiles on both axes
        (2, 3, 1000, 1031, 128),  // several tiles, partial on both axes (Hopper: 144 keys)
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

/// Scores whose rows' maxima grow along the keys. The Hopper kernel shifts a tile's
/// exponentials by each row's running max without taking the tile's own; a tile where a row's
/// score passes that max by more than 16 (exp2 units) is computed again with the max moved, and
/// O is rescaled only when the max grows by more than 8 (the mma.sync kernel, which rescales at
/// every tile, is held to the same bound). Keys are scaled 1 … 6 along the sequence and query
/// rows 0.05 … 4 in a pattern that repeats every 64 rows (neighbouring rows far apart, so every
/// warp holds rows of both kinds): over 40 % of the rows' maxima pass the max of Hopper's first
/// key tile by more than 24 (so they take both paths), about 30 % never by more than 8 (checked
/// on the scores). Held to the unmasked kernel's bound against the f32 composition, split tiles
/// included (4 heads of 36 tiles on the SMs).
#[test]
fn growing_row_maxima_match_the_f32_composition() -> Result<()> {
    let dev = gpu();
    let scaled = |shape: &[usize], scales: Vec<f32>| -> Result<Tensor> {
        let rows = scales.len();
        randn(shape, DType::F32, &dev)?
            .broadcast_mul(&Tensor::from_vec(scales, (rows, 1), &dev)?)?
            .to_dtype(DType::BF16)
    };
    let cases = [
        (1, 4, 4608, 144), // Hopper: 144-key tiles
        (1, 4, 1536, 128), // 128-key tiles
        (2, 3, 1031, 144), // partial tiles
    ];
    for (b, h, s, first_tile) in cases {
        let hd = 128;
        let query_scale = |r: usize| 0.05 + 3.95 * (((r * 37) % 64) as f32 / 63.0).powi(2);
        let q = scaled(&[b, h, s, hd], (0..s).map(query_scale).collect())?;
        let k = scaled(
            &[b, h, s, hd],
            (0..s).map(|j| 1.0 + 5.0 * j as f32 / s as f32).collect(),
        )?;
        let v = randn(&[b, h, s, hd], DType::BF16, &dev)?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let log2_scores =
            (f32(&q)?.matmul(&f32(&k)?.t()?)? * (std::f64::consts::LOG2_E / (hd as f64).sqrt()))?;
        let first_max = log2_scores.narrow(3, 0, first_tile)?.max(D::Minus1)?;
        let growth = (log2_scores.max(D::Minus1)? - first_max)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (many, none) = (
            growth.iter().filter(|&&g| g > 24.0).count(),
            growth.iter().filter(|&&g| g <= 8.0).count(),
        );
        let rows = growth.len();
        assert!(
            many > rows / 4 && none > rows / 8,
            "{many} / {none} of {rows}"
        );
        let got = klein_kernels::flash_attention(&q, &k, &v)?;
        let want = reference::attention(&q, &k, &v)?.to_dtype(DType::F32)?;
        let rel = rel_l2(&got, &want)?;
        println!(
            "growing maxima {b}x{h}x{s}x{hd}: rel-L2 {rel:.2e} (rows growing past 3 margins {many}, past none {none}, of {rows})"
        );
        assert!(rel <= BF16_ULP, "rel-L2 {rel}");
    }
    Ok(())
}

/// The persistent kernel's split tiles count their parts in counters that each launch leaves
/// zeroed for the next (no memset between calls): launches of shapes with different split
/// plans (three split, 1×7×2000 does not), interleaved and repeated on one thread, give the same
/// bits every time. Every output is kept, so a relaunch cannot be handed a pooled buffer that
/// already holds the right values: tiles left unmerged would show.
#[test]
fn repeated_launches_give_the_same_bits() -> Result<()> {
    let dev = gpu();
    let shapes = [(1, 24, 4608), (2, 3, 1000), (1, 24, 1536), (1, 7, 2000)];
    let inputs = shapes
        .iter()
        .map(|&(b, h, s)| {
            let qkv = (0..3)
                .map(|_| randn(&[b, h, s, 128], DType::BF16, &dev))
                .collect::<Result<Vec<_>>>()?;
            let first = klein_kernels::flash_attention(&qkv[0], &qkv[1], &qkv[2])?;
            Ok((qkv, first))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut kept = Vec::new();
    for round in 0..3 {
        for ((b, h, s), (qkv, first)) in shapes.iter().zip(&inputs).rev() {
            let again = klein_kernels::flash_attention(&qkv[0], &qkv[1], &qkv[2])?;
            let differing = differing_bits(&again, first)?;
            println!("{b}x{h}x{s}, round {round}: {differing} elements differ from the first");
            assert_eq!(differing, 0, "{b}x{h}x{s}, round {round}");
            kept.push(again);
        }
    }
    Ok(())
}

/// The VAE mid block's attention in f32 (split fp16 on the tensor cores) against f64 on the CPU:
/// f32-class accuracy, where one TF32 pass would be ~3e-4. Partial tiles on both axes, two
/// heads, a peaked softmax, the tiny test VAE's width, and magnitudes far outside fp16's range
/// (the pre-pass's scaling: tiny queries, values past 65 504); candle's f32 composition on the
/// GPU (exact cuBLAS products) is printed for scale.
#[test]
fn f32_flash_attention_matches_f64() -> Result<()> {
    let (dev, cpu) = (gpu(), Device::Cpu);
    let cases = [
        (1, 1, 4096, 4096, 512, 1.0, 1.0, 1.0), // the 512² decode's mid block
        (2, 1, 1000, 1031, 512, 1.0, 1.0, 1.0),
        (1, 2, 77, 141, 512, 4.0, 1.0, 1.0),
        (2, 1, 333, 257, 32, 3.0, 1.0, 1.0),
        (1, 1, 300, 300, 512, 1e-5, 1e5, 1e5),
        (1, 1, 300, 300, 512, 1e3, 1e-3, 1e-6),
    ];
    for (b, h, s_q, s_kv, hd, q_scale, k_scale, v_scale) in cases {
        let q = (randn(&[b, h, s_q, hd], DType::F32, &dev)? * q_scale)?;
        let k = (randn(&[b, h, s_kv, hd], DType::F32, &dev)? * k_scale)?;
        let v = (randn(&[b, h, s_kv, hd], DType::F32, &dev)? * v_scale)?;
        assert!(klein_kernels::flash_attention_f32_applies(&dev, hd));
        assert!(
            !klein_kernels::flash_attention_fused(&q),
            "the f32 transformer and encoder keep their compositions"
        );
        let got = klein_kernels::flash_attention(&q, &k, &v)?;
        let f64 = |t: &Tensor| t.to_device(&cpu)?.to_dtype(DType::F64);
        let scores = (f64(&q)?.matmul(&f64(&k)?.t()?)? / (hd as f64).sqrt())?;
        let e = scores
            .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
            .exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let want = p
            .matmul(&f64(&v)?)?
            .transpose(1, 2)?
            .reshape((b, s_q, h * hd))?;
        let rel = rel_l2(&f64(&got)?, &want)?;
        let composition = rel_l2(&f64(&reference::attention(&q, &k, &v)?)?, &want)?;
        println!(
            "flash_attention f32 {b}x{h}x{s_q}x{s_kv}x{hd}: rel-L2 {rel:.2e} (f32 composition {composition:.2e})"
        );
        assert!(rel <= 1e-5, "rel-L2 {rel}");
    }
    Ok(())
}

/// The single block's layout: heads read in place from the fused projection (strided views)
/// give exactly what contiguous copies give, and `[attention | SwiGLU]` written into one buffer
/// is exactly their concatenation, batch 1 and 2.
#[test]
fn strided_heads_and_the_joint_output_change_nothing() -> Result<()> {
    let dev = gpu();
    for (b, s) in [(1, 1024 + 77), (2, 512 + 256)] {
        let SingleProjection {
            q, k, v, gate, up, ..
        } = single_projection((b, s), (24, 128, 9216), DType::BF16, &dev)?;
        let dense = |t: &Tensor| t.contiguous();
        let strided = klein_kernels::flash_attention(&q, &k, &v)?;
        let copied = klein_kernels::flash_attention(&dense(&q)?, &dense(&k)?, &dense(&v)?)?;
        assert_eq!(rel_l2(&strided, &copied)?, 0.0, "strided heads, batch {b}");
        let joint = klein_kernels::flash_attention_with_swiglu(&q, &k, &v, &gate, &up)?;
        let cat = Tensor::cat(&[copied, klein_kernels::swiglu(&gate, &up)?], D::Minus1)?;
        assert_eq!(rel_l2(&joint, &cat)?, 0.0, "joint output, batch {b}");
    }
    Ok(())
}

/// The single block with q's norm and RoPE inside the attention (Hopper: each query tile
/// normalised and rotated in shared memory as it lands) gives exactly what the norm kernel then
/// the attention give: 144- and 128-key tiles, a partial last query tile, RoPE rows from an
/// offset, batch 2.
#[test]
fn q_norm_in_the_attention_changes_nothing() -> Result<()> {
    let dev = gpu();
    let (h, hd) = (24, 128);
    for (b, s, offset) in [(1, 4608, 0), (1, 1024 + 77, 5), (2, 512 + 256, 0)] {
        let SingleProjection {
            q_rows,
            k,
            v,
            gate,
            up,
            ..
        } = single_projection((b, s), (h, hd, 9216), DType::BF16, &dev)?;
        let (cos, sin) = rope_tables(offset + s, hd, &dev)?;
        let norm = q_norm(&norm_weight(hd, DType::BF16, &dev)?, (&cos, &sin), offset);
        let got =
            klein_kernels::flash_attention_with_swiglu_norm_q(&q_rows, &norm, &k, &v, &gate, &up)?;
        let q = klein_kernels::qk_norm_rope(
            &q_rows,
            &norm.weight,
            &cos,
            &sin,
            h,
            offset,
            1e-6,
            RopeStyle::Interleaved,
        )?;
        let want = klein_kernels::flash_attention_with_swiglu(&q, &k, &v, &gate, &up)?;
        let rel = rel_l2(&got, &want)?;
        println!("q's norm in the attention, batch {b}, {s} tokens: rel-L2 {rel:.2e}");
        assert_eq!(rel, 0.0, "batch {b}, {s} tokens");
    }
    Ok(())
}

/// The double block's joint queries normalised and rotated inside Hopper's attention, each
/// stream's from its own projection with its own weight (the kernel switches Q's tensor map and
/// weight at the text/image boundary), give exactly what the joint norm kernel then the
/// attention give: the 1024² step's 512 + 4096, a batch of two, a partial last image tile, and
/// a text part that is not whole 128-row tiles (the norm kernel path).
#[test]
fn joint_q_norm_in_the_attention_changes_nothing() -> Result<()> {
    let dev = gpu();
    let (d, h, hd) = (3072, 24, 128);
    for (b, txt, img) in [(1, 512, 4096), (2, 256, 768), (1, 128, 1000), (1, 77, 300)] {
        let (p_txt, p_img) = (
            randn(&[b, txt, 3 * d], DType::BF16, &dev)?,
            randn(&[b, img, 3 * d], DType::BF16, &dev)?,
        );
        let cols = |p: &Tensor, i: usize| p.narrow(D::Minus1, i * d, d);
        let values = |p: &Tensor| -> Result<Tensor> {
            let rows = p.dim(1)?;
            p.reshape((b, rows, 3 * d / hd, hd))?
                .narrow(2, 2 * h, h)?
                .transpose(1, 2)
        };
        let (cos, sin) = rope_tables(txt + img, hd, &dev)?;
        let weight = || norm_weight(hd, DType::BF16, &dev);
        let (w_txt, w_img, wk_txt, wk_img) = (weight()?, weight()?, weight()?, weight()?);
        let joint = |i: usize, w_a: &Tensor, w_b: &Tensor| {
            klein_kernels::qk_norm_rope_joint(
                (&cols(&p_txt, i)?, w_a),
                (&cols(&p_img, i)?, w_b),
                &cos,
                &sin,
                h,
                1e-6,
            )
        };
        let k = joint(1, &wk_txt, &wk_img)?;
        let (v_txt, v_img) = (values(&p_txt)?, values(&p_img)?);
        let norm = q_norm(&w_txt, (&cos, &sin), 0);
        let got = klein_kernels::flash_attention_split_v_norm_q(
            &cols(&p_txt, 0)?,
            &norm,
            &cols(&p_img, 0)?,
            &w_img,
            &k,
            &v_txt,
            &v_img,
        )?;
        let q = joint(0, &w_txt, &w_img)?;
        let want = klein_kernels::flash_attention_split_v(&q, &k, &v_txt, &v_img)?;
        let rel = rel_l2(&got, &want)?;
        println!(
            "joint q's norm in the attention, batch {b}, {txt} + {img} tokens: rel-L2 {rel:.2e}"
        );
        assert_eq!(rel, 0.0, "batch {b}, {txt} + {img} tokens");
    }
    Ok(())
}

/// The double block's values read in place from two projections (text rows, then image rows;
/// Hopper's kernel switches tensor maps at the 512-key boundary, loading the key tile across it
/// in 16-row strips: 144-key tiles at the 1024² step's 4608 keys, 128-key ones elsewhere) give
/// exactly what their concatenation gives; a first part that is not whole strips (77 rows)
/// takes the concatenation.
#[test]
fn split_values_change_nothing() -> Result<()> {
    let dev = gpu();
    let (d, h, hd) = (3072, 24, 128);
    for (b, txt, img) in [
        (1, 512, 4096),
        (1, 512, 1024 + 77),
        (2, 512, 256),
        (1, 77, 300),
        (1, 64, 300),
        (1, 48, 300),
    ] {
        let s = txt + img;
        let q = randn(&[b, h, s, hd], DType::BF16, &dev)?;
        let k = randn(&[b, h, s, hd], DType::BF16, &dev)?;
        let values = |rows: usize| -> Result<Tensor> {
            randn(&[b, rows, 3 * d], DType::BF16, &dev)?
                .reshape((b, rows, 3 * d / hd, hd))?
                .narrow(2, 2 * h, h)?
                .transpose(1, 2)
        };
        let (v_txt, v_img) = (values(txt)?, values(img)?);
        let got = klein_kernels::flash_attention_split_v(&q, &k, &v_txt, &v_img)?;
        let want = klein_kernels::flash_attention(&q, &k, &Tensor::cat(&[&v_txt, &v_img], 2)?)?;
        assert_eq!(rel_l2(&got, &want)?, 0.0, "batch {b}, {txt} + {img} keys");
    }
    Ok(())
}

/// Grouped-query, causal, key-padded attention (Qwen3) on bf16 inputs against the f32
/// composition, held to the same bound as the unmasked kernel.
#[test]
fn masked_attention_matches_the_f32_composition() -> Result<()> {
    let dev = gpu();
    // (batch, heads, kv heads, length, real tokens per item, head dim, causal)
    let cases = [
        (2, 32, 8, 512, [300, 512], 128, true), // Qwen3-4B, a padded and a full prompt
        (2, 6, 2, 77, [20, 77], 64, true),      // partial tiles
        (2, 4, 4, 141, [141, 100], 32, false),  // key padding alone
    ];
    for (b, h, h_kv, l, lens, hd, causal) in cases {
        let mask = Tensor::from_iter(
            lens.iter()
                .flat_map(|&n| (0..l as u32).map(move |j| u32::from(j < n as u32))),
            &dev,
        )?
        .reshape((b, l))?;
        let q = randn(&[b, h, l, hd], DType::BF16, &dev)?;
        let k = randn(&[b, h_kv, l, hd], DType::BF16, &dev)?;
        let v = randn(&[b, h_kv, l, hd], DType::BF16, &dev)?;
        assert!(klein_kernels::flash_attention_fused(&q));
        let got = klein_kernels::masked_attention(&q, &k, &v, &mask, causal)?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let want = reference::masked_attention(&f32(&q)?, &f32(&k)?, &f32(&v)?, &mask, causal)?;
        let rel = rel_l2(&got, &want)?;
        println!("masked_attention {b}x{h}/{h_kv}x{l}x{hd} causal {causal}: rel-L2 {rel:.2e}");
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

/// A tiled decode's group norm in halves at decoder shapes: the moments over a tile's own part
/// (f32 partial sums combined in f64, against the f64 composition) and the per-channel affine
/// with SiLU (the composition's roundings; f32 within one FMA rounding).
#[test]
fn group_moments_and_channel_affine_match_the_composition() -> Result<()> {
    let dev = gpu();
    for (shape, rows, cols) in [
        ([1, 128, 512, 512], (64, 448), (0, 512)),
        ([2, 512, 64, 96], (0, 64), (17, 80)),
    ] {
        let x = ((randn(&shape, DType::F32, &dev)? * 2.0)? + 1.0)?;
        for x in [x.clone(), x.to_dtype(DType::BF16)?] {
            let got = klein_kernels::group_moments(&x, 32, rows, cols)?;
            let want = reference::group_moments(&x, 32, rows, cols)?;
            let rel = rel_l2(&got, &want)?;
            println!("group_moments {:?} {shape:?}: rel-L2 {rel:.2e}", x.dtype());
            assert!(rel <= 1e-6, "rel-L2 {rel}");
        }
        let scale = randn(&[shape[0], shape[1]], DType::F32, &dev)?;
        let shift = randn(&[shape[0], shape[1]], DType::F32, &dev)?;
        let got = klein_kernels::channel_affine(&x, &scale, &shift, true)?;
        let want = reference::channel_affine(&x, &scale, &shift, true)?;
        let rel = rel_l2(&got, &want)?;
        println!("channel_affine f32 {shape:?}: rel-L2 {rel:.2e}");
        assert!(rel <= 1e-6, "rel-L2 {rel}");
        let x = x.to_dtype(DType::BF16)?;
        check_elementwise(
            &format!("channel_affine bf16 {shape:?}"),
            &klein_kernels::channel_affine(&x, &scale, &shift, true)?,
            &reference::channel_affine(&x, &scale, &shift, true)?,
        )?;
    }
    Ok(())
}

/// The cuDNN convolution at each precision against an f64 CPU convolution: exact and split
/// TF32 at f32 accuracy, one TF32 pass visibly less (which also shows its passes do run on the
/// tensor cores: `NVIDIA_TF32_OVERRIDE=0` would make all three equal). Weights random f32 (three
/// split passes) and bf16-valued (exact in TF32: two passes).
#[cfg(feature = "cudnn")]
#[test]
fn cudnn_convolution_precisions_match_f64() -> Result<()> {
    use klein_kernels::{Conv, ConvPrecision, ConvWeights};
    let (dev, cpu) = (gpu(), Device::Cpu);
    // (x shape, c_out, kernel, padding, stride, residual); the last two take the transposes'
    // one-value-per-access path (odd channels, odd pixel counts).
    let cases = [
        ([1, 128, 64, 64], 128, 3, 1, 1, true),
        ([2, 64, 33, 40], 96, 3, 0, 2, false),
        ([1, 256, 48, 48], 128, 1, 0, 1, true),
        ([1, 3, 15, 17], 5, 3, 1, 1, true),
        ([2, 32, 15, 17], 64, 3, 1, 1, true),
    ];
    for (shape, c_out, k, padding, stride, with_residual) in cases {
        let x = randn(&shape, DType::F32, &dev)?;
        let scale = 1.0 / ((shape[1] * k * k) as f64).sqrt();
        let w32 = (randn(&[c_out, shape[1], k, k], DType::F32, &dev)? * scale)?;
        let bias = randn(&[c_out], DType::F32, &dev)?;
        let out_len = |n: usize| (n + 2 * padding - k) / stride + 1;
        let out_shape = [shape[0], c_out, out_len(shape[2]), out_len(shape[3])];
        let residual = with_residual
            .then(|| randn(&out_shape, DType::F32, &dev))
            .transpose()?;
        let w_bf16 = w32.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        for (kind, w) in [("f32 weights", &w32), ("bf16-valued weights", &w_bf16)] {
            let f64 = |t: &Tensor| t.to_device(&cpu)?.to_dtype(DType::F64);
            let mut want = f64(&x)?.conv2d(&f64(w)?, padding, stride, 1, 1)?;
            want = want.broadcast_add(&f64(&bias)?.reshape((1, c_out, 1, 1))?)?;
            if let Some(r) = &residual {
                want = (want + f64(r)?)?;
            }
            let mut errors = Vec::new();
            for precision in [
                ConvPrecision::Exact,
                ConvPrecision::Tf32,
                ConvPrecision::SplitTf32,
            ] {
                let weights = ConvWeights::new(w.clone(), bias.clone(), precision)?;
                if precision == ConvPrecision::SplitTf32 {
                    assert_eq!(weights.weight_lo.is_none(), kind != "f32 weights", "{kind}");
                }
                let conv = Conv {
                    padding,
                    stride,
                    precision,
                    algo: Some(candle_core::conv::CudnnFwdAlgo::ImplicitPrecompGemm),
                };
                let got = klein_kernels::conv2d(&x, &weights, residual.as_ref(), conv)?;
                let err = rel_l2(&got.to_device(&cpu)?.to_dtype(DType::F64)?, &want)?;
                println!("conv {shape:?} → {out_shape:?}, {kind}, {precision:?}: rel-L2 {err:.2e}");
                errors.push(err);
            }
            let (exact, tf32, split) = (errors[0], errors[1], errors[2]);
            assert!(
                exact <= 1e-6 && split <= 2e-6,
                "{kind}: exact {exact}, split {split}"
            );
            // cuDNN runs 3 input channels on FMA kernels even under TF32 math (exact there).
            if shape[1] > 3 {
                assert!(tf32 >= 10.0 * split, "{kind}: TF32 {tf32} vs split {split}");
            }
        }
    }
    Ok(())
}

/// `ConvWeights::derived_bytes` is what `ConvWeights::new` keeps beside the weight: the low
/// part of a weight not exact in TF32 under split TF32, nothing for one that is (bf16 values)
/// or at one TF32 pass.
#[cfg(feature = "cudnn")]
#[test]
fn derived_bytes_are_the_low_part_kept() -> Result<()> {
    use klein_kernels::{ConvPrecision, ConvWeights};
    let dev = gpu();
    let w = (randn(&[48, 64, 3, 3], DType::F32, &dev)? * 0.04)?;
    let exact = w.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
    let b = randn(&[48], DType::F32, &dev)?;
    for (weight, precision) in [
        (&w, ConvPrecision::SplitTf32),
        (&exact, ConvPrecision::SplitTf32),
        (&w, ConvPrecision::Tf32),
    ] {
        let kept = ConvWeights::new(weight.clone(), b.clone(), precision)?
            .weight_lo
            .map_or(0, |lo| lo.elem_count() * 4) as u64;
        assert_eq!(ConvWeights::derived_bytes(weight, precision)?, kept);
    }
    assert_eq!(
        ConvWeights::derived_bytes(&w, ConvPrecision::SplitTf32)?,
        48 * 64 * 9 * 4
    );
    Ok(())
}

/// A convolution's prologue inside cuDNN's NHWC transpose (a group norm's affine + SiLU) gives
/// exactly what the convolution of the composed input gives, at both TF32 precisions; the group
/// norm's affine applied alone is the group norm, bit for bit.
#[cfg(feature = "cudnn")]
#[test]
fn a_fused_prologue_changes_nothing() -> Result<()> {
    use klein_kernels::{Conv, ConvPrecision, ConvWeights, Prologue};
    let dev = gpu();
    let x = ((randn(&[2, 64, 33, 40], DType::F32, &dev)? * 2.0)? + 1.0)?;
    let weight = ((randn(&[64], DType::F32, &dev)? * 0.3)? + 1.0)?;
    let bias = randn(&[64], DType::F32, &dev)?;
    let (scale, shift) = klein_kernels::group_norm_affine(&x, &weight, &bias, 32, 1e-6)?;
    let normed = klein_kernels::channel_affine(&x, &scale, &shift, true)?;
    let norm = klein_kernels::group_norm(&x, &weight, &bias, 32, 1e-6, true)?;
    assert_eq!(rel_l2(&normed, &norm)?, 0.0, "the affine is the norm's");
    let w32 = (randn(&[48, 64, 3, 3], DType::F32, &dev)? * 0.04)?;
    let b = randn(&[48], DType::F32, &dev)?;
    for precision in [ConvPrecision::Tf32, ConvPrecision::SplitTf32] {
        let w = ConvWeights::new(w32.clone(), b.clone(), precision)?;
        let conv = Conv {
            padding: 1,
            stride: 1,
            precision,
            algo: Some(candle_core::conv::CudnnFwdAlgo::ImplicitPrecompGemm),
        };
        let prologue = Prologue {
            affine: Some((scale.clone(), shift.clone(), true)),
        };
        let got = klein_kernels::conv2d_with(&x, &w, None, conv, &prologue)?;
        let want = klein_kernels::conv2d(&prologue.apply(&x)?, &w, None, conv)?;
        assert_eq!(got.dims(), want.dims());
        let diff = rel_l2(&got, &want)?;
        println!("conv prologue {precision:?}: rel-L2 {diff:.2e}");
        assert_eq!(diff, 0.0, "{precision:?}");
    }
    Ok(())
}

/// A TF32 convolution in bands of output rows (`conv2d_banded`: each band transposes the input
/// rows it reads, through the prologue, and writes its rows of the output with the residual's)
/// gives what the whole convolution gives, for 3×3 (padding 1) and 1×1 filters, bands of one
/// row, several uneven ones and all rows, even and odd widths, at both TF32 precisions; split
/// TF32 stays at f32 accuracy against f64.
#[cfg(feature = "cudnn")]
#[test]
fn banded_convolutions_change_nothing() -> Result<()> {
    use klein_kernels::{Conv, ConvPrecision, ConvWeights, Prologue};
    let (dev, cpu) = (gpu(), Device::Cpu);
    for (shape, c_out, k, bands) in [
        ([1, 64, 37, 40], 48, 3, [1, 5, 16, 37]),
        ([2, 32, 19, 29], 32, 3, [2, 7, 18, 19]),
        ([1, 96, 21, 18], 64, 1, [1, 4, 20, 21]),
    ] {
        let padding = k / 2;
        let x = ((randn(&shape, DType::F32, &dev)? * 2.0)? + 1.0)?;
        let gamma = ((randn(&[shape[1]], DType::F32, &dev)? * 0.3)? + 1.0)?;
        let beta = randn(&[shape[1]], DType::F32, &dev)?;
        let (scale, shift) = klein_kernels::group_norm_affine(&x, &gamma, &beta, 32, 1e-6)?;
        let prologue = Prologue {
            affine: Some((scale, shift, true)),
        };
        let w32 = (randn(&[c_out, shape[1], k, k], DType::F32, &dev)?
            * (1.0 / ((shape[1] * k * k) as f64).sqrt()))?;
        let bias = randn(&[c_out], DType::F32, &dev)?;
        let residual = randn(&[shape[0], c_out, shape[2], shape[3]], DType::F32, &dev)?;
        let f64 = |t: &Tensor| t.to_device(&cpu)?.to_dtype(DType::F64);
        let want = f64(&prologue.apply(&x)?)?
            .conv2d(&f64(&w32)?, padding, 1, 1, 1)?
            .broadcast_add(&f64(&bias)?.reshape((1, c_out, 1, 1))?)?;
        let want = (want + f64(&residual)?)?;
        for precision in [ConvPrecision::Tf32, ConvPrecision::SplitTf32] {
            let w = ConvWeights::new(w32.clone(), bias.clone(), precision)?;
            let conv = Conv {
                padding,
                stride: 1,
                precision,
                algo: Some(candle_core::conv::CudnnFwdAlgo::ImplicitPrecompGemm),
            };
            assert!(klein_kernels::conv_banded(&x, &w, conv));
            let whole = klein_kernels::conv2d_with(&x, &w, Some(&residual), conv, &prologue)?;
            for rows in bands {
                let got =
                    klein_kernels::conv2d_banded(&x, &w, Some(&residual), conv, &prologue, rows)?;
                assert_eq!(got.dims(), whole.dims());
                let diff = rel_l2(&got, &whole)?;
                let err = rel_l2(&f64(&got)?, &want)?;
                println!(
                    "banded conv {shape:?} k{k} {precision:?}, bands of {rows}: rel-L2 {diff:.2e} \
                     against the whole, {err:.2e} against f64"
                );
                assert!(
                    diff <= 1e-6,
                    "{shape:?} {precision:?} bands of {rows}: {diff}"
                );
                if precision == ConvPrecision::SplitTf32 {
                    assert!(err <= 2e-6, "{shape:?} bands of {rows}: {err} against f64");
                }
            }
        }
    }
    Ok(())
}

/// A ×2 upsampling and 3×3 convolution as four 2×2 phase convolutions over the small input
/// (`upsample_conv2d`, the phases built from the NHWC split weights) against the upsampled
/// convolution in f64: split TF32 at f32 accuracy, for random f32 and bf16-valued weights
/// (both take the third pass), on the phase-interleaving transpose (even C_out) and the
/// composition (odd C_out); in bands of x's rows, what the whole gives.
#[cfg(feature = "cudnn")]
#[test]
fn upsampling_phases_match_f64() -> Result<()> {
    use klein_kernels::{Conv, ConvPrecision, ConvWeights};
    let (dev, cpu) = (gpu(), Device::Cpu);
    for (shape, c_out) in [
        ([1, 64, 33, 40], 64),
        ([2, 32, 15, 17], 48),
        ([1, 16, 8, 9], 5),
    ] {
        let x = randn(&shape, DType::F32, &dev)?;
        let scale = 1.0 / ((shape[1] * 9) as f64).sqrt();
        let w32 = (randn(&[c_out, shape[1], 3, 3], DType::F32, &dev)? * scale)?;
        let bias = randn(&[c_out], DType::F32, &dev)?;
        let w_bf16 = w32.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let (h, w) = (shape[2], shape[3]);
        for (kind, weight) in [("f32 weights", &w32), ("bf16-valued weights", &w_bf16)] {
            let f64 = |t: &Tensor| t.to_device(&cpu)?.to_dtype(DType::F64);
            let up = f64(&x)?.upsample_nearest2d(2 * h, 2 * w)?;
            let want = up
                .conv2d(&f64(weight)?, 1, 1, 1, 1)?
                .broadcast_add(&f64(&bias)?.reshape((1, c_out, 1, 1))?)?;
            let conv = Conv {
                padding: 1,
                stride: 1,
                precision: ConvPrecision::SplitTf32,
                algo: Some(candle_core::conv::CudnnFwdAlgo::ImplicitPrecompGemm),
            };
            let whole = ConvWeights::new(weight.clone(), bias.clone(), ConvPrecision::SplitTf32)?;
            let phases = whole.upsampling_phases()?;
            let got = klein_kernels::upsample_conv2d(&x, &phases, conv)?;
            assert_eq!(got.dims(), want.dims());
            let err = rel_l2(&got.to_device(&cpu)?.to_dtype(DType::F64)?, &want)?;
            let upsampled = x.upsample_nearest2d(2 * h, 2 * w)?;
            let plain = klein_kernels::conv2d(&upsampled, &whole, None, conv)?;
            let plain_err = rel_l2(&plain.to_device(&cpu)?.to_dtype(DType::F64)?, &want)?;
            println!(
                "upsampling phases {shape:?} → {c_out}, {kind}: rel-L2 {err:.2e} \
                 (upsampled convolution {plain_err:.2e})"
            );
            assert!(err <= 2e-6, "{shape:?} {kind}: {err}");
            // In bands of x's rows (one, uneven, all), each writing its output rows.
            for rows in [1, 3, 7, h] {
                let banded = klein_kernels::upsample_conv2d_banded(&x, &phases, conv, rows)?;
                assert_eq!(banded.dims(), got.dims());
                let diff = rel_l2(&banded, &got)?;
                println!("  in bands of {rows} rows: rel-L2 {diff:.2e} against the whole");
                assert!(diff <= 1e-6, "{shape:?} {kind} bands of {rows}: {diff}");
            }
        }
    }
    Ok(())
}

/// A padded band is a copy: bit-identical to the composition, f32 and bf16.
#[test]
fn pad_rows_equals_the_composition() -> Result<()> {
    use klein_kernels::PadRows;
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        let x = randn(&[2, 5, 37, 29], dtype, &dev)?;
        for (row0, rows, top, bottom) in [(0, 12, 1, 0), (11, 14, 0, 0), (25, 12, 0, 2)] {
            let pad = PadRows {
                row0,
                rows,
                top,
                bottom,
                left: 1,
                right: 1,
            };
            let got = klein_kernels::pad_rows(&x, pad)?;
            let want = reference::pad_rows(&x, pad)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dtype:?} {pad:?}");
        }
    }
    Ok(())
}

/// The decoder output's u8 quantization: the kernel gives exactly the CPU reference's bytes,
/// f32 and bf16, values beyond [-1, 1] included.
#[test]
fn rgb_u8_equals_the_cpu_reference() -> Result<()> {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        let x = (randn(&[2, 3, 37, 53], dtype, &dev)? * 0.7)?;
        let got = klein_kernels::rgb_u8(&x)?.to_device(&Device::Cpu)?;
        let want = klein_kernels::rgb_u8(&x.to_device(&Device::Cpu)?)?;
        assert_eq!(got.dims(), [2, 37, 53, 3]);
        assert_eq!(
            got.flatten_all()?.to_vec1::<u8>()?,
            want.flatten_all()?.to_vec1::<u8>()?,
            "{dtype:?}"
        );
    }
    Ok(())
}

/// Every element's bits, whatever the dtype.
fn element_bits(t: &Tensor) -> Result<Vec<u64>> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?.into_iter().map(u64::from).collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|x| x.to_bits().into())
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits().into())
            .collect(),
        other => candle_core::bail!("element_bits: {other:?}"),
    })
}

/// The staged uploads (`klein_kernels::upload`) hold the bytes candle's pageable copy holds:
/// tensors of each size against the 1 MiB pieces and the two 16 MiB page-locked buffers (none,
/// part of a piece, 40 MB: each buffer reused while the transfers before may run), read from an
/// unaligned source and queued back to back before any is read; a host view with an offset;
/// and ggml blocks.
#[test]
fn staged_uploads_hold_the_host_bytes() -> Result<()> {
    use klein_kernels::upload;
    let dev = gpu();
    let host: Vec<u8> = (0..40_000_001u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let cases = [
        (0, DType::U8),
        (4096 * 4, DType::F32),
        ((1 << 20) - 2, DType::BF16),
        (40_000_000, DType::F32),
        (33_554_432, DType::U8),
    ];
    let mut staged = Vec::new();
    for (len, dtype) in cases {
        let bytes = &host[1..1 + len];
        let n = len / dtype.size_in_bytes();
        staged.push(upload::tensor_from_bytes(bytes, dtype, n, &dev)?);
    }
    for ((len, dtype), got) in cases.into_iter().zip(&staged) {
        let n = len / dtype.size_in_bytes();
        let want = Tensor::from_raw_buffer(&host[1..1 + len], dtype, &[n], &dev)?;
        assert!(got.device().same_device(&dev));
        assert_eq!(got.dtype(), dtype);
        let (got, want) = (element_bits(got)?, element_bits(&want)?);
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{len} bytes of {dtype:?}: {differ} elements differ"
        );
    }

    let grid = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((4, 6))?;
    let rows = grid.narrow(0, 1, 2)?;
    let moved = upload::to_device(&rows, &dev)?;
    assert!(moved.device().same_device(&dev));
    assert_eq!(
        moved.to_vec2::<f32>()?,
        rows.to_vec2::<f32>()?,
        "a view from its offset"
    );

    let q4k = &host[3..3 + 144 * 1000];
    let blocks = upload::blocks(q4k, candle_core::quantized::GgmlDType::Q4K, &dev)?;
    let q = QTensor::new(blocks, (1000, 256))?;
    assert!(q.device().same_device(&dev));
    assert!(*q.data()? == *q4k, "ggml blocks");
    Ok(())
}
