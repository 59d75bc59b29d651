//! klein-serve gateway: the public `ImageService`.
//!
//! # Layout
//! - [`config`]: stage addresses, limits, timeouts (layered like every service).
//! - [`validate`]: `GenerateRequest` -> `ValidGenerate`, every field checked and named.
//! - [`image_io`], [`preprocess`]: input decoding (PNG/JPEG/WebP, EXIF, alpha) and the
//!   diffusers-faithful resize/crop/mask preparation; PNG output with text chunks.
//! - [`clients`]: balanced stage clients, deadlines, trace context, retries.
//! - [`pipeline`]: one request end to end (encode -> denoise -> decode -> PNG).
//! - [`catalog`]: models and service infos learnt from the stages.
//! - [`grpc`]: the thin ImageService handlers.
//! - [`tensors`]: wire-tensor plumbing (images, masks, batch repeat).
//! - [`stack`]: the one-command stack (all services + gateway in one process).
//! - [`cli`]: the `klein` command-line client.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod catalog;
pub mod cli;
pub mod clients;
pub mod config;
pub mod error;
pub mod grpc;
pub mod image_io;
pub mod pipeline;
pub mod preprocess;
pub mod stack;
pub mod tensors;
pub mod validate;

use std::{
    future::Future,
    sync::{Arc, RwLock},
    time::Duration,
};

use klein_proto::{MAX_MESSAGE_BYTES, pb::image_service_server::ImageServiceServer};
use klein_runtime::server::{GrpcServer, ServeError};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::{catalog::Catalog, clients::Stages, config::Config};

/// Full gRPC name of the public service.
pub const SERVICE_NAME: &str = "klein.v1.ImageService";

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Address(#[from] clients::AddressError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("metrics listener: {0}")]
    Metrics(std::io::Error),
    #[error("a component stopped unexpectedly")]
    Stopped,
    #[error("a component panicked: {0}")]
    Panicked(String),
    #[error("not ready after {0:?}")]
    NotReady(Duration),
}

/// Serves the ImageService on `listener` until `shutdown`. Health turns SERVING once the
/// denoiser has described its model (the gateway needs it to validate requests).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let config = Arc::new(config);
    let stages = Stages::new(
        &config.encoder_addrs,
        &config.denoiser_addrs,
        &config.vae_addrs,
        config.max_attempts,
    )?;
    let catalog = Arc::new(RwLock::new(Catalog::default()));
    let server = GrpcServer::new(&[SERVICE_NAME], config.server.drain_timeout()).await;
    let health = server.health();
    let refresher = {
        let (stages, catalog) = (stages.clone(), catalog.clone());
        tokio::spawn(async move {
            let mut serving = false;
            loop {
                if let Some(info) = catalog::denoiser_info(&stages).await {
                    if let Ok(mut c) = catalog.write() {
                        *c = Catalog::from_denoiser(&info);
                    }
                    if !serving {
                        tracing::info!(model = %info.model_id, "denoiser reachable: serving");
                        health.set_serving().await;
                        serving = true;
                    }
                }
                tokio::time::sleep(Duration::from_secs(if serving { 30 } else { 1 })).await;
            }
        })
    };
    if let Some(addr) = config.server.metrics_listen {
        let l = TcpListener::bind(addr).await.map_err(Error::Metrics)?;
        tokio::spawn(klein_runtime::telemetry::serve_metrics(
            l,
            std::future::pending(),
        ));
    }
    let api = grpc::ImageApi::new(stages, config.clone(), catalog);
    let routes = Routes::new(
        ImageServiceServer::new(api)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let result = server.run(routes, listener, shutdown).await;
    refresher.abort();
    Ok(result?)
}
