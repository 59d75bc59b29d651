//! `vae-svc`: serves `klein.v1.VaeService` until SIGTERM / SIGINT.

use std::process::ExitCode;

use clap::Parser;
use klein_runtime::{
    config::log_effective,
    server::{bind_and_serve, config_failed, shutdown_signal},
    telemetry::init_tracing,
};
use vae_svc::config::{self, Config, Flags};

fn main() -> ExitCode {
    let config = match config::load(&Flags::parse()) {
        Ok(config) => config,
        Err(e) => return config_failed("vae-svc", e),
    };
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run(config)),
        Err(e) => {
            eprintln!("vae-svc: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> ExitCode {
    init_tracing(config.server.log_format);
    log_effective("vae-svc", &config);
    bind_and_serve("vae-svc", config.server.listen, |listener| {
        vae_svc::serve(config, listener, shutdown_signal())
    })
    .await
}
