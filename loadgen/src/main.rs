use std::{process::ExitCode, time::Duration};

use clap::Parser;
use klein_proto::pb;
use loadgen::{Kind, LoadConfig, Mode, Workload, parse_lora_set};

/// Bounded load generator for the klein-serve gateway (loopback targets only by default).
#[derive(Debug, Parser)]
#[command(name = "loadgen")]
struct Args {
    /// Gateway URL.
    #[arg(long, default_value = "http://127.0.0.1:50050")]
    target: String,
    /// Allow a non-loopback target.
    #[arg(long)]
    allow_remote: bool,
    /// Open loop: requests per second (conflicts with --concurrency).
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Closed loop: concurrent workers.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Hard cap on requests.
    #[arg(long, default_value_t = 100)]
    requests: u64,
    /// Hard cap on seconds spent starting requests.
    #[arg(long, default_value_t = 60.0)]
    duration_secs: f64,
    /// Per-request deadline, seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout_secs: f64,
    /// Request kinds, repeated by weight: e.g. t2i,t2i,i2i,inpaint.
    #[arg(long, value_delimiter = ',', default_value = "t2i")]
    mix: Vec<Kind>,
    /// Sizes WxH, comma-separated (multiples of 16).
    #[arg(long, value_delimiter = ',', default_value = "64x64")]
    sizes: Vec<String>,
    /// Steps per request (0 = the model default).
    #[arg(long, default_value_t = 0)]
    steps: u32,
    /// Seed of request 0.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompt.
    #[arg(long, default_value = "a photo of a cat")]
    prompt: String,
    /// LoRA adapters of a request, `none` or `NAME[:SCALE]` joined by `+` (repeatable: requests
    /// cycle through the sets, e.g. `--loras none --loras style:0.8`).
    #[arg(long = "loras", value_name = "SET", value_parser = parse_lora_set)]
    loras: Vec<Vec<pb::LoraAdapter>>,
    /// Write the JSON report here (it is also printed).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once('x')?;
    Some((w.parse().ok()?, h.parse().ok()?))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mode = match (args.rate, args.concurrency) {
        (Some(rate), None) => Mode::Open { rate },
        (None, Some(concurrency)) => Mode::Closed { concurrency },
        (None, None) => Mode::Closed { concurrency: 1 },
        (Some(_), Some(_)) => unreachable!("clap forbids both"),
    };
    let Some(sizes) = args
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<Option<Vec<_>>>()
    else {
        eprintln!("loadgen: --sizes takes WxH values, e.g. 64x64,128x96");
        return ExitCode::from(64);
    };
    let config = LoadConfig {
        target: args.target,
        allow_remote: args.allow_remote,
        mode,
        max_requests: args.requests,
        max_duration: Duration::from_secs_f64(args.duration_secs),
        timeout: Duration::from_secs_f64(args.timeout_secs),
        workload: Workload {
            mix: args.mix,
            sizes,
            steps: args.steps,
            seed: args.seed,
            prompt: args.prompt,
            loras: args.loras,
        },
    };
    match loadgen::run(config).await {
        Ok(report) => {
            let json = serde_json::to_string_pretty(&report).expect("report serialises");
            println!("{json}");
            if let Some(path) = args.json
                && let Err(e) = std::fs::write(&path, &json)
            {
                eprintln!("loadgen: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(64)
        }
    }
}
