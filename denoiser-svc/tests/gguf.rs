//! GGUF transformers as ComfyUI-GGUF and stable-diffusion.cpp write them: the BFL names (here
//! under `model.diffusion_model.`), `general.architecture` "flux", each tensor in its own ggml
//! type. The tiny fixture is written so here:
//! - every tensor in F32: the same model as the diffusers folder, bit for bit, so the diffusers
//!   golden holds;
//! - the projections in Q8_0, Q4_0, Q5_0 and Q4_1 blocks (one left in BF16), a modulation in
//!   Q8_0, the time embedding in Q4_K, other 2-D tensors in BF16 / F16, 1-D ones in F32
//!   (ComfyUI-GGUF's rule): exactly the dense model of the dequantized weights, in f32 and
//!   bf16, with the stored blocks used as they are (a `--quantize` setting reaches only the
//!   projection stored dense) and counted in the weight bytes.

mod bfl_layout;
mod golden_forward;

use std::collections::HashMap;

use bfl_layout::{TempFile, temp, write_gguf};
use candle_core::{DType, Device, Tensor, quantized::GgmlDType};
use denoiser_svc::{
    model::{
        AttentionConfig, Flux2Transformer2DModel,
        bfl::{PREFIX, is_projection},
    },
    weights::{Checkpoint, Format},
};
use golden_forward::Outputs;
use klein_kernels::quant::{QuantFormat, Quantize, quantize_rows, stored_bytes};
use klein_test_support::{golden, pipeline_dir, rel_l2, take, test_device};

/// The projection left in BF16 in the mixed file.
const DENSE_PROJECTION: &str = "single_blocks.1.linear2.weight";

/// The type the mixed file stores BFL tensor `name` (shape `dims`) in.
fn mixed_type(name: &str, dims: &[usize], projection_index: &mut usize) -> GgmlDType {
    if dims.len() == 1 {
        return GgmlDType::F32;
    }
    if is_projection(name) {
        if name == DENSE_PROJECTION {
            return GgmlDType::BF16;
        }
        let formats = [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4_1,
        ];
        *projection_index += 1;
        return formats[*projection_index % formats.len()];
    }
    match name {
        "double_stream_modulation_img.lin.weight" => GgmlDType::Q8_0,
        // 256 wide: a k-quant's super-block.
        "time_in.in_layer.weight" => GgmlDType::Q4K,
        "txt_in.weight" => GgmlDType::F16,
        _ => GgmlDType::BF16,
    }
}

fn run(m: &Flux2Transformer2DModel, dtype: DType) -> Outputs {
    golden_forward::run("transformer_forward", m, dtype)
}

fn load(checkpoint: &Checkpoint, dtype: DType) -> Flux2Transformer2DModel {
    checkpoint
        .load(dtype, &test_device(), AttentionConfig::default())
        .unwrap()
}

fn assert_same(got: &Outputs, want: &Outputs, what: &str) {
    let pairs = [
        (&got.plain, &want.plain),
        (&got.refs, &want.refs),
        (&got.noisy, &want.noisy),
    ];
    for (g, w) in pairs {
        let diff = (g - w)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap();
        assert_eq!(diff, 0.0, "{what}");
    }
}

#[test]
fn an_f32_gguf_is_the_diffusers_model() {
    let file = temp("tiny-f32.gguf");
    let tensors = bfl_layout::tensors();
    write_gguf(&file, &tensors, PREFIX, |_, _| GgmlDType::F32);
    let gguf = Checkpoint::locate(&file.0).unwrap();
    let diffusers = Checkpoint::locate(&pipeline_dir("tiny-klein-4b")).unwrap();
    assert_eq!(gguf.format, Format::Gguf);
    assert_eq!(gguf.is_distilled, None);
    assert_eq!(gguf.config.stored_projections().count(), 0);
    let mut config = gguf.config.clone();
    config.stored = None;
    assert_eq!(config, diffusers.config, "config derived from the shapes");
    assert_eq!(
        gguf.weight_bytes(DType::BF16),
        diffusers.weight_bytes(DType::BF16)
    );

    let got = run(&load(&gguf, DType::F32), DType::F32);
    let want = run(&load(&diffusers, DType::F32), DType::F32);
    assert_same(&got, &want, "f32 GGUF against the diffusers folder");
    let g = golden("transformer_forward");
    let e = rel_l2(&got.plain, take(&g, "output.f32"));
    let e_ref = rel_l2(&got.refs, take(&g, "ref.output.f32"));
    println!("f32 GGUF forward rel-L2 {e:.3e}, with references {e_ref:.3e}");
    assert!(e <= 1e-4 && e_ref <= 1e-4, "{e} {e_ref}");
}

#[test]
fn a_quantized_gguf_is_the_dense_model_of_its_dequantized_weights() {
    let file = temp("tiny-mixed.gguf");
    let tensors = bfl_layout::tensors();
    let mut index = 0;
    let stored = write_gguf(&file, &tensors, "", |name, dims| {
        mixed_type(name, dims, &mut index)
    });
    let gguf = Checkpoint::locate(&file.0).unwrap();
    assert_eq!(gguf.format, Format::Gguf);

    // Every projection but one is stored in blocks, and the projections are what the model's
    // configuration lists.
    let cfg = &gguf.config;
    let projections: usize = cfg.projections().iter().map(|&(c, r, w)| c * r * w).sum();
    let is_proj: usize = tensors
        .iter()
        .filter(|(n, _)| is_projection(n))
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(is_proj, projections);
    let proj_count = tensors.keys().filter(|n| is_projection(n)).count();
    assert_eq!(cfg.stored_projections().count(), proj_count - 1);

    // Weight bytes: the stored blocks, and the model dtype for everything else.
    let blocks: usize = stored
        .iter()
        .filter(|(n, q)| is_projection(n) && q.dtype() != GgmlDType::BF16)
        .map(|(_, q)| stored_bytes(q.dtype(), q.shape().elem_count()))
        .sum();
    let rest: usize = stored
        .iter()
        .filter(|(n, q)| !is_projection(n) || q.dtype() == GgmlDType::BF16)
        .map(|(_, q)| q.shape().elem_count() * 4)
        .sum();
    assert_eq!(gguf.weight_bytes(DType::F32), (blocks + rest) as u64);

    // The dense model of the dequantized weights, as a BFL single file; with `quantize`, its
    // one dense projection quantized too.
    let dequantized = |quantize: Quantize| -> TempFile {
        let dev = candle_core::Device::Cpu;
        let weights: HashMap<String, Tensor> = stored
            .iter()
            .map(|(name, q)| {
                let t = q.dequantize(&dev).unwrap();
                let t = match quantize.format() {
                    Some(f) if name == DENSE_PROJECTION => quantize_rows(&t, f.ggml(), &dev)
                        .and_then(|q| q.dequantize(&dev))
                        .unwrap(),
                    _ => t,
                };
                (name.clone(), t)
            })
            .collect();
        let path = temp(&format!("tiny-dequantized-{quantize:?}.safetensors"));
        candle_core::safetensors::save(&weights, &path.0).unwrap();
        path
    };
    for quantize in [Quantize::None, Quantize::Format(QuantFormat::Q4_0)] {
        let dense_file = dequantized(quantize);
        let dense = Checkpoint::locate(&dense_file.0).unwrap();
        let gguf = gguf.clone().with_quantize(quantize);
        for dtype in [DType::F32, DType::BF16] {
            let got = run(&load(&gguf, dtype), dtype);
            let want = run(&load(&dense, dtype), dtype);
            assert_same(&got, &want, &format!("{quantize:?} {dtype:?}"));
        }
        let g = golden("transformer_forward");
        let from_golden = rel_l2(
            &run(&load(&gguf, DType::F32), DType::F32).plain,
            take(&g, "output.f32"),
        );
        println!("mixed GGUF, quantize {quantize:?}: rel-L2 to the f32 golden {from_golden:.3e}");
        assert!(from_golden > 1e-4 && from_golden < 0.2, "{from_golden}");
    }
}

#[test]
fn a_gguf_without_the_bfl_names_is_refused() {
    let file = temp("tiny-diffusers-names.gguf");
    let src = pipeline_dir("tiny-klein-4b").join("transformer/diffusion_pytorch_model.safetensors");
    let diffusers = candle_core::safetensors::load(&src, &candle_core::Device::Cpu).unwrap();
    write_gguf(&file, &diffusers, "", |_, _| GgmlDType::F32);
    let err = Checkpoint::locate(&file.0).unwrap_err().to_string();
    assert!(err.contains("BFL"), "{err}");
}

/// `write_gguf` (what `klein quantize` runs) writes the diffusers folder and the BFL single file
/// alike, and the file loads to exactly the model that quantizing at load time gives.
#[test]
fn a_written_gguf_is_the_model_quantized_at_load_time() {
    use denoiser_svc::gguf::write_gguf;

    let diffusers = Checkpoint::locate(&pipeline_dir("tiny-klein-4b")).unwrap();
    let bfl_file = temp("tiny-bfl.safetensors");
    candle_core::safetensors::save(&bfl_layout::tensors(), &bfl_file.0).unwrap();
    let bfl = Checkpoint::locate(&bfl_file.0).unwrap();
    let (from_diffusers, from_bfl) = (temp("written-a.gguf"), temp("written-b.gguf"));
    let format = QuantFormat::Q8_0;
    let cpu = Device::Cpu;
    let written = write_gguf(&diffusers, format, &from_diffusers.0, &cpu).unwrap();
    assert_eq!(
        write_gguf(&bfl, format, &from_bfl.0, &cpu).unwrap(),
        written
    );
    let proj_count = bfl_layout::tensors()
        .keys()
        .filter(|n| is_projection(n))
        .count();
    assert_eq!(written.quantized, proj_count);
    assert_eq!(
        std::fs::read(&from_diffusers.0).unwrap(),
        std::fs::read(&from_bfl.0).unwrap()
    );
    assert!(
        write_gguf(
            &Checkpoint::locate(&from_bfl.0).unwrap(),
            format,
            &temp("x").0,
            &cpu
        )
        .is_err()
    );

    let gguf = Checkpoint::locate(&from_diffusers.0).unwrap();
    let at_load = diffusers.with_quantize(Quantize::Format(format));
    assert_eq!(
        gguf.weight_bytes(DType::BF16),
        at_load.weight_bytes(DType::BF16)
    );
    let got = run(&load(&gguf, DType::F32), DType::F32);
    let want = run(&load(&at_load, DType::F32), DType::F32);
    assert_same(&got, &want, "written q8_0 GGUF against q8_0 at load time");
}
