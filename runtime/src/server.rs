//! The gRPC server bootstrap shared by every service.
//!
//! [`GrpcServer::run`] serves the service's [`Routes`] on a given listener together with
//! `grpc.health.v1` and reflection (v1 and v1alpha). Health starts NOT_SERVING for the whole
//! server (`""`) and the listed services; the service flips it to SERVING through [`Health`]
//! once its model is loaded and warmed up. When `shutdown` resolves (see [`shutdown_signal`]),
//! health goes back to NOT_SERVING, the server stops accepting and sends GOAWAY, and in-flight
//! requests get `drain_timeout` to finish; after that the server future returns anyway.
//! A separate `liveness` service stays SERVING while the process runs, for liveness probes that
//! must not fail just because the model is busy or draining.
//!
//! Message size limits are set per generated service (`max_decoding_message_size`), so each
//! service applies [`klein_proto::MAX_MESSAGE_BYTES`] when it builds its routes.
//!
//! [`GrpcServer::from_config`] also turns on TLS or mutual TLS when the config names a
//! certificate (see [`crate::tls`]); health and reflection are then served over TLS too.

use std::{fmt::Display, future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use tokio::net::TcpListener;
use tonic::{
    service::Routes,
    transport::{Server, ServerTlsConfig, server::TcpIncoming},
};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    config::ServerConfig,
    tls::{TlsError, server_tls},
};

/// Health service name that stays SERVING while the process is alive.
pub const LIVENESS_SERVICE: &str = "liveness";

/// HTTP/2 stream window: large tensors move in few round trips.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// HTTP/2 connection window.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame this end accepts (the protocol's default is 16 KiB): a request's 7.9 MB
/// of prompt embeddings crosses in 8 frames instead of ~500, which halved its loopback transfer
/// (12 → 6.5 ms on a 2-core machine).
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// Flips the server's readiness.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<String>,
}

impl Health {
    /// Reports the whole server and its services SERVING (model loaded and warm).
    pub async fn set_serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// Reports the whole server and its services NOT_SERVING (loading or draining).
    pub async fn set_not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for name in &self.services {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// Errors from serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A gRPC server with health, reflection, raised limits and graceful drain.
pub struct GrpcServer {
    health: Health,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    drain_timeout: Duration,
    tls: Option<ServerTlsConfig>,
}

impl GrpcServer {
    /// A server whose health covers `services` (their full gRPC names, e.g.
    /// `klein.v1.VaeService`), NOT_SERVING until [`Health::set_serving`].
    pub async fn new(services: &[&str], drain_timeout: Duration) -> Self {
        let reporter = HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        let health = Health {
            reporter,
            services: services.iter().map(|s| s.to_string()).collect(),
        };
        health.set_not_serving().await;
        health
            .reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        Self {
            health,
            health_service,
            drain_timeout,
            tls: None,
        }
    }

    /// As [`GrpcServer::new`] with the drain timeout and TLS (off, TLS or mutual TLS) of
    /// `config`; fails when a TLS setting is incomplete or a file cannot be read.
    pub async fn from_config(services: &[&str], config: &ServerConfig) -> Result<Self, TlsError> {
        let tls = server_tls(config)?;
        let mut server = Self::new(services, config.drain_timeout()).await;
        server.tls = tls;
        Ok(server)
    }

    /// The readiness handle.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serves `routes` plus health and reflection on `listener` until `shutdown` resolves,
    /// then drains for at most the drain timeout.
    pub async fn run(
        self,
        routes: Routes,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(klein_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(klein_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let routes = routes
            .add_service(self.health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let addr = listener.local_addr().ok();
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let tls = self.tls.is_some();
        let mut builder = Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls)?;
        }
        let server = builder
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            });
        tokio::pin!(server);
        tracing::info!(?addr, tls, "gRPC server listening");
        tokio::select! {
            res = &mut server => return Ok(res?),
            () = shutdown => {}
        }
        tracing::info!(drain_timeout = ?self.drain_timeout, "shutdown requested: draining");
        self.health.set_not_serving().await;
        let _ = stop_tx.send(());
        match tokio::time::timeout(self.drain_timeout, server).await {
            Ok(res) => res?,
            Err(_) => tracing::warn!("drain deadline passed; dropping remaining connections"),
        }
        tracing::info!("server stopped");
        Ok(())
    }
}

/// Exit code of a binary whose configuration cannot be loaded or is invalid (`EX_USAGE`).
pub fn config_failed(binary: &str, error: impl Display) -> ExitCode {
    eprintln!("{binary}: {error}");
    ExitCode::from(64)
}

/// What every service binary does once its configuration is loaded: binds `listen`, runs
/// `serve` on the listener (which serves until [`shutdown_signal`]), and logs why it stopped.
pub async fn bind_and_serve<F, Fut, E>(binary: &str, listen: SocketAddr, serve: F) -> ExitCode
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "{binary}: cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match serve(listener).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{binary} stopped");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_binary_exits_with_failure_when_it_cannot_listen_or_its_server_fails() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let code = bind_and_serve("test", addr, |_| async { Ok::<_, String>(()) }).await;
        assert_eq!(code, ExitCode::FAILURE, "the port is taken");
        drop(taken);
        let free: SocketAddr = ([127, 0, 0, 1], 0).into();
        let served = bind_and_serve("test", free, |_| async { Ok::<_, String>(()) }).await;
        assert_eq!(served, ExitCode::SUCCESS);
        let failed = bind_and_serve("test", free, |_| async { Err("model gone".to_owned()) }).await;
        assert_eq!(failed, ExitCode::FAILURE);
        assert_eq!(config_failed("test", "bad flag"), ExitCode::from(64));
    }
}
