use std::process::ExitCode;

use clap::Parser;
use gateway::config::{Config, Flags};
use klein_runtime::{config, server::shutdown_signal, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let flags = Flags::parse();
    let config: Config = match config::load(flags.config.as_deref(), &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(64);
        }
    };
    telemetry::init_tracing(config.server.log_format);
    config::log_effective("gateway", &config);
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %config.server.listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match gateway::serve(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            ExitCode::FAILURE
        }
    }
}
