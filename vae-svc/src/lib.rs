//! vae-svc: the FLUX.2 VAE (`AutoencoderKLFlux2`) behind `klein.v1.VaeService`.
//!
//! Encode turns RGB images into the packed, BatchNorm-normalised latent tokens the
//! transformer works on; Decode turns them back into u8 pixels. Decoding runs in f32 by
//! default (bf16 on request, f16 never: it overflows and yields black images). Every request
//! reserves its estimated activation peak through the memory budget; a decode that cannot fit
//! untiled is decoded in overlapping, blended tiles instead of being refused.
//!
//! # Layout
//! - [`model`]: the autoencoder in candle, laid out like the spec (imports candle and serde
//!   only).
//! - [`loader`]: diffusers folders and single files (BFL or diffusers names), weight bytes.
//! - [`memory`]: the activation estimates (the documented formula) and the decode plan.
//! - [`tiling`]: tile layout and overlap blending.
//! - [`image`]: pixels in and out, rounded as diffusers does.
//! - [`validate`]: wire requests -> checked requests, errors naming the field.
//! - [`engine`]: the model side, on the engine thread; [`service`]: admission and planning.
//! - [`grpc`]: the thin tonic handlers; [`config`], [`error`].
//! - [`serve`]: load, warm up, serve until shutdown (used by `main.rs` and the tests).

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod image;
pub mod loader;
pub mod memory;
pub mod model;
pub mod service;
pub mod tiling;
pub mod validate;

use std::{future::Future, sync::Arc};

use klein_runtime::{server::GrpcServer, telemetry};
use tokio::{net::TcpListener, sync::oneshot};
use tokio_util::sync::CancellationToken;

pub use crate::{config::Config, error::VaeError, service::Vae};

/// Loads the model, serves `klein.v1.VaeService` on `listener` (over TLS when configured;
/// health NOT_SERVING until a warm-up decode succeeded), and drains when `shutdown`
/// resolves. Also serves `/metrics` when `metrics_listen` is set. A failed warm-up stops the
/// server with its error.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), VaeError> {
    let server = GrpcServer::from_config(&[grpc::SERVICE_NAME], &config.server).await?;
    let vae = Arc::new(Vae::start(&config).await?);
    let stop = CancellationToken::new();
    if let Some(addr) = config.server.metrics_listen {
        let metrics = TcpListener::bind(addr).await?;
        let stopped = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve_metrics(metrics, stopped).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    let health = server.health();
    let (warm_tx, warm_rx) = oneshot::channel();
    let warm_vae = vae.clone();
    tokio::spawn(async move {
        let result = warm_vae.warm_up().await;
        if result.is_ok() {
            health.set_serving().await;
        }
        let _ = warm_tx.send(result);
    });
    let warm_failed = async {
        match warm_rx.await {
            Ok(Err(e)) => e,
            _ => std::future::pending().await,
        }
    };
    let serving = server.run(grpc::routes(vae), listener, stop.clone().cancelled_owned());
    tokio::pin!(serving);
    let failure = tokio::select! {
        result = &mut serving => {
            stop.cancel();
            return result.map_err(VaeError::from);
        }
        () = shutdown => None,
        err = warm_failed => Some(err),
    };
    stop.cancel();
    serving.await?;
    failure.map_or(Ok(()), Err)
}
