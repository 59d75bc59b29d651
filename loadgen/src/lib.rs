//! A bounded load generator for `klein.v1.ImageService/Generate`.
//!
//! Two modes: **open loop** (requests start at a fixed rate whatever the server does, so
//! queueing shows up in the latencies instead of being hidden: no coordinated omission) and
//! **closed loop** (N workers, each sends its next request when the previous one ends). Every
//! run is capped by a request count and a duration, and targets loopback addresses unless
//! remote targets are explicitly allowed.
//!
//! The report counts outcomes by gRPC code and gives throughput and p50/p90/p99/max latency of
//! the accepted (OK) requests, split into queue wait and service time as the gateway reports
//! them in `Image.timings`.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod report;
mod workload;

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use klein_proto::{
    MAX_MESSAGE_BYTES,
    pb::{generate_response::Event, image_service_client::ImageServiceClient},
};
pub use report::{Report, Sample};
use tokio::sync::Mutex;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
pub use workload::{Kind, Workload};

/// How requests are started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// A new request every 1/rate seconds (requests per second).
    Open { rate: f64 },
    /// `concurrency` workers back to back.
    Closed { concurrency: usize },
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Gateway URL, e.g. `http://127.0.0.1:50050`.
    pub target: String,
    /// Allow a non-loopback target.
    pub allow_remote: bool,
    pub mode: Mode,
    /// Hard cap on requests started.
    pub max_requests: u64,
    /// Hard cap on the time requests are started for; in-flight ones get `timeout` more.
    pub max_duration: Duration,
    /// Per-request deadline (sent as grpc-timeout).
    pub timeout: Duration,
    pub workload: Workload,
}

/// A run that could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("target {0} is not a loopback address; pass --allow-remote to load it anyway")]
    NotLoopback(String),
    #[error("invalid target {0}: {1}")]
    Target(String, String),
    #[error("invalid load shape: {0}")]
    Shape(String),
}

/// Whether `target` (a URL) names a loopback host.
pub fn is_loopback(target: &str) -> bool {
    let Ok(uri) = target.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

async fn one_request(
    mut client: ImageServiceClient<Channel>,
    config: &LoadConfig,
    index: u64,
) -> Sample {
    let kind = config.workload.kind_for(index);
    let mut req = tonic::Request::new(config.workload.request(index));
    req.set_timeout(config.timeout);
    let started = Instant::now();
    let mut sample = Sample {
        kind,
        code: tonic::Code::Ok,
        latency: Duration::ZERO,
        queue_seconds: 0.0,
        images: 0,
    };
    match client.generate(req).await {
        Err(status) => sample.code = status.code(),
        Ok(resp) => {
            let mut stream = resp.into_inner();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(msg) => {
                        if let Some(Event::Image(img)) = msg.event {
                            sample.images += 1;
                            sample.queue_seconds =
                                img.timings.map(|t| t.queue_seconds).unwrap_or(0.0);
                        }
                    }
                    Err(status) => {
                        sample.code = status.code();
                        break;
                    }
                }
            }
            if sample.code == tonic::Code::Ok && sample.images == 0 {
                sample.code = tonic::Code::Internal;
            }
        }
    }
    sample.latency = started.elapsed();
    sample
}

/// Runs the load and returns the report.
pub async fn run(config: LoadConfig) -> Result<Report, LoadError> {
    if !config.allow_remote && !is_loopback(&config.target) {
        return Err(LoadError::NotLoopback(config.target));
    }
    match config.mode {
        Mode::Open { rate } if !(rate.is_finite() && rate > 0.0) => {
            return Err(LoadError::Shape(format!("rate must be > 0, got {rate}")));
        }
        Mode::Closed { concurrency: 0 } => {
            return Err(LoadError::Shape("concurrency must be >= 1".into()));
        }
        _ => {}
    }
    let channel = Endpoint::from_shared(config.target.clone())
        .map_err(|e| LoadError::Target(config.target.clone(), e.to_string()))?
        .connect_lazy();
    let client = ImageServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let config = Arc::new(config);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let stop_at = started + config.max_duration;
    let mut tasks = tokio::task::JoinSet::new();
    match config.mode {
        Mode::Open { rate } => {
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for index in 0..config.max_requests {
                ticker.tick().await;
                if Instant::now() >= stop_at {
                    break;
                }
                let (client, config, samples) = (client.clone(), config.clone(), samples.clone());
                tasks.spawn(async move {
                    let s = one_request(client, &config, index).await;
                    samples.lock().await.push(s);
                });
            }
        }
        Mode::Closed { concurrency } => {
            let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
            for _ in 0..concurrency {
                let (client, config, samples, next) = (
                    client.clone(),
                    config.clone(),
                    samples.clone(),
                    next.clone(),
                );
                tasks.spawn(async move {
                    loop {
                        let index = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if index >= config.max_requests || Instant::now() >= stop_at {
                            break;
                        }
                        let s = one_request(client.clone(), &config, index).await;
                        samples.lock().await.push(s);
                    }
                });
            }
        }
    }
    let offered_seconds = started.elapsed().as_secs_f64();
    // In-flight requests are bounded by their own deadline; give them that long, then stop.
    let _ = tokio::time::timeout(config.timeout + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let samples = std::mem::take(&mut *samples.lock().await);
    Ok(Report::new(
        &samples,
        config.mode,
        offered_seconds,
        started.elapsed().as_secs_f64(),
    ))
}
