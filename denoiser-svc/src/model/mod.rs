//! The FLUX.2 [klein] flow transformer in candle (spec §2). Imports candle (and its `half`),
//! serde and `klein_kernels` only.
//!
//! - [`transformer`]: `Config` (`transformer/config.json`) and `Flux2Transformer2DModel`.
//! - [`blocks`]: the blocks bottom-up (timestep embedding, modulation, double/single stream,
//!   output norm).
//! - [`layers`]: QK RMSNorm with RoPE, the SwiGLU feed-forward (arithmetic in `klein_kernels`).
//! - [`projection`]: the linear layers under their checkpoint names, with a request's unmerged
//!   LoRA terms.
//! - [`embeddings`]: timestep features (τ rounding) and the 4-axis RoPE tables.
//! - [`attention`]: chunked attention and interleaved RoPE application.
//! - [`bfl`]: BFL single-file checkpoints read under diffusers names.

pub mod attention;
pub mod bfl;
pub mod blocks;
pub mod embeddings;
pub mod layers;
pub mod projection;
pub mod transformer;

pub use attention::AttentionConfig;
pub use embeddings::{PositionId, Rope, grid_ids, text_ids};
pub use transformer::{Config, Flux2Transformer2DModel};
