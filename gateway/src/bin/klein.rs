//! `klein`: start the whole stack (`klein serve`) or talk to a running gateway.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use gateway::{cli, stack};
use klein_runtime::{bytesize::ByteSize, device::DeviceSpec, server::shutdown_signal, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "klein",
    about = "FLUX.2 [klein] image generation: serve the stack or use it"
)]
struct Args {
    /// Gateway address for client commands.
    #[arg(long, global = true, default_value = "http://127.0.0.1:50050")]
    addr: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the encoder, denoiser, VAE and gateway in this process, sharing one device.
    Serve(ServeArgs),
    #[command(flatten)]
    Client(cli::Command),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Diffusers pipeline folder (e.g. a FLUX.2-klein-4B download); default: the bundled tiny model.
    #[arg(long, conflicts_with = "model")]
    model_dir: Option<PathBuf>,
    /// Hugging Face repo id resolved in the local HF cache (no download), e.g. black-forest-labs/FLUX.2-klein-4B.
    #[arg(long)]
    model: Option<String>,
    /// Gateway listen address.
    #[arg(long, default_value = "127.0.0.1:50050")]
    listen: SocketAddr,
    /// HTTP API (OpenAI Images, jobs) and web page listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// Device shared by the three services: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Encoder memory budget (the defaults are the measured 16 GB GPU plan; on a GPU the
    /// encoder also runs 4-bit, see README).
    #[arg(long, default_value = "2880MiB")]
    encoder_budget: ByteSize,
    /// Denoiser memory budget.
    #[arg(long, default_value = "10048MiB")]
    denoiser_budget: ByteSize,
    /// VAE memory budget.
    #[arg(long, default_value = "3328MiB")]
    vae_budget: ByteSize,
    /// Gateway /metrics listen address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// A further pipeline folder served as model ID, `ID=PATH` (repeatable; e.g. klein-9B next
    /// to the default klein-4B).
    #[arg(long = "add-model", value_name = "ID=PATH")]
    add_models: Vec<String>,
    /// Cap on model weights each of the encoder and the denoiser keeps in host RAM, e.g. 50GB.
    #[arg(long)]
    host_memory_cap: Option<ByteSize>,
}

async fn serve(args: ServeArgs) -> ExitCode {
    let model_dir = match (args.model_dir, args.model) {
        (Some(dir), _) => dir,
        (None, Some(repo)) => match stack::hf_cache_snapshot(&repo) {
            Some(dir) => dir,
            None => {
                eprintln!(
                    "klein: {repo} is not in the local Hugging Face cache (nothing is downloaded); use --model-dir"
                );
                return ExitCode::from(64);
            }
        },
        (None, None) => stack::bundled_model(),
    };
    let mut opts = stack::StackOptions::new(&model_dir, args.device, args.listen).budgets(
        args.encoder_budget,
        args.denoiser_budget,
        args.vae_budget,
    );
    if args.device != DeviceSpec::Cpu {
        opts = opts.gpu_16gb_settings();
    }
    for arg in &args.add_models {
        match klein_runtime::models::parse_model_arg(arg) {
            Ok((Some(id), path)) => opts = opts.add_model(&id, &path),
            Ok((None, _)) | Err(_) => {
                eprintln!("klein: --add-model {arg:?}: expected ID=PATH");
                return ExitCode::from(64);
            }
        }
    }
    if let Some(cap) = args.host_memory_cap {
        opts = opts.host_memory_caps(cap, cap);
    }
    opts.gateway.server.metrics_listen = args.metrics_listen;
    opts.gateway.http_listen = Some(args.http_listen);
    tracing::info!(model_dir = %model_dir.display(), device = %args.device, "starting the stack");
    let mut running = match stack::start(opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("klein: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = running.ready(Duration::from_secs(600)).await {
        eprintln!("klein: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "klein: serving on http://{} (try: klein generate \"a photo of a cat\")",
        running.addr
    );
    if let Some(http) = running.http_addr {
        eprintln!("klein: web page and HTTP API on http://{http}/");
    }
    match running.run_until(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("klein: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => {
            eprintln!("klein: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> ExitCode {
    match args.command {
        Command::Serve(s) => {
            telemetry::init_tracing(telemetry::LogFormat::Pretty);
            serve(s).await
        }
        Command::Client(c) => match cli::run(&args.addr, c).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("klein: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
