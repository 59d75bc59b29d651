//! The LoRA fixtures of `tools/reference/lora.py` (`loras/`): the adapter files, the goldens and
//! the forward every LoRA test compares.

use std::{collections::HashMap, path::PathBuf};

use candle_core::{DType, Device, Tensor};
use denoiser_svc::{
    model::{AttentionConfig, Flux2Transformer2DModel},
    weights::Checkpoint,
};
use klein_test_support::{fixtures_dir, pipeline_dir, take, test_device};

use crate::golden_forward;

pub const LAYOUTS: [&str; 3] = ["diffusers", "ai_toolkit", "kohya"];

pub fn lora_file(layout: &str) -> PathBuf {
    let rel = manifest_lora()["files"][layout]
        .as_str()
        .unwrap()
        .to_owned();
    fixtures_dir().join(rel)
}

pub fn manifest_lora() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures_dir().join("loras/manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The adapter goldens (inputs and diffusers' outputs).
pub fn golden_lora() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures_dir().join("loras/golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

pub fn scale() -> f32 {
    manifest_lora()["params"]["lora_scale"].as_f64().unwrap() as f32
}

pub fn load(ckpt: Checkpoint, dtype: DType) -> Flux2Transformer2DModel {
    ckpt.load(dtype, &test_device(), AttentionConfig::default())
        .unwrap()
}

/// `m`'s f32 output on the golden's inputs.
pub fn forward(m: &Flux2Transformer2DModel, dtype: DType) -> Tensor {
    let g = golden_lora();
    let dev = test_device();
    let input = |name: &str| {
        take(&g, name)
            .to_device(&dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let mut ids = golden_forward::ids(take(&g, "txt_ids"));
    ids.extend(golden_forward::ids(take(&g, "img_ids")));
    let rope = m.rope(&ids, &dev).unwrap();
    m.forward(
        &input("hidden_states"),
        &input("encoder_hidden_states"),
        &[730.0],
        &rope,
    )
    .unwrap()
    .to_dtype(DType::F32)
    .unwrap()
    .to_device(&Device::Cpu)
    .unwrap()
}

pub fn tiny_4b() -> Checkpoint {
    Checkpoint::locate(&pipeline_dir("tiny-klein-4b")).unwrap()
}
