//! `denoiser-svc`: serves `klein.v1.DenoiserService` (see the library docs).

use std::process::ExitCode;

use clap::Parser;
use denoiser_svc::config::{Config, Flags};
use klein_runtime::{
    config,
    server::{bind_and_serve, config_failed, shutdown_signal},
    telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let flags = Flags::parse();
    let config: Config = match config::load(flags.config.as_deref(), &flags) {
        Ok(c) => c,
        Err(e) => return config_failed("denoiser-svc", e),
    };
    telemetry::init_tracing(config.server.log_format);
    config::log_effective("denoiser", &config);
    bind_and_serve("denoiser-svc", config.server.listen, |listener| {
        denoiser_svc::serve(config, listener, shutdown_signal())
    })
    .await
}
