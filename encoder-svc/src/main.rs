//! The `encoder-svc` binary: flags -> config -> [`encoder_svc::serve`].

use std::process::ExitCode;

use clap::Parser;
use encoder_svc::config::Flags;
use klein_runtime::{
    config::log_effective,
    server::{bind_and_serve, config_failed, shutdown_signal},
    telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Flags::parse().load().and_then(|c| c.validate().map(|()| c)) {
        Ok(c) => c,
        Err(e) => return config_failed("encoder-svc", e),
    };
    telemetry::init_tracing(config.server.log_format);
    log_effective("encoder-svc", &config);
    bind_and_serve("encoder-svc", config.server.listen, |listener| {
        encoder_svc::serve(config, listener, shutdown_signal())
    })
    .await
}
