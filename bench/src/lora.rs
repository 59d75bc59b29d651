//! Random LoRA adapters in diffusers' layout at the real shapes: a file for a pipeline's
//! transformer, so the services' load-time merge (`denoiser_svc::lora`) can be timed, and a
//! request's view of a random model, so the unmerged terms' steps can be.

use std::{collections::HashMap, path::Path};

use candle_core::{DType, Device, Result, Tensor};
use denoiser_svc::{
    lora::{AdapterSpec, NamedAdapters},
    model::Flux2Transformer2DModel,
};
use klein_runtime::weights::{mmap_safetensors, safetensors_files};

/// Whether diffusers weight `name` is a block's.
fn in_blocks(name: &str) -> bool {
    name.starts_with("transformer_blocks.") || name.starts_with("single_transformer_blocks.")
}

/// A random rank-`rank` module for a (rows, cols) weight `stem`: A and B in bf16.
fn module(
    tensors: &mut HashMap<String, Tensor>,
    stem: &str,
    (rows, cols): (usize, usize),
    rank: usize,
) -> Result<()> {
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
    Ok(())
}

/// `model` with a random rank-`rank` adapter over every block projection added unmerged at
/// strength 1, as denoiser-svc builds a request's view (through a file in the temp folder).
pub fn view(
    model: &Flux2Transformer2DModel,
    rank: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Flux2Transformer2DModel> {
    let mut tensors = HashMap::new();
    for p in model.projections()? {
        for part in p.parts().iter().filter(|part| in_blocks(&part.name)) {
            let stem = part.name.strip_suffix(".weight").unwrap_or(&part.name);
            module(&mut tensors, stem, (part.rows, part.cols), rank)?;
        }
    }
    let path = std::env::temp_dir().join(format!(
        "klein-bench-lora-{}.safetensors",
        std::process::id()
    ));
    candle_core::safetensors::save(&tensors, &path)?;
    let named = NamedAdapters::read(&[AdapterSpec {
        name: "bench".into(),
        path: path.clone(),
    }]);
    let _ = std::fs::remove_file(&path);
    let adapters = named
        .map_err(candle_core::Error::wrap)?
        .resident(model, dtype, dev)
        .map_err(candle_core::Error::wrap)?;
    adapters.view(model, &[("bench".into(), 1.0)])
}

/// A rank-`rank` bf16 adapter over every projection of the blocks of `pipeline`'s transformer
/// (`transformer.<module>.lora_A.weight` / `lora_B.weight`, no metadata: scale 1), written to
/// `out`.
pub fn write(out: &Path, pipeline: &Path, rank: usize) -> Result<()> {
    let files =
        safetensors_files(&pipeline.join("transformer")).map_err(candle_core::Error::wrap)?;
    let st = mmap_safetensors(&files).map_err(candle_core::Error::wrap)?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let (Some(stem), &[rows, cols]) = (name.strip_suffix(".weight"), view.shape()) else {
            continue;
        };
        if in_blocks(&name) {
            module(&mut tensors, stem, (rows, cols), rank)?;
        }
    }
    println!("{} modules of rank {rank}", tensors.len() / 2);
    candle_core::safetensors::save(&tensors, out)
}
