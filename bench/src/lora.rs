//! Writes a random LoRA in diffusers' layout for a pipeline's transformer, so the services'
//! load-time merge (`denoiser_svc::lora`) can be timed at the real shapes.

use std::{collections::HashMap, path::Path};

use candle_core::{DType, Device, Result, Tensor};
use klein_runtime::weights::{mmap_safetensors, safetensors_files};

/// A rank-`rank` bf16 adapter over every projection of the blocks of `pipeline`'s transformer
/// (`transformer.<module>.lora_A.weight` / `lora_B.weight`, no metadata: scale 1), written to
/// `out`.
pub fn write(out: &Path, pipeline: &Path, rank: usize) -> Result<()> {
    let files =
        safetensors_files(&pipeline.join("transformer")).map_err(candle_core::Error::wrap)?;
    let st = mmap_safetensors(&files).map_err(candle_core::Error::wrap)?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let in_blocks = name.starts_with("transformer_blocks.")
            || name.starts_with("single_transformer_blocks.");
        let (Some(stem), &[rows, cols]) = (name.strip_suffix(".weight"), view.shape()) else {
            continue;
        };
        if !in_blocks {
            continue;
        }
        let down = (Tensor::randn(0f32, 1.0, (rank, cols), &Device::Cpu)? / (cols as f64).sqrt())?;
        let up = (Tensor::randn(0f32, 1.0, (rows, rank), &Device::Cpu)? * 0.01)?;
        tensors.insert(
            format!("transformer.{stem}.lora_A.weight"),
            down.to_dtype(DType::BF16)?,
        );
        tensors.insert(
            format!("transformer.{stem}.lora_B.weight"),
            up.to_dtype(DType::BF16)?,
        );
    }
    println!("{} modules of rank {rank}", tensors.len() / 2);
    candle_core::safetensors::save(&tensors, out)
}
