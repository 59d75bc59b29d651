//! encoder-svc settings: the shared server settings plus the encoder's own.
//!
//! The device, dtype and quantization configured here belong to the encoder alone (the
//! encoder's "pinned zone"): nothing else in the system moves or changes them at run time.

use std::{path::PathBuf, str::FromStr};

use clap::Parser;
pub use klein_kernels::quant::Quantize;
use klein_runtime::{
    bytesize::ByteSize,
    config::{ServerConfig, ServerFlags},
    device::DTypeSpec,
    models::{ResidencyConfig, ResidencyFlags, parse_model_arg},
};
use serde::{Deserialize, Serialize};

use crate::error::EncoderError;

/// Everything encoder-svc is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub server: ServerConfig,
    #[serde(flatten)]
    pub residency: ResidencyConfig,
    /// Diffusers pipeline root holding `text_encoder/` and `tokenizer/`: the default model.
    /// Required unless `models` lists at least one.
    pub model_dir: Option<PathBuf>,
    /// Model id reported and matched against requests; default: the model folder's name.
    pub model_id: Option<String>,
    /// Pre-quantized Qwen3 GGUF file to take the weights from instead of `text_encoder/`
    /// (the tokenizer still comes from `model_dir`).
    pub gguf: Option<PathBuf>,
    /// Further models (`[[models]]` in TOML, `--model ID=PATH` flags); the first is the
    /// default when `model_dir` is not set.
    pub models: Vec<ModelEntry>,
    /// Load-time quantization of the safetensors weights: none, q4k, q4_0, q4_1, q6k, q8_0.
    pub quantize: Quantize,
    /// Device memory the runtime needs besides weights and activations (CUDA context, cuBLAS
    /// workspace, allocator slack); subtracted from the budget.
    pub runtime_overhead: ByteSize,
    /// Host memory for cached prompt embeddings; 0 disables the cache.
    pub cache_bytes: ByteSize,
    /// Most prompts one request may carry (negatives not counted).
    pub max_batch: usize,
    /// Longest accepted prompt, in UTF-8 bytes (tokens beyond 512 are cut anyway).
    pub max_prompt_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig {
                listen: ([127, 0, 0, 1], 50052).into(),
                ..ServerConfig::default()
            },
            residency: ResidencyConfig::default(),
            model_dir: None,
            model_id: None,
            gguf: None,
            models: Vec::new(),
            quantize: Quantize::None,
            runtime_overhead: ByteSize(512 << 20),
            cache_bytes: ByteSize(512 << 20),
            max_batch: 4,
            max_prompt_bytes: 64 << 10,
        }
    }
}

impl Config {
    /// Checks the rules no single setting can express.
    pub fn validate(&self) -> Result<(), EncoderError> {
        let fail = |msg: &str| Err(EncoderError::Config(msg.to_owned()));
        if self.model_dir.is_none() && self.models.is_empty() {
            return fail(
                "model_dir is required (a diffusers pipeline root with text_encoder/ and tokenizer/), \
                 or list models (--model ID=PATH)",
            );
        }
        if self.server.dtype == DTypeSpec::F16 {
            return fail("dtype f16 is refused: Qwen3 activations overflow f16 (use bf16 or f32)");
        }
        let gguf = self.model_entries().iter().any(|m| m.gguf.is_some());
        if gguf && self.quantize != Quantize::None {
            return fail(
                "quantize applies to safetensors weights; a GGUF file is already quantized",
            );
        }
        if self.max_batch == 0 {
            return fail("max_batch must be at least 1");
        }
        if self.max_prompt_bytes == 0 {
            return fail("max_prompt_bytes must be at least 1");
        }
        Ok(())
    }

    /// The default model's id: configured, else the model folder's name.
    pub fn model_id(&self) -> String {
        self.model_entries()
            .first()
            .map_or_else(|| "qwen3".into(), ModelEntry::id)
    }

    /// Every configured model, the default first: `model_dir` (with `model_id` and `gguf`)
    /// when set, then `models`.
    pub fn model_entries(&self) -> Vec<ModelEntry> {
        let first = self.model_dir.as_ref().map(|path| ModelEntry {
            id: self.model_id.clone(),
            path: path.clone(),
            gguf: self.gguf.clone(),
        });
        first
            .into_iter()
            .chain(self.models.iter().cloned())
            .collect()
    }
}

/// One text encoder the service serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// Id requests name; default: the folder's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Diffusers pipeline root holding `text_encoder/` and `tokenizer/`.
    pub path: PathBuf,
    /// Pre-quantized Qwen3 GGUF file to take the weights from (tokenizer from `path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf: Option<PathBuf>,
}

impl ModelEntry {
    /// The configured id, else the folder's name.
    pub fn id(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "qwen3".into())
        })
    }
}

impl FromStr for ModelEntry {
    type Err = String;

    /// `ID=PATH` or `PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, path) = parse_model_arg(s)?;
        Ok(Self {
            id,
            path,
            gguf: None,
        })
    }
}

/// Command-line flags of the `encoder-svc` binary; each overrides file and environment.
#[derive(Debug, Clone, Default, Parser, Serialize)]
#[command(
    name = "encoder-svc",
    version,
    about = "FLUX.2 [klein] text encoder (Qwen3) gRPC service"
)]
pub struct Flags {
    /// TOML config file (lowest precedence after the built-in defaults).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub server: ServerFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub residency: ResidencyFlags,
    /// A further model, `ID=PATH` or `PATH` (repeatable).
    #[arg(long = "model", value_name = "ID=PATH")]
    #[serde(rename = "models", skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelEntry>,
    /// Diffusers pipeline root holding text_encoder/ and tokenizer/.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_dir: Option<PathBuf>,
    /// Model id reported by Info and accepted in requests (default: the folder name).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// Pre-quantized Qwen3 GGUF file to load the weights from.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf: Option<PathBuf>,
    /// Load-time weight quantization: none, q4k, q4_0, q4_1, q6k or q8_0.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantize: Option<Quantize>,
    /// Runtime overhead subtracted from the budget, e.g. 512MiB.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_overhead: Option<ByteSize>,
    /// Host memory for the prompt-embedding cache, e.g. 512MiB (0 = off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_bytes: Option<ByteSize>,
    /// Most prompts per request.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<usize>,
    /// Longest accepted prompt in bytes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prompt_bytes: Option<usize>,
}

impl Flags {
    /// Merges defaults < `--config` file < `KLEIN_*` environment < these flags.
    pub fn load(&self) -> Result<Config, EncoderError> {
        klein_runtime::config::load(self.config.as_deref(), self)
            .map_err(|e| EncoderError::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::QuantFormat;

    fn parse(args: &[&str]) -> Flags {
        Flags::parse_from(std::iter::once("encoder-svc").chain(args.iter().copied()))
    }

    #[test]
    fn flags_override_defaults() {
        let cfg = parse(&[
            "--model-dir",
            "/models/klein-4b",
            "--quantize",
            "q4k",
            "--dtype",
            "bf16",
            "--cache-bytes",
            "1GiB",
            "--gpu-memory-budget",
            "3GiB",
        ])
        .load()
        .unwrap();
        assert_eq!(cfg.quantize, Quantize::Format(QuantFormat::Q4K));
        assert_eq!(cfg.server.dtype, DTypeSpec::Bf16);
        assert_eq!(cfg.cache_bytes, ByteSize(1 << 30));
        assert_eq!(cfg.server.gpu_memory_budget, ByteSize(3 << 30));
        assert_eq!(cfg.model_id(), "klein-4b");
        assert_eq!(cfg.max_batch, 4, "untouched settings keep their default");
        cfg.validate().unwrap();
    }

    #[test]
    fn refuses_what_cannot_work() {
        assert!(
            Config::default().validate().is_err(),
            "model_dir is required"
        );
        let base = Config {
            model_dir: Some("/m".into()),
            ..Config::default()
        };
        let bad = [
            Config {
                server: ServerConfig {
                    dtype: DTypeSpec::F16,
                    ..ServerConfig::default()
                },
                ..base.clone()
            },
            Config {
                gguf: Some("/m/q.gguf".into()),
                quantize: Quantize::Format(QuantFormat::Q4K),
                ..base.clone()
            },
            Config {
                max_batch: 0,
                ..base.clone()
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
        assert!(Flags::try_parse_from(["encoder-svc", "--quantize", "int3"]).is_err());
        assert_eq!("none".parse::<Quantize>().unwrap(), Quantize::None);
    }
}
