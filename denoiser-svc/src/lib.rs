//! denoiser-svc: the FLUX.2 [klein] flow transformer, its flow-match Euler sampler and the
//! `klein.v1.DenoiserService` (server-streaming `Denoise`, `Info`).
//!
//! A request carries prompt embeddings, a token grid, a step count, noise (a seed or an
//! explicit tensor) and a mode (text-to-image, image-to-image, inpainting, references, CFG for
//! base models). It is validated, reserves its estimated activation memory from the budget,
//! and is sampled step by step on the one engine thread that owns the model; each step streams
//! a progress event, the last one the packed latents for `VaeService.Decode`.
//!
//! # Layout
//! - [`model`]: `Flux2Transformer2DModel` in candle (spec §2); imports candle and serde only.
//! - [`weights`]: locating and loading a diffusers `transformer/` folder, a BFL single file or
//!   a GGUF file ([`gguf`]: its quantized projections kept in their blocks).
//! - [`sampler`]: the sigma schedule, Euler update and every mode; pure, generic over
//!   [`sampler::Velocity`].
//! - [`noise`]: the documented CPU generator behind seeds.
//! - [`preview`]: approximate latent→RGB previews.
//! - [`validate`]: `DenoiseRequest` → [`validate::ValidDenoiseRequest`] (INVALID_ARGUMENT
//!   naming the field).
//! - [`embeddings`]: validated prompt embeddings and the cache that keeps them under handles.
//! - [`admission`]: the activation-memory estimate a request reserves.
//! - [`graphed`]: the transformer as the engine runs it, its steps replayed from CUDA graphs.
//! - [`engine`]: the step engine thread (queue, cancellation, progress).
//! - [`grpc`]: the `DenoiserService` handlers.
//! - [`served`]: per-model request limits, defaults and Info entries.
//! - [`service`]: startup (device, models, budget, warm-up) and [`serve`]; `warm_up`: the
//!   warm-up steps and their GEMM tuning, its choices kept in a file between starts.
//! - [`config`], [`error`]: settings and the one error type with its status mapping.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod admission;
pub mod config;
pub mod embeddings;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod graphed;
pub mod grpc;
pub mod lora;
pub mod model;
pub mod noise;
pub mod preview;
pub mod sampler;
pub mod served;
pub mod service;
pub mod validate;
mod warm_up;
pub mod weights;

pub use config::Config;
pub use error::DenoiseError;
pub use service::serve;
