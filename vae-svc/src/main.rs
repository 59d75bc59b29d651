//! `vae-svc`: serves `klein.v1.VaeService` until SIGTERM / SIGINT.

use std::process::ExitCode;

use clap::Parser;
use klein_runtime::{config::log_effective, server::shutdown_signal, telemetry::init_tracing};
use tokio::net::TcpListener;
use vae_svc::config::{self, Flags};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match config::load(&Flags::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vae-svc: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.server.log_format);
    log_effective("vae-svc", &config);
    let listener = match TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.server.listen, error = %e, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    match vae_svc::serve(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "vae-svc stopped");
            ExitCode::FAILURE
        }
    }
}
