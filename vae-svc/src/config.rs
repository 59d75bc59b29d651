//! vae-svc settings: defaults < TOML file (`--config`) < `KLEIN_*` environment < flags.

use std::path::PathBuf;

use candle_core::conv::CudnnFwdAlgo;
use klein_runtime::{
    bytesize::ByteSize,
    config::{self, ConfigError, ServerConfig, ServerFlags},
    device::DTypeSpec,
};
use serde::{Deserialize, Serialize};

use crate::{model::Chunking, tiling::TilingConfig, validate::Limits};

/// The cuDNN forward algorithm of the VAE's convolutions (names as cuDNN's, kebab-case). The
/// Winograd ones apply to the 3×3 stride-1 convolutions and the FFT ones to stride 1 (the rest
/// run implicit-precomp-gemm); their workspaces are not in the memory estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ConvAlgorithm {
    /// cuDNN's heuristic pick per shape; its workspace is unbounded (FFT algorithms can ask for
    /// gigabytes), so the memory estimate may not cover it.
    Auto,
    ImplicitGemm,
    ImplicitPrecompGemm,
    Gemm,
    Direct,
    Fft,
    FftTiling,
    Winograd,
    WinogradNonFused,
}

impl ConvAlgorithm {
    /// The candle setting.
    pub fn cudnn(self) -> Option<CudnnFwdAlgo> {
        Some(match self {
            Self::Auto => return None,
            Self::ImplicitGemm => CudnnFwdAlgo::ImplicitGemm,
            Self::ImplicitPrecompGemm => CudnnFwdAlgo::ImplicitPrecompGemm,
            Self::Gemm => CudnnFwdAlgo::Gemm,
            Self::Direct => CudnnFwdAlgo::Direct,
            Self::Fft => CudnnFwdAlgo::Fft,
            Self::FftTiling => CudnnFwdAlgo::FftTiling,
            Self::Winograd => CudnnFwdAlgo::Winograd,
            Self::WinogradNonFused => CudnnFwdAlgo::WinogradNonFused,
        })
    }
}

/// The arithmetic of the f32 convolutions on cuDNN (docs/performance.md compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ConvPrecision {
    /// f32 fused multiply-adds, as the reference computes.
    Exact,
    /// TF32 tensor cores, one pass (10-bit mantissa products: about 3e-4 from the reference).
    Tf32,
    /// A TF32 tensor-core pass over the high parts of the f32 values and fp16 passes over the
    /// low parts (one for bf16-trained weights, two otherwise): f32-class results.
    SplitTf32,
}

impl ConvPrecision {
    /// The kernel's setting.
    pub fn kernel(self) -> klein_kernels::ConvPrecision {
        match self {
            Self::Exact => klein_kernels::ConvPrecision::Exact,
            Self::Tf32 => klein_kernels::ConvPrecision::Tf32,
            Self::SplitTf32 => klein_kernels::ConvPrecision::SplitTf32,
        }
    }
}

/// Everything vae-svc can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Listen address, device, dtype (f32 default; bf16 allowed; f16 refused), budget, queue.
    #[serde(flatten)]
    pub server: ServerConfig,
    /// A diffusers pipeline root, its `vae/` folder, or a single safetensors file (BFL
    /// `ae.safetensors` or a diffusers-named VAE file).
    pub model_dir: Option<PathBuf>,
    /// `config.json` to use with a single safetensors file (default: the AutoencoderKLFlux2
    /// class defaults, which are the released FLUX.2 VAE).
    pub single_file_config: Option<PathBuf>,
    /// Model id reported by Info (default: the pipeline folder or file name).
    pub model_id: Option<String>,
    /// Device memory the service needs besides weights and activations (CUDA context,
    /// allocator slack); subtracted from the budget before admission.
    pub runtime_overhead: ByteSize,
    /// Most images (or latent sets) per request.
    pub max_batch: usize,
    /// Longest accepted image side, pixels.
    pub max_image_side: usize,
    /// Largest accepted image area, pixels.
    pub max_image_pixels: u64,
    /// Largest f32 attention score block (scores + softmax) of the mid-block attention.
    pub attention_chunk_bytes: ByteSize,
    /// Working set of one convolution band or group-norm chunk that every job may take (and
    /// forced tilings do).
    pub op_chunk_bytes: ByteSize,
    /// Largest working set a job may take where convolutions hold no im2col rows (cuDNN's
    /// implicit GEMM): each encode and untiled decode plans the largest chunk, halving down to
    /// `op_chunk_bytes`, whose reservation fits the activation capacity (taller convolution
    /// bands are faster; docs/performance.md, ninth session), and a tiled decode the largest
    /// whose tiling needs at most one tile more than the fewest (seventeenth session).
    /// Elsewhere `op_chunk_bytes`.
    pub max_op_chunk_bytes: ByteSize,
    /// Tile side, latent tokens (16 px each), for requests that force tiling.
    pub tile_tokens: usize,
    /// Overlap between neighbouring tiles, tokens (at most half a tile).
    pub tile_overlap_tokens: usize,
    /// Smallest tile side the budget may fall back to, tokens.
    pub min_tile_tokens: usize,
    /// Most passes over the tiles of a tiled decode: statistics passes that make the tiles'
    /// group norms use image-wide statistics, plus the final pass (1 = per-tile statistics,
    /// as diffusers does; faster, with visible seams).
    pub tile_norm_max_passes: usize,
    /// Statistics passes stop once no group-norm mean or deviation moves by more than this
    /// many standard deviations.
    pub tile_norm_tolerance: f64,
    /// The arithmetic of the f32 convolutions on cuDNN (split TF32 by default: tensor-core
    /// speed at f32 accuracy); the matmuls stay exact f32. Elsewhere convolutions are exact.
    pub conv_precision: ConvPrecision,
    /// On a GPU, the side (pixels, a multiple of 16; at most `max_image_side`) of a square zero
    /// image decoded, best effort, before the service reports ready, planned as a request of
    /// that size would be:
    /// the kernels the driver compiles for its convolution shapes then compile at start-up,
    /// not in the first such request (3.96 s for the 16 GB plan's first tiled 1024² decode on
    /// a fresh H200; docs/performance.md, seventeenth session). 0 turns it off.
    pub warm_up_side: usize,
    /// cuDNN algorithm of every convolution (cuDNN builds only). The default, implicit
    /// precomputed GEMM, needs a workspace of kilobytes for every shape, so the activation
    /// estimate holds; `auto` lets cuDNN pick per shape (docs/performance.md compares them).
    pub conv_algorithm: ConvAlgorithm,
}

impl Default for Config {
    fn default() -> Self {
        let server = ServerConfig {
            listen: ([127, 0, 0, 1], 50054).into(),
            ..ServerConfig::default()
        };
        let chunking = Chunking::default();
        Self {
            server,
            model_dir: None,
            single_file_config: None,
            model_id: None,
            runtime_overhead: ByteSize(512 << 20),
            max_batch: 4,
            max_image_side: 4096,
            max_image_pixels: 2048 * 2048,
            attention_chunk_bytes: ByteSize(chunking.attention_bytes),
            op_chunk_bytes: ByteSize(chunking.op_bytes),
            max_op_chunk_bytes: ByteSize(16 << 30),
            tile_tokens: 32,
            tile_overlap_tokens: 8,
            min_tile_tokens: 8,
            tile_norm_max_passes: 4,
            tile_norm_tolerance: 0.02,
            warm_up_side: 1024,
            conv_precision: ConvPrecision::SplitTf32,
            conv_algorithm: ConvAlgorithm::ImplicitPrecompGemm,
        }
    }
}

impl Config {
    /// Rules the types cannot express; the message names the setting.
    pub fn check(&self) -> Result<(), ConfigError> {
        let rule = |m: &str| Err(ConfigError::Rule(m.to_owned()));
        if self.model_dir.is_none() {
            return rule("model_dir is required (--model-dir or KLEIN_MODEL_DIR)");
        }
        if self.server.dtype == DTypeSpec::F16 {
            return rule(
                "dtype f16 is refused for the VAE: activations overflow and images turn black; use f32 or bf16",
            );
        }
        if self.max_batch == 0 || self.max_image_side == 0 || self.max_image_pixels == 0 {
            return rule("max_batch, max_image_side and max_image_pixels must be >= 1");
        }
        if self.tile_tokens == 0 || self.min_tile_tokens == 0 || self.tile_norm_max_passes == 0 {
            return rule("tile_tokens, min_tile_tokens and tile_norm_max_passes must be >= 1");
        }
        if self.tile_norm_tolerance.is_nan() || self.tile_norm_tolerance < 0.0 {
            return rule("tile_norm_tolerance must be >= 0");
        }
        if self.attention_chunk_bytes.0 == 0 || self.op_chunk_bytes.0 == 0 {
            return rule("attention_chunk_bytes and op_chunk_bytes must be >= 1");
        }
        if self.max_op_chunk_bytes.0 < self.op_chunk_bytes.0 {
            return rule("max_op_chunk_bytes must be >= op_chunk_bytes");
        }
        if !self.warm_up_side.is_multiple_of(16) {
            return rule("warm_up_side must be 0 or a multiple of 16");
        }
        Ok(())
    }

    /// The model's execution limits (the loader adapts them to the device,
    /// [`Chunking::on`]).
    pub fn chunking(&self) -> Chunking {
        Chunking {
            attention_bytes: self.attention_chunk_bytes.0,
            op_bytes: self.op_chunk_bytes.0,
            conv_algo: self.conv_algorithm.cudnn(),
            conv_precision: self.conv_precision.kernel(),
            ..Chunking::default()
        }
    }

    /// The request size limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_batch: self.max_batch,
            max_image_side: self.max_image_side,
            max_image_pixels: self.max_image_pixels,
        }
    }

    /// The tile settings.
    pub fn tiling(&self) -> TilingConfig {
        TilingConfig {
            tile_tokens: self.tile_tokens,
            overlap_tokens: self.tile_overlap_tokens,
            min_tile_tokens: self.min_tile_tokens,
            norm_max_passes: self.tile_norm_max_passes,
            norm_tolerance: self.tile_norm_tolerance,
        }
    }
}

/// Flags of the `vae-svc` binary; each overrides the file and the environment.
#[derive(Debug, Clone, Default, clap::Parser, Serialize)]
#[command(
    name = "vae-svc",
    about = "klein-serve VAE service (AutoencoderKLFlux2)"
)]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub server: ServerFlags,
    /// A diffusers pipeline root, its vae/ folder, or a BFL ae.safetensors file.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_dir: Option<PathBuf>,
    /// Model id reported by Info.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// Arithmetic of the f32 convolutions on cuDNN: split-tf32 (default), exact, tf32.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv_precision: Option<ConvPrecision>,
    /// cuDNN algorithm of the convolutions: implicit-precomp-gemm (default), auto, ...
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv_algorithm: Option<ConvAlgorithm>,
}

/// Merges the layers and checks the result.
pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
    let config: Config = config::load(flags.config.as_deref(), flags)?;
    config.check()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn load_args(args: &[&str]) -> Config {
        let flags = Flags::parse_from(["vae-svc", "--model-dir", "/m"].iter().chain(args));
        load(&flags).unwrap()
    }

    #[test]
    fn convolutions_pin_implicit_precomp_gemm_unless_told_otherwise() {
        assert_eq!(
            load_args(&[]).chunking().conv_algo,
            Some(CudnnFwdAlgo::ImplicitPrecompGemm)
        );
        assert_eq!(
            load_args(&["--conv-algorithm", "auto"])
                .chunking()
                .conv_algo,
            None
        );
        assert_eq!(
            load_args(&["--conv-algorithm", "winograd-non-fused"])
                .chunking()
                .conv_algo,
            Some(CudnnFwdAlgo::WinogradNonFused)
        );
        assert!(Flags::try_parse_from(["vae-svc", "--conv-algorithm", "fastest"]).is_err());
    }

    #[test]
    fn the_warm_up_side_is_a_whole_number_of_tokens() {
        assert_eq!(load_args(&[]).warm_up_side, 1024);
        let mut config = load_args(&[]);
        config.warm_up_side = 0;
        assert!(config.check().is_ok());
        config.warm_up_side = 1000;
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("warm_up_side"), "{err}");
    }

    #[test]
    fn the_largest_operation_chunk_is_at_least_the_smallest() {
        let default = load_args(&[]);
        assert_eq!(default.max_op_chunk_bytes, ByteSize(16 << 30));
        assert_eq!(default.op_chunk_bytes, ByteSize(128 << 20));
        let flags = Flags::parse_from(["vae-svc", "--model-dir", "/m"]);
        let mut config: Config = config::load(None, &flags).unwrap();
        config.max_op_chunk_bytes = ByteSize(64 << 20);
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("max_op_chunk_bytes"), "{err}");
    }

    #[test]
    fn convolutions_split_tf32_unless_told_otherwise() {
        use klein_kernels::ConvPrecision as Kernel;
        assert_eq!(load_args(&[]).chunking().conv_precision, Kernel::SplitTf32);
        let exact = load_args(&["--conv-precision", "exact"]);
        assert_eq!(exact.chunking().conv_precision, Kernel::Exact);
        assert!(Flags::try_parse_from(["vae-svc", "--conv-precision", "fp8"]).is_err());
    }
}
