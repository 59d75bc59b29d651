//! A BFL single-file checkpoint (fused qkv, (shift, scale) final layer, BFL names) loads to
//! the same model as the diffusers folder: the tiny fixture is rewritten in BFL layout and both
//! must give the same forward, bit for bit; an fp8 file is the model of its scaled weights.

mod bfl_layout;

use candle_core::{DType, Device, Tensor};
use denoiser_svc::{
    model::{AttentionConfig, Flux2Transformer2DModel, grid_ids, text_ids},
    weights::{Checkpoint, Format, TransformerSource},
};
use klein_runtime::models::ModelSource;
use klein_test_support::pipeline_dir;

/// The tiny diffusers transformer saved as a BFL single file.
fn bfl_file() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("denoiser-bfl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flux-2-klein-tiny.safetensors");
    candle_core::safetensors::save(&bfl_layout::tensors(), &path).unwrap();
    path
}

#[test]
fn bfl_single_file_loads_to_the_same_model() {
    let path = bfl_file();
    let bfl = Checkpoint::locate(&path).unwrap();
    let diffusers = Checkpoint::locate(&pipeline_dir("tiny-klein-4b")).unwrap();
    assert_eq!(bfl.format, Format::Bfl);
    assert_eq!(
        bfl.config, diffusers.config,
        "config derived from the BFL shapes"
    );
    assert_eq!(bfl.is_distilled, None);
    assert_eq!(diffusers.is_distilled, Some(true));

    let dev = Device::Cpu;
    let a = bfl
        .load(DType::F32, &dev, AttentionConfig::default())
        .unwrap();
    let b = diffusers
        .load(DType::F32, &dev, AttentionConfig::default())
        .unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 6, 128), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 512, 192), &dev).unwrap();
    let mut ids = text_ids(512);
    ids.extend(grid_ids(0, 2, 3));
    let rope = a.rope(&ids, &dev).unwrap();
    let ya = a.forward(&x, &ctx, &[640.0], &rope).unwrap();
    let yb = b.forward(&x, &ctx, &[640.0], &rope).unwrap();
    assert_eq!(ya.to_vec3::<f32>().unwrap(), yb.to_vec3::<f32>().unwrap());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_single_file_that_is_not_bfl_is_refused() {
    let src = pipeline_dir("tiny-klein-4b").join("transformer/diffusion_pytorch_model.safetensors");
    let err = Checkpoint::locate(&src).unwrap_err().to_string();
    assert!(err.contains("BFL"), "{err}");
}

/// A BFL fp8 file as BFL and ComfyUI ship them (here under ComfyUI's `model.diffusion_model.`
/// prefix): the projections in float8 e4m3 with a per-tensor `weight_scale` (and an unused
/// `input_scale`) beside each. It loads to exactly the model of the weights `w · weight_scale`
/// (computed in f32 by candle and saved plainly as the expected file) on the test device, in
/// f32 and in bf16, also from the registry's host copy (which keeps the float8 weights as
/// stored, a byte each), and `write_gguf` writes the same file from either.
#[test]
fn an_fp8_file_is_the_model_of_its_scaled_weights() {
    use std::collections::HashMap;

    use denoiser_svc::{
        gguf::write_gguf,
        model::bfl::{PREFIX, is_projection},
    };
    use klein_kernels::quant::QuantFormat;

    let dir = std::env::temp_dir().join(format!("denoiser-fp8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (fp8_path, plain_path) = (dir.join("fp8.safetensors"), dir.join("plain.safetensors"));
    let mut fp8 = HashMap::new();
    let mut plain = HashMap::new();
    let mut projections = 0;
    for (name, t) in bfl_layout::tensors() {
        if !is_projection(&name) {
            fp8.insert(format!("{PREFIX}{name}"), t.clone());
            plain.insert(name, t);
            continue;
        }
        projections += 1;
        // e4m3's largest finite value is 448.
        let absmax = t
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = Tensor::new(absmax / 448.0, &Device::Cpu).unwrap();
        let q = t
            .broadcast_div(&scale)
            .unwrap()
            .to_dtype(DType::F8E4M3)
            .unwrap();
        let composed = q
            .to_dtype(DType::F32)
            .unwrap()
            .broadcast_mul(&scale)
            .unwrap();
        plain.insert(name.clone(), composed);
        let stem = name.strip_suffix(".weight").unwrap();
        fp8.insert(format!("{PREFIX}{stem}.weight_scale"), scale);
        fp8.insert(
            format!("{PREFIX}{stem}.input_scale"),
            Tensor::new(1f32, &Device::Cpu).unwrap(),
        );
        fp8.insert(format!("{PREFIX}{name}"), q);
    }
    candle_core::safetensors::save(&fp8, &fp8_path).unwrap();
    candle_core::safetensors::save(&plain, &plain_path).unwrap();
    let a = Checkpoint::locate(&fp8_path).unwrap();
    let b = Checkpoint::locate(&plain_path).unwrap();
    assert_eq!(
        (a.format, a.prefixed, b.prefixed),
        (Format::Bfl, true, false)
    );
    assert_eq!(a.config, b.config);

    let dev = klein_test_support::test_device();
    let x = Tensor::randn(0f32, 1.0, (1, 6, 128), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 512, 192), &dev).unwrap();
    let mut ids = text_ids(512);
    ids.extend(grid_ids(0, 2, 3));
    let run = |m: &Flux2Transformer2DModel, dtype: DType| {
        let rope = m.rope(&ids, &dev).unwrap();
        let (x, ctx) = (x.to_dtype(dtype).unwrap(), ctx.to_dtype(dtype).unwrap());
        let y = m.forward(&x, &ctx, &[640.0], &rope).unwrap();
        y.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap()
    };
    let forward_in = |c: &Checkpoint, dtype: DType| {
        run(
            &c.load(dtype, &dev, AttentionConfig::default()).unwrap(),
            dtype,
        )
    };
    let forward = |c: &Checkpoint| forward_in(c, DType::F32);
    assert_eq!(forward(&a), forward(&b));
    assert_eq!(forward_in(&a, DType::BF16), forward_in(&b, DType::BF16));
    let exact = forward(&Checkpoint::locate(&pipeline_dir("tiny-klein-4b")).unwrap());
    assert_ne!(forward(&a), exact, "fp8 rounds the weights");

    // The registry's host copy: the float8 weights a byte each, their scales (two f32 a
    // projection) beside them; the same model built from it, in bf16 too (a scale rounded to
    // bf16 would move it). The plain file's copy holds every weight in the dtype.
    assert!(a.fp8_elements() > 0);
    for dtype in [DType::F32, DType::BF16] {
        let source = |checkpoint: &Checkpoint| TransformerSource {
            checkpoint: checkpoint.clone(),
            dtype,
            attention: AttentionConfig::default(),
            cuda_graphs: false,
            adapters: Default::default(),
        };
        let (sa, sb) = (source(&a), source(&b));
        let (ha, hb) = (sa.read_host().unwrap(), sb.read_host().unwrap());
        let size = dtype.size_in_bytes() as u64;
        let saved = a.fp8_elements() * (size - 1);
        assert_eq!(
            ha.bytes(),
            hb.bytes() - saved + 8 * projections,
            "{dtype:?}"
        );
        assert_eq!(sa.host_bytes(), sb.host_bytes() - saved, "{dtype:?}");
        let m = sa.build(Some(&ha), &dev).unwrap();
        assert_eq!(run(&m, dtype), forward_in(&b, dtype), "{dtype:?}");
    }

    let (ga, gb) = (dir.join("a.gguf"), dir.join("b.gguf"));
    write_gguf(&a, QuantFormat::Q8_0, &ga, &Device::Cpu).unwrap();
    write_gguf(&b, QuantFormat::Q8_0, &gb, &Device::Cpu).unwrap();
    assert_eq!(std::fs::read(&ga).unwrap(), std::fs::read(&gb).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}
