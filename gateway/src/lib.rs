//! klein-serve gateway: the public `ImageService`.
//!
//! # Layout
//! - [`config`]: stage addresses, limits, timeouts (layered like every service).
//! - [`validate`]: `GenerateRequest` -> `ValidGenerate`, every field checked and named.
//! - [`image_io`], [`preprocess`]: input decoding (PNG/JPEG/WebP, EXIF, alpha) and the
//!   diffusers-faithful resize/crop/mask preparation; PNG output with text chunks.
//! - [`clients`]: balanced stage clients, deadlines, trace context, retries, TLS.
//! - [`replicas`]: health probes that take dead stage replicas out of the balancer.
//! - [`embeddings`]: the denoisers' embeddings handles a repeated prompt reuses.
//! - [`auth`]: the optional API key of the ImageService (constant-time compare).
//! - [`pipeline`]: one request end to end (encode -> denoise -> decode -> PNG).
//! - [`catalog`]: models and service infos learnt from the stages.
//! - [`routing`]: per-model channels (replicas that serve the requested model).
//! - [`grpc`]: the thin ImageService handlers.
//! - [`http`]: the HTTP face (OpenAI Images API, jobs, health, OpenAPI, the web page) over the
//!   same `ImageApi`.
//! - [`tensors`]: wire-tensor plumbing (images, masks, batch repeat).
//! - [`stack`]: the one-command stack (all services + gateway in one process).
//! - [`cli`]: the `klein` command-line client.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod auth;
pub mod catalog;
pub mod cli;
pub mod clients;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod grpc;
pub mod http;
pub mod image_io;
pub mod pipeline;
pub mod png_bands;
pub mod preprocess;
pub mod replicas;
pub mod routing;
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
use tokio_util::sync::CancellationToken;
use tonic::service::{Routes, interceptor::InterceptedService};

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
    #[error("HTTP listener: {0}")]
    Http(std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
    #[error("a component stopped unexpectedly")]
    Stopped,
    #[error("a component panicked: {0}")]
    Panicked(String),
    #[error("not ready after {0:?}")]
    NotReady(Duration),
}

/// Serves the ImageService on `listener` until `shutdown`, and the HTTP API on
/// `config.http_listen` when set. Health turns SERVING once the denoiser has described its
/// model (the gateway needs it to validate requests) and the encoder and the VAE answer too
/// (each answers once its model is loaded): a request needs all three.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let http = match config.http_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(Error::Http)?),
        None => None,
    };
    serve_with_http(config, listener, http, shutdown).await
}

/// As [`serve`], with the HTTP listener (if any) bound by the caller.
pub async fn serve_with_http(
    config: Config,
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let config = Arc::new(config);
    if let Some(key) = &config.api_key {
        key.check().map_err(|e| Error::Config(e.into()))?;
    }
    let stage_tls = config
        .stage_tls
        .load()
        .map_err(|e| Error::Config(format!("stage_tls: {e}")))?;
    let stages = Stages::new(
        &config.encoder_addrs,
        &config.denoiser_addrs,
        &config.vae_addrs,
        config.max_attempts,
        stage_tls.as_ref(),
    )?;
    let catalog = Arc::new(RwLock::new(Catalog::default()));
    let server = GrpcServer::from_config(&[SERVICE_NAME], &config.server)
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let health = server.health();
    let refresher = {
        let (stages, catalog) = (stages.clone(), catalog.clone());
        tokio::spawn(async move {
            let mut serving = false;
            loop {
                if let Some(fresh) = catalog::refresh(&stages).await {
                    let ids: Vec<String> = fresh.models.iter().map(|m| m.id.clone()).collect();
                    if let Ok(mut c) = catalog.write() {
                        *c = fresh;
                    }
                    // A request needs every stage: SERVING once each one answers (a stage
                    // answers only once its model is loaded).
                    if !serving && catalog::gather_infos(&stages).await.len() == 3 {
                        tracing::info!(models = ?ids, "every stage reachable: serving");
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
    let api = Arc::new(grpc::ImageApi::new(stages, config.clone(), catalog.clone()));
    let stop_http = CancellationToken::new();
    let http = http_listener.map(|l| {
        let state = http::AppState {
            api: api.clone(),
            config: config.clone(),
            catalog,
            jobs: http::jobs::JobStore::default(),
        };
        let drain = config.server.drain_timeout();
        tokio::spawn(http::serve(l, state, stop_http.clone(), drain))
    });
    let max_request = usize::try_from(config.limits.max_request_bytes.0).unwrap_or(usize::MAX);
    let routes = Routes::new(InterceptedService::new(
        ImageServiceServer::from_arc(api)
            .max_decoding_message_size(max_request)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        auth::interceptor(config.api_key.clone()),
    ));
    let result = server.run(routes, listener, shutdown).await;
    stop_http.cancel();
    if let Some(task) = http {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server failed"),
            Err(e) => tracing::warn!(error = %e, "HTTP server panicked"),
        }
    }
    refresher.abort();
    Ok(result?)
}
