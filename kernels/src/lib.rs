//! Fused kernels for the klein models, one place for all of them: the transformer's flash attention
//! and elementwise chains, the text encoder's masked grouped-query attention, RMSNorm, rotate-half
//! RoPE and block-quantized weight dequantization (ggml formats straight to bf16, [`dequantize`];
//! fp8 weights with their scale, [`scale_fp8`]),
//! and the VAE's GroupNorm (+ SiLU), the tiled decode's group norms with image-wide statistics
//! (moments over a tile's own part, then a per-channel affine), its convolutions through cuDNN
//! (bias and residual fused, exact / TF32 / split-TF32 arithmetic, `cudnn` feature; its CPU
//! reference is the composition) and its output's 8-bit quantization; and the transformer's linear
//! layers ([`Linear`]: cuBLASLt on CUDA bf16, with each large product's algorithm optionally tuned
//! at the card's power cap, [`tune_linear`]; a weight dense or in ggml blocks, [`quant`],
//! dequantized for each product).
//!
//! Every kernel is a candle custom op with two forwards: `cuda_fwd` launches the CUDA kernel
//! (`src/cuda/*.cu`, compiled to PTX by `build.rs` with the `cuda` feature, bf16 only) and
//! `cpu_fwd` computes the same function in plain Rust (the CPU reference of the kernel's
//! contract). Each op also has its stock-candle composition in [`reference`], which is what the
//! model computes where the kernel does not apply (CPU, f32) and what the parity tests compare
//! the kernels against.
//!
//! The public functions dispatch: the fused op on a CUDA bf16 tensor of a supported shape, the
//! reference composition otherwise. The decoder output's quantization ([`rgb_u8`], f32 or bf16)
//! has no composition: it is the op everywhere, its `cpu_fwd` on the CPU. A build for compute capability 9.0 (Hopper,
//! `cfg(klein_sm90a)`) runs the transformer's attention on its own kernel (wgmma and tensor-map
//! copies, `flash_attention_sm90.cu`); the other kernels are the same on every architecture.
//! [`upload`] brings checkpoint bytes into tensors: copied by every core, sent to a GPU in
//! page-locked transfers.

mod attention;
mod conv;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod dequantize;
mod fp8;
mod group_norm;
mod group_stats;
mod linear;
mod modulate;
mod pad;
mod pixels;
pub mod quant;
pub mod reference;
mod residual;
mod residual_norm;
mod rms_norm;
mod rope;
mod swiglu;
pub mod upload;

pub use attention::{
    FlashAttention, QNorm, flash_attention, flash_attention_applies, flash_attention_f32_applies,
    flash_attention_fused, flash_attention_split_v, flash_attention_split_v_norm_q,
    flash_attention_with_swiglu, flash_attention_with_swiglu_norm_q, masked_attention,
};
pub use conv::{
    Conv, ConvPrecision, ConvWeights, Prologue, Tf32Split, conv_banded, conv_fused, conv2d,
    conv2d_banded, conv2d_with, tf32_split, upsample_conv2d, upsample_conv2d_banded,
};
pub use dequantize::{dequantize, fused_dequantize_formats};
pub use fp8::scale_fp8;
pub use group_norm::{GroupNorm, GroupNormAffine, group_norm, group_norm_affine, group_norm_fused};
pub use group_stats::{ChannelAffine, GroupMoments, channel_affine, group_moments};
pub use linear::{
    BlockSource, Linear, MIN_GAIN, StoredBlocks, TUNED_FLOP, Tuned, TuningCache, XWt,
    linear_no_bias, stacked_linear, tune_linear,
};
pub use modulate::{LayerNormModulate, layer_norm_modulate};
pub use pad::{PadRows, pad_rows};
pub use pixels::{RgbU8, rgb_u8};
pub use residual::{GateResidual, gate_residual};
pub use residual_norm::{GateResidualNorm, gate_residual_norm};
pub use rms_norm::{RmsNorm, rms_norm};
pub use rope::{JointQkNormRope, QkNormRope, RopeStyle, qk_norm_rope, qk_norm_rope_joint};
pub use swiglu::{SwiGlu, swiglu};

use candle_core::{DType, Tensor};

/// Whether `t` is a tensor the CUDA kernels take: bf16 on a CUDA device, in a `cuda` build.
pub fn fused(t: &Tensor) -> bool {
    cfg!(feature = "cuda") && t.device().is_cuda() && t.dtype() == DType::BF16
}
