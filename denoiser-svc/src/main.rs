//! `denoiser-svc`: serves `klein.v1.DenoiserService` (see the library docs).

use std::process::ExitCode;

use clap::Parser;
use denoiser_svc::config::{Config, Flags};
use klein_runtime::{config, server::shutdown_signal, telemetry};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    let flags = Flags::parse();
    let config: Config = match config::load(flags.config.as_deref(), &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("denoiser-svc: {e}");
            return ExitCode::from(64);
        }
    };
    telemetry::init_tracing(config.server.log_format);
    config::log_effective("denoiser", &config);
    let listener = match TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.server.listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match denoiser_svc::serve(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "denoiser-svc stopped");
            ExitCode::FAILURE
        }
    }
}
