//! The `encoder-svc` binary: flags -> config -> [`encoder_svc::serve`].

use clap::Parser;
use encoder_svc::config::Flags;
use klein_runtime::{server::shutdown_signal, telemetry};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    let config = match flags.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("encoder-svc: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    telemetry::init_tracing(config.server.log_format);
    let result = async {
        config.validate()?;
        let listener = TcpListener::bind(config.server.listen).await?;
        encoder_svc::serve(config, listener, shutdown_signal()).await
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "encoder-svc stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
