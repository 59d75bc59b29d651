//! encoder-svc: the FLUX.2 [klein] text encoder as a gRPC service.
//!
//! Prompts become the `[B, 512, 3·hidden]` embeddings the transformer reads: the Qwen3 chat
//! template, byte-level BPE tokens padded to 512, and the residual stream after decoder
//! layers 9, 18 and 27 of Qwen3-4B (klein-4B) or Qwen3-8B (klein-9B), whichever
//! `text_encoder/config.json` describes. Weights load as bf16/f32, are quantized at load time
//! (`--quantize q4k`: 4.5 bits per weight for the attention and MLP projections, 8.5 for the
//! embedding table, norms in the compute dtype: 1.95 GB for Qwen3-4B instead of 6.2 GB), or
//! come pre-quantized from a Qwen3 GGUF file. Repeated prompts are served from a bytes-bounded
//! LRU cache without model work.
//!
//! Why q4k: among the formats candle runs on both CPU and CUDA it has the best accuracy per
//! byte at 4 bits (a real-width projection, random weights: rel-L2 0.075 at 4.5 bits/weight
//! against q4_0's 0.086 at 4.5 and q4_1's 0.078 at 5.0; see `benches/encode.rs`). Rows whose
//! width is not a multiple of its 256-weight super-block (only tiny test models) fall back to
//! q4_0, which beat q4_1 on the fixtures (0.167 vs 0.178 rel-L2) at fewer bytes.
//!
//! # Layout
//! - [`model`]: Qwen3 in candle (candle and serde only): [`model::qwen3`] the encoder,
//!   [`model::quant`] dense or quantized layers, [`model::weights`] safetensors / quantizing
//!   loader and weight report, [`model::gguf`] GGUF names and metadata.
//! - [`prompt`]: chat template, `tokenizer.json`, right truncation and padding to 512.
//! - [`engine`]: the loaded encoder the engine thread owns; pads a batch and runs it.
//! - [`cache`]: the prompt-embedding cache keyed by (model, variant, prompt).
//! - [`budget`]: activation estimates and the budget left after weights.
//! - [`request`]: request validation (INVALID_ARGUMENT naming the field).
//! - [`service`]: cache -> admission -> engine -> response; the Info description.
//! - [`grpc`]: the thin `klein.v1.TextEncoderService` handlers.
//! - [`config`]: settings and flags; [`error`]: the error type and its gRPC mapping.
//! - [`serve`]: starts everything and serves until shutdown.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod budget;
pub mod cache;
pub mod config;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod model;
pub mod prompt;
pub mod request;
pub mod service;

use std::{future::Future, sync::Arc};

use klein_runtime::{server::GrpcServer, telemetry};
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use crate::{config::Config, error::EncoderError};

/// Full gRPC name of the service, for health checks.
pub const SERVICE_NAME: &str = "klein.v1.TextEncoderService";

/// Loads the model, warms it up, reports SERVING and serves on `listener` (over TLS when
/// configured) until `shutdown` resolves (then drains). Serves `/metrics` too when
/// `metrics_listen` is set.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EncoderError> {
    klein_runtime::config::log_effective("encoder-svc", &config);
    let server = GrpcServer::from_config(&[SERVICE_NAME], &config.server).await?;
    let service = Arc::new(service::EncoderService::start(&config).await?);
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = config.server.metrics_listen {
        let metrics_listener = TcpListener::bind(addr).await?;
        tokio::spawn(telemetry::serve_metrics(metrics_listener, async {
            let _ = metrics_stopped.await;
        }));
    }
    server.health().set_serving().await;
    let routes = Routes::new(grpc::TextEncoderGrpc::server(service));
    let served = server.run(routes, listener, shutdown).await;
    let _ = stop_metrics.send(());
    Ok(served?)
}
