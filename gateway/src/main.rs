//! `gateway`: serves the public `klein.v1.ImageService` over the three stage services.

use std::process::ExitCode;

use clap::Parser;
use gateway::config::{Config, Flags};
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
        Err(e) => return config_failed("gateway", e),
    };
    telemetry::init_tracing(config.server.log_format);
    config::log_effective("gateway", &config);
    bind_and_serve("gateway", config.server.listen, |listener| {
        gateway::serve(config, listener, shutdown_signal())
    })
    .await
}
