//! Writes a diffusers pipeline folder of the real klein-4B or klein-9B shapes with random
//! weights, so the real services (and their real loaders) can be timed end to end without a
//! checkpoint. Only the weights the services read are written (the text encoder's embeddings and
//! layers 0..27). The tokenizer and scheduler come from the tiny fixture pipeline (token ids stay
//! below its vocabulary, which does not change the encoder's cost).

use std::{collections::HashMap, fs, path::Path, sync::Arc};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use serde_json::json;

use crate::{model::Model, random::RandomWeights};

struct Shared(Arc<RandomWeights>);

impl SimpleBackend for Shared {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

fn save(dir: &Path, file: &str, weights: &RandomWeights, config: serde_json::Value) -> Result<()> {
    fs::create_dir_all(dir)?;
    let map: HashMap<String, Tensor> = weights
        .take()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&map, dir.join(file))?;
    fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let path = entry?.path();
        fs::copy(&path, to.join(path.file_name().expect("a file name")))?;
    }
    Ok(())
}

/// Writes `model`'s pipeline into `out`, taking tokenizer/scheduler/model_index from `template`.
pub fn write(out: &Path, template: &Path, model: Model, dev: &Device) -> Result<()> {
    fs::create_dir_all(out)?;
    fs::copy(
        template.join("model_index.json"),
        out.join("model_index.json"),
    )?;
    copy_dir(&template.join("tokenizer"), &out.join("tokenizer"))?;
    copy_dir(&template.join("scheduler"), &out.join("scheduler"))?;

    let w = Arc::new(RandomWeights::new(true));
    let vb = || VarBuilder::from_backend(Box::new(Shared(w.clone())), DType::BF16, dev.clone());
    {
        use denoiser_svc::model::Flux2Transformer2DModel;
        drop(Flux2Transformer2DModel::new(&model.transformer(), vb())?);
        save(
            &out.join("transformer"),
            "diffusion_pytorch_model.safetensors",
            &w,
            model.transformer_json(),
        )?;
    }
    {
        use encoder_svc::model::{qwen3::TextEncoder, weights::Weights};
        drop(TextEncoder::new(
            &model.encoder().0,
            Weights::safetensors(vb(), None),
        )?);
        save(
            &out.join("text_encoder"),
            "model.safetensors",
            &w,
            model.encoder_json(),
        )?;
    }
    {
        use vae_svc::model::{AutoencoderKLFlux2, Config};
        let vb = VarBuilder::from_backend(Box::new(Shared(w.clone())), DType::F32, dev.clone());
        drop(AutoencoderKLFlux2::new(&Config::default(), vb)?);
        save(
            &out.join("vae"),
            "diffusion_pytorch_model.safetensors",
            &w,
            json!({
                "_class_name": "AutoencoderKLFlux2", "in_channels": 3, "out_channels": 3, "latent_channels": 32,
                "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
                "act_fn": "silu", "sample_size": 1024, "use_quant_conv": true, "use_post_quant_conv": true,
                "mid_block_add_attention": true, "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1, "patch_size": [2, 2]
            }),
        )?;
    }
    Ok(())
}
