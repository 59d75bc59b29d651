//! denoiser-svc settings: the shared server settings plus the model and request limits.
//! Layered as every service: defaults < TOML file (`--config`) < `KLEIN_*` env < flags.

use std::path::PathBuf;

use clap::builder::{OsStringValueParser, TypedValueParser};
pub use klein_kernels::quant::Quantize;

pub use crate::lora::{AdapterSpec, LoraSpec};
use klein_runtime::{
    bytesize::ByteSize,
    config::{ServerConfig, ServerFlags},
    models::{ResidencyConfig, ResidencyFlags},
};
use serde::{Deserialize, Serialize};

/// Everything the service needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub server: ServerConfig,
    #[serde(flatten)]
    pub residency: ResidencyConfig,
    /// Diffusers pipeline root, its `transformer/` folder, or a BFL single file: the default
    /// model. Required unless `models` lists at least one.
    pub model_dir: Option<PathBuf>,
    /// Model id reported by Info and accepted in `DenoiseRequest.model`; default: the folder
    /// or file name.
    pub model_id: Option<String>,
    /// Whether the model is step-distilled (guidance ignored). Default: `model_index.json`'s
    /// `is_distilled`; required when the checkpoint has no `model_index.json`.
    pub is_distilled: Option<bool>,
    /// LoRA adapters merged into the default model's (`model_dir`'s) weights at load, each
    /// with its strength (`[[lora]]` with `path` and `scale`; `--lora PATH[:SCALE]`): diffusers',
    /// ai-toolkit's or kohya's layout (`crate::lora`).
    pub lora: Vec<LoraSpec>,
    /// LoRA adapters requests may apply to the default model by name, unmerged
    /// (`[[adapters]]` with `name` and `path`; `--adapter NAME=PATH`; `crate::lora`).
    pub adapters: Vec<AdapterSpec>,
    /// Further models (`[[models]]` in TOML, `--model ID=PATH` flags); the first model is the
    /// default when `model_dir` is not set.
    pub models: Vec<ModelEntry>,
    /// Load-time quantization of every model's block projections (96 % of the weights):
    /// none, q4k, q4_0, q4_1, q6k or q8_0. Weight-only: each product dequantizes its weight to
    /// the compute dtype (klein-9B in q4k: 5.6 GB instead of 18.2).
    pub quantize: Quantize,
    /// Largest f32 attention-score block materialised at once.
    pub attention_chunk_bytes: ByteSize,
    /// Device memory the runtime itself needs besides weights and activations (CUDA context,
    /// cuBLAS workspaces, allocator slack); subtracted from the budget.
    pub runtime_overhead: ByteSize,
    /// Largest batch one request may carry.
    pub max_batch: u32,
    /// Largest image side, pixels (output and references).
    pub max_image_side: u32,
    /// Largest image area, pixels (output and each reference).
    pub max_image_pixels: u64,
    /// Most reference images per request.
    pub max_references: u32,
    /// Seconds a request may wait for its model to become resident while other models' runs
    /// hold the memory, before it is refused with RESOURCE_EXHAUSTED.
    pub model_wait_secs: u64,
    /// Host memory for validated prompt embeddings kept under handles
    /// (`DenoiseRequest.embeddings_handle`); 0 turns the cache off.
    pub embeddings_cache_bytes: ByteSize,
    /// On a GPU in bf16, the side (pixels, a multiple of 16) of a square random image that each
    /// model on the device runs one step of before the service reports ready, with the linear
    /// layers' GEMM tuning on (`klein_kernels::tune_linear`): that size's largest products then
    /// run the fastest cuBLASLt algorithm at the card's power cap (−0.5 ms a 1024² step on an
    /// H100; docs/performance.md, nineteenth session), other sizes cuBLASLt's heuristic choice.
    /// Best effort; at most `max_image_side`; 0 turns it off.
    pub warm_up_side: u32,
    /// JSON file that keeps the warm-up's GEMM tuning choices per card between starts (each is
    /// checked bit for bit before use): a start that finds its shapes there skips the timing
    /// (klein-9B: 5.5 s on an H200). Default `$XDG_CACHE_HOME/klein/gemm-tuning.json`, else
    /// `~/.cache/klein/gemm-tuning.json`; empty turns it off. Written only when it changes; a
    /// file that cannot be read or written is logged and the tuning runs as without one.
    pub gemm_tuning_cache: Option<PathBuf>,
    /// On a GPU, replay each step shape's forward from a CUDA graph (captured at the shape's
    /// second step; `klein_runtime::graph`): one launch instead of ~300 host calls a step,
    /// the same bits. Off: every step queues its kernels one by one.
    pub cuda_graphs: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig {
                listen: ([127, 0, 0, 1], 50053).into(),
                ..ServerConfig::default()
            },
            residency: ResidencyConfig::default(),
            model_dir: None,
            model_id: None,
            is_distilled: None,
            lora: Vec::new(),
            adapters: Vec::new(),
            models: Vec::new(),
            quantize: Quantize::None,
            attention_chunk_bytes: ByteSize(256 << 20),
            runtime_overhead: ByteSize(512 << 20),
            max_batch: 4,
            max_image_side: 2048,
            max_image_pixels: 2048 * 2048,
            max_references: 4,
            model_wait_secs: 120,
            embeddings_cache_bytes: ByteSize(256 << 20),
            warm_up_side: 1024,
            gemm_tuning_cache: default_tuning_cache(),
            cuda_graphs: true,
        }
    }
}

/// One model the denoiser serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// Id requests name; default: the pipeline folder's or file's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Diffusers pipeline root, its `transformer/` folder, or a BFL single file.
    pub path: PathBuf,
    /// Step-distilled or base; default: `model_index.json`'s `is_distilled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_distilled: Option<bool>,
    /// Id of the encoder model whose embeddings it takes; default: the encoder model with this
    /// model's id, else the encoder's default model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<String>,
    /// LoRA adapters merged into this model's weights at load (`lora = [{ path = "…",
    /// scale = 0.8 }]`): the same checkpoint under two ids, one with adapters, serves both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora: Vec<LoraSpec>,
    /// LoRA adapters requests may apply to this model by name, unmerged (`adapters = [{ name
    /// = "anime", path = "…" }]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterSpec>,
}

impl std::str::FromStr for ModelEntry {
    type Err = String;

    /// `ID=PATH` or `PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, path) = klein_runtime::models::parse_model_arg(s)?;
        Ok(Self {
            id,
            path,
            is_distilled: None,
            text_encoder: None,
            lora: Vec::new(),
            adapters: Vec::new(),
        })
    }
}

/// `$XDG_CACHE_HOME/klein/gemm-tuning.json`, else `$HOME/.cache/klein/gemm-tuning.json`.
fn default_tuning_cache() -> Option<PathBuf> {
    let set = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = set("XDG_CACHE_HOME").or_else(|| set("HOME").map(|home| home.join(".cache")))?;
    Some(dir.join("klein").join("gemm-tuning.json"))
}

impl Config {
    /// The GEMM tuning cache file, if one is configured (an empty path turns it off).
    pub fn tuning_cache_path(&self) -> Option<&std::path::Path> {
        self.gemm_tuning_cache
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
    }

    /// Every configured model, the default first: `model_dir` (with `model_id` and
    /// `is_distilled`) when set, then `models`.
    pub fn model_entries(&self) -> Vec<ModelEntry> {
        let first = self.model_dir.as_ref().map(|path| ModelEntry {
            id: self.model_id.clone(),
            path: path.clone(),
            is_distilled: self.is_distilled,
            text_encoder: None,
            lora: self.lora.clone(),
            adapters: self.adapters.clone(),
        });
        first
            .into_iter()
            .chain(self.models.iter().cloned())
            .collect()
    }
}

/// Command-line flags; each one given overrides file and environment.
#[derive(Debug, Clone, Default, clap::Parser, Serialize)]
#[command(name = "denoiser-svc", about = "FLUX.2 [klein] denoiser gRPC service")]
pub struct Flags {
    /// TOML config file.
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
    /// Diffusers pipeline root, its transformer/ folder, or a BFL single file.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_dir: Option<PathBuf>,
    /// Model id to report and accept (default: folder or file name).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// Whether the model is step-distilled (default: from model_index.json).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_distilled: Option<bool>,
    /// A LoRA merged into the default model's weights at load, `PATH` or `PATH:SCALE`
    /// (repeatable).
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lora: Vec<LoraSpec>,
    /// A LoRA adapter requests may apply to the default model by name, `NAME=PATH`
    /// (repeatable).
    #[arg(long = "adapter", value_name = "NAME=PATH")]
    #[serde(rename = "adapters", skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterSpec>,
    /// Load-time quantization of the block projections: none, q4k, q4_0, q4_1, q6k or q8_0.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantize: Option<Quantize>,
    /// Largest f32 attention-score block, e.g. 256MiB.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_chunk_bytes: Option<ByteSize>,
    /// Runtime overhead subtracted from the budget, e.g. 512MiB.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_overhead: Option<ByteSize>,
    /// Largest batch per request.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u32>,
    /// Seconds a request may wait for its model to become resident.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_wait_secs: Option<u64>,
    /// Host memory for prompt embeddings kept under handles, e.g. 256MiB (0 = off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embeddings_cache_bytes: Option<ByteSize>,
    /// Side of the GPU warm-up step that tunes the GEMMs, pixels (0 = off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_up_side: Option<u32>,
    /// File keeping the GEMM tuning choices between starts ("" = off; clap's own path
    /// parser refuses an empty value).
    #[arg(long, value_parser = TypedValueParser::map(OsStringValueParser::new(), PathBuf::from))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gemm_tuning_cache: Option<PathBuf>,
    /// Replay step shapes from CUDA graphs on a GPU (true or false).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_graphs: Option<bool>,
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use klein_kernels::quant::QuantFormat;

    use super::*;

    /// The config the flags `args` give (no file, no `KLEIN_*` variables).
    fn load(args: &[&str]) -> Config {
        let flags = Flags::parse_from(std::iter::once("denoiser-svc").chain(args.iter().copied()));
        klein_runtime::config::load(None, &flags).unwrap()
    }

    #[test]
    fn quantize_comes_from_the_flag_and_defaults_to_none() {
        assert_eq!(load(&[]).quantize, Quantize::None);
        assert_eq!(
            load(&["--quantize", "q4k"]).quantize,
            Quantize::Format(QuantFormat::Q4K)
        );
        assert!(
            Flags::try_parse_from(["denoiser-svc", "--quantize", "int4"]).is_err(),
            "an unknown format is refused"
        );
    }

    #[test]
    fn the_tuning_cache_comes_from_the_flag_and_an_empty_path_turns_it_off() {
        let path = load(&["--gemm-tuning-cache", "/var/cache/klein/t.json"]);
        assert_eq!(
            path.tuning_cache_path(),
            Some(std::path::Path::new("/var/cache/klein/t.json"))
        );
        assert_eq!(load(&["--gemm-tuning-cache", ""]).tuning_cache_path(), None);
        let default = Config::default();
        if let Some(p) = default.tuning_cache_path() {
            assert!(p.ends_with("klein/gemm-tuning.json"), "{}", p.display());
        }
    }

    #[test]
    fn cuda_graphs_default_on_and_the_flag_turns_them_off() {
        assert!(load(&[]).cuda_graphs);
        assert!(!load(&["--cuda-graphs", "false"]).cuda_graphs);
        assert!(Flags::try_parse_from(["denoiser-svc", "--cuda-graphs", "sometimes"]).is_err());
    }

    #[test]
    fn loras_come_from_flags_for_the_default_model_and_from_the_file_per_model() {
        let cfg = load(&[
            "--model-dir",
            "/m",
            "--lora",
            "/a.safetensors:0.5",
            "--lora",
            "/b",
        ]);
        let lora = |path: &str, scale| LoraSpec {
            path: path.into(),
            scale,
        };
        assert_eq!(
            cfg.model_entries()[0].lora,
            [lora("/a.safetensors", 0.5), lora("/b", 1.0)]
        );
        let dir = std::env::temp_dir().join(format!("denoiser-lora-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("denoiser.toml");
        std::fs::write(
            &file,
            "model_dir = \"/m\"\n[[lora]]\npath = \"/a\"\n\n[[models]]\nid = \"anime\"\n\
             path = \"/m\"\nlora = [{ path = \"/c\", scale = 0.7 }]\n",
        )
        .unwrap();
        let flags = Flags::parse_from(["denoiser-svc"]);
        let cfg: Config = klein_runtime::config::load(Some(&file), &flags).unwrap();
        let entries = cfg.model_entries();
        assert_eq!(entries[0].lora, [lora("/a", 1.0)]);
        assert_eq!(entries[1].id.as_deref(), Some("anime"));
        assert_eq!(entries[1].lora, [lora("/c", 0.7)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn adapters_come_from_flags_for_the_default_model_and_from_the_file_per_model() {
        let cfg = load(&["--model-dir", "/m", "--adapter", "anime=/a.safetensors"]);
        let adapter = |name: &str, path: &str| AdapterSpec {
            name: name.into(),
            path: path.into(),
        };
        assert_eq!(
            cfg.model_entries()[0].adapters,
            [adapter("anime", "/a.safetensors")]
        );
        assert!(Flags::try_parse_from(["denoiser-svc", "--adapter", "/a.safetensors"]).is_err());
        let dir = std::env::temp_dir().join(format!("denoiser-adapter-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("denoiser.toml");
        std::fs::write(
            &file,
            "model_dir = \"/m\"\n[[adapters]]\nname = \"style\"\npath = \"/s\"\n\n\
             [[models]]\nid = \"k\"\npath = \"/m\"\nadapters = [{ name = \"ink\", path = \"/i\" }]\n",
        )
        .unwrap();
        let flags = Flags::parse_from(["denoiser-svc"]);
        let cfg: Config = klein_runtime::config::load(Some(&file), &flags).unwrap();
        assert_eq!(cfg.model_entries()[0].adapters, [adapter("style", "/s")]);
        assert_eq!(cfg.model_entries()[1].adapters, [adapter("ink", "/i")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
