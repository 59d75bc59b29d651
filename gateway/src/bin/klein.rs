//! `klein`: start the whole stack (`klein serve`) or talk to a running gateway.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{
    Parser, Subcommand,
    builder::{OsStringValueParser, TypedValueParser},
};
use denoiser_svc::config::{AdapterSpec, LoraSpec, Quantize};
use encoder_svc::model::quant::QuantFormat;
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
    /// Quantize a pipeline's transformer and/or text encoder once into GGUF files (for
    /// `serve --transformer` and `serve --text-encoder-gguf`).
    Quantize(QuantizeArgs),
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
    /// Encoder memory budget; default: the measured 16 GB GPU plan for the model (klein-4B:
    /// 2880MiB, klein-9B: 4800MiB; on a GPU the encoder runs 4-bit, see README).
    #[arg(long)]
    encoder_budget: Option<ByteSize>,
    /// Denoiser memory budget; default: the 16 GB plan's (klein-4B: 10048MiB, klein-9B:
    /// 8128MiB).
    #[arg(long)]
    denoiser_budget: Option<ByteSize>,
    /// VAE memory budget; default: the 16 GB plan's (3328MiB).
    #[arg(long)]
    vae_budget: Option<ByteSize>,
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
    /// Load-time quantization of the transformer's block projections: none, q4k, q4_0, q4_1,
    /// q6k or q8_0; default: on a GPU the 16 GB plan's (klein-9B: q4k, 5.6 GB of weights
    /// instead of 18.2), else none.
    #[arg(long)]
    quantize_transformer: Option<Quantize>,
    /// A transformer file served in place of the pipeline's `transformer/`: a BFL single file
    /// or a GGUF file (ComfyUI-GGUF / stable-diffusion.cpp layout, e.g. a pre-quantized
    /// Q4_K_M klein-9B: its stored blocks are used as they are).
    #[arg(long)]
    transformer: Option<PathBuf>,
    /// A pre-quantized Qwen3 GGUF file (llama.cpp's layout) for the text encoder's weights,
    /// in place of the pipeline's `text_encoder/` (its tokenizer is still used).
    #[arg(long)]
    text_encoder_gguf: Option<PathBuf>,
    /// File keeping the denoiser's GEMM tuning choices between starts, checked bit for bit
    /// before use; default `$XDG_CACHE_HOME/klein/gemm-tuning.json`, else
    /// `~/.cache/klein/gemm-tuning.json` ("" = off).
    #[arg(long, value_parser = TypedValueParser::map(OsStringValueParser::new(), PathBuf::from))]
    gemm_tuning_cache: Option<PathBuf>,
    /// A LoRA merged into the default model's transformer at load, `PATH` or `PATH:SCALE`
    /// (repeatable; diffusers', ai-toolkit's or kohya's safetensors layout).
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    lora: Vec<LoraSpec>,
    /// A LoRA adapter requests may apply to the default model by name, unmerged, `NAME=PATH`
    /// (repeatable; the same layouts as --lora; `klein generate --lora NAME[:SCALE]`).
    #[arg(long = "adapter", value_name = "NAME=PATH")]
    adapter: Vec<AdapterSpec>,
}

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("outputs").required(true).multiple(true))]
struct QuantizeArgs {
    /// Diffusers pipeline folder (or, for the transformer alone, its transformer/ folder or a
    /// BFL single file).
    #[arg(long)]
    model_dir: PathBuf,
    /// Block format of the projections: q4k, q4_0, q4_1, q6k or q8_0 (the text encoder's
    /// embedding table takes q8_0, as `serve` quantizes it).
    #[arg(long, default_value = "q4k")]
    format: QuantFormat,
    /// The transformer's GGUF file to write.
    #[arg(long, group = "outputs")]
    out: Option<PathBuf>,
    /// The text encoder's (Qwen3) GGUF file to write.
    #[arg(long, group = "outputs")]
    text_encoder_out: Option<PathBuf>,
    /// Where the blocks are quantized: cpu (the host's cores) or cuda / cuda:N (the same
    /// bytes, in a fraction of the time).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// Writes the transformer and/or the text encoder of `args.model_dir` as GGUF files with
/// quantized projections.
fn quantize(args: QuantizeArgs) -> ExitCode {
    let device = match args.device.open() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("klein: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = |out: &std::path::Path, what: &str, started: std::time::Instant| {
        eprintln!(
            "klein: wrote {} ({what}) in {:.1} s",
            out.display(),
            started.elapsed().as_secs_f64()
        );
    };
    if let Some(out) = &args.out {
        let started = std::time::Instant::now();
        let written = denoiser_svc::weights::Checkpoint::locate(&args.model_dir)
            .and_then(|c| denoiser_svc::gguf::write_gguf(&c, args.format, out, &device));
        match written {
            Ok(w) => report(
                out,
                &format!(
                    "transformer: {} tensors, {} projections in {}, {:.2} GB",
                    w.tensors,
                    w.quantized,
                    args.format,
                    w.bytes as f64 / 1e9
                ),
                started,
            ),
            Err(e) => {
                eprintln!("klein: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(out) = &args.text_encoder_out {
        let started = std::time::Instant::now();
        let plan = encoder_svc::model::weights::QuantPlan::projections_in(args.format);
        match encoder_svc::model::gguf::write_gguf(&args.model_dir, plan, out, &device) {
            Ok(w) => report(
                out,
                &format!(
                    "text encoder: {} tensors, {} in blocks, {:.2} GB",
                    w.tensors,
                    w.quantized,
                    w.bytes as f64 / 1e9
                ),
                started,
            ),
            Err(e) => {
                eprintln!("klein: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
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
    let gpu = args.device != DeviceSpec::Cpu;
    let plan = if gpu {
        stack::Gpu16Gb::for_model(args.transformer.as_deref().unwrap_or(&model_dir))
    } else {
        stack::Gpu16Gb::Klein4b
    };
    let [encoder, denoiser, vae] = plan.budgets();
    let mut opts = stack::StackOptions::new(&model_dir, args.device, args.listen).budgets(
        args.encoder_budget.unwrap_or(encoder),
        args.denoiser_budget.unwrap_or(denoiser),
        args.vae_budget.unwrap_or(vae),
    );
    if gpu {
        opts = opts.gpu_16gb_settings(plan);
        tracing::info!(?plan, "16 GB GPU plan");
    }
    if let Some(quantize) = args.quantize_transformer {
        opts.denoiser.quantize = quantize;
    }
    if let Some(path) = &args.transformer {
        opts = opts.transformer(path);
    }
    if let Some(path) = &args.text_encoder_gguf {
        opts = opts.text_encoder_gguf(path);
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
    if let Some(path) = args.gemm_tuning_cache {
        opts.denoiser.gemm_tuning_cache = Some(path);
    }
    opts.denoiser.lora = args.lora;
    opts.denoiser.adapters = args.adapter;
    opts.gateway.server.metrics_listen = args.metrics_listen;
    opts.gateway.http_listen = Some(args.http_listen);
    tracing::info!(model_dir = %model_dir.display(), device = %args.device, "starting the stack");
    let hint = opts.quantize_once_hint();
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
    if let Some(hint) = hint {
        eprintln!("klein: {hint}");
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
        Command::Quantize(q) => quantize(q),
        Command::Client(c) => match cli::run(&args.addr, c).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("klein: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
