//! The tiny diffusers transformer rewritten with BFL names and layouts (fused qkv, the final
//! layer's (shift, scale) order), as BFL single files and the GGUF files made from them hold
//! it; and such a GGUF file written.

#![allow(dead_code)]

use std::{collections::HashMap, fs::File, path::PathBuf};

use candle_core::{
    Device, Tensor,
    quantized::{GgmlDType, QTensor, gguf_file},
};
use denoiser_svc::model::bfl::{Source, source};
use klein_test_support::pipeline_dir;

/// The tiny klein-4B transformer's tensors under their BFL names, in f32 on the host.
pub fn tensors() -> HashMap<String, Tensor> {
    let src = pipeline_dir("tiny-klein-4b").join("transformer/diffusion_pytorch_model.safetensors");
    let diffusers = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    let mut chunks: HashMap<String, Vec<(usize, Tensor)>> = HashMap::new();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in diffusers {
        match source(&name).unwrap_or_else(|| panic!("no BFL name for {name}")) {
            Source::Plain(bfl) => {
                out.insert(bfl, t);
            }
            Source::Chunk3(bfl, i) => chunks.entry(bfl).or_default().push((i, t)),
            Source::SwapHalves(bfl) => {
                let half = t.dim(0).unwrap() / 2;
                let swapped = Tensor::cat(
                    &[
                        t.narrow(0, half, half).unwrap(),
                        t.narrow(0, 0, half).unwrap(),
                    ],
                    0,
                );
                out.insert(bfl, swapped.unwrap());
            }
        }
    }
    for (bfl, mut parts) in chunks {
        parts.sort_by_key(|(i, _)| *i);
        let parts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
        out.insert(bfl, Tensor::cat(&parts, 0).unwrap());
    }
    assert!(out.contains_key("double_blocks.0.img_attn.qkv.weight"));
    out
}

/// A file in the temp folder, removed when dropped.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `name` in the temp folder, unique to this process.
pub fn temp(name: &str) -> TempFile {
    TempFile(std::env::temp_dir().join(format!("{}-{name}", std::process::id())))
}

/// Writes `tensors` as a GGUF file the way ComfyUI-GGUF lays one out (`general.architecture`
/// "flux"), each tensor in the type `type_of` gives for its name and shape, under `prefix`;
/// returns the stored tensors.
pub fn write_gguf(
    file: &TempFile,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    mut type_of: impl FnMut(&str, &[usize]) -> GgmlDType,
) -> HashMap<String, QTensor> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let stored: HashMap<String, QTensor> = names
        .into_iter()
        .map(|name| {
            let t = &tensors[name];
            let q = QTensor::quantize(t, type_of(name, t.dims())).unwrap();
            (name.clone(), q)
        })
        .collect();
    let named: Vec<(String, &QTensor)> = stored
        .iter()
        .map(|(name, q)| (format!("{prefix}{name}"), q))
        .collect();
    let named: Vec<(&str, &QTensor)> = named.iter().map(|(n, q)| (n.as_str(), *q)).collect();
    let arch = gguf_file::Value::String("flux".into());
    let version = gguf_file::Value::U32(2);
    let metadata = [
        ("general.architecture", &arch),
        ("general.quantization_version", &version),
    ];
    gguf_file::write(&mut File::create(&file.0).unwrap(), &metadata, &named).unwrap();
    stored
}
