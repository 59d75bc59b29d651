//! The Qwen3 text encoder in candle: the model ([`qwen3`]), dense or block-quantized layers
//! ([`quant`]), and where the weights come from ([`weights`]: safetensors, quantized at load
//! time or not; [`gguf`]: pre-quantized llama.cpp files).
//!
//! These files use candle and serde only; no service code lives here.

pub mod gguf;
pub mod quant;
pub mod qwen3;
pub mod weights;
