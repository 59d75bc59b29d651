//! A BFL single-file checkpoint (fused qkv, (shift, scale) final layer, BFL names) loads to
//! the same model as the diffusers folder: the tiny fixture is rewritten in BFL layout and both
//! must give the same forward, bit for bit.

mod bfl_layout;

use candle_core::{DType, Device, Tensor};
use denoiser_svc::{
    model::{AttentionConfig, grid_ids, text_ids},
    weights::{Checkpoint, Format},
};
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
