//! A bounded load generator for `klein.v1.ImageService/Generate`.
//!
//! Two modes: **open loop** (requests start at a fixed rate whatever the server does, so
//! queueing shows up in the latencies instead of being hidden: no coordinated omission; each
//! latency is measured from the moment the schedule meant the request to start, so a late
//! generator cannot hide delay either) and **closed loop** (N workers, each sends its next
//! request when the previous one ends). Every run is capped by a request count and a
//! duration, every request by its deadline (sent as `grpc-timeout`, and enforced here too, a
//! second later, so a server that never answers still ends the run: such a request counts
//! as DEADLINE_EXCEEDED). Targets must be loopback addresses unless remote targets are
//! explicitly allowed.
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
pub use workload::{Kind, Workload, parse_lora_set};

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

/// Highest open-loop rate: one request per microsecond.
pub const MAX_RATE: f64 = 1e6;

/// How long after its deadline a request is given up on the client side.
pub const CLIENT_GRACE: Duration = Duration::from_secs(1);

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

/// Runs request `index`; its latency counts from `scheduled` (when it was meant to start).
async fn one_request(
    mut client: ImageServiceClient<Channel>,
    config: &LoadConfig,
    index: u64,
    scheduled: Instant,
) -> Sample {
    let kind = config.workload.kind_for(index);
    let mut req = tonic::Request::new(config.workload.request(index));
    req.set_timeout(config.timeout);
    let call = async {
        let mut stream = client.generate(req).await?.into_inner();
        let (mut images, mut queue_seconds) = (0, 0.0);
        while let Some(msg) = stream.next().await {
            if let Some(Event::Image(img)) = msg?.event {
                images += 1;
                queue_seconds = img.timings.map(|t| t.queue_seconds).unwrap_or(0.0);
            }
        }
        Ok::<_, tonic::Status>((images, queue_seconds))
    };
    let mut sample = Sample {
        kind,
        code: tonic::Code::Ok,
        latency: Duration::ZERO,
        queue_seconds: 0.0,
        images: 0,
    };
    match tokio::time::timeout(config.timeout + CLIENT_GRACE, call).await {
        Ok(Ok((images, queue_seconds))) => {
            sample.images = images;
            sample.queue_seconds = queue_seconds;
            if images == 0 {
                sample.code = tonic::Code::Internal;
            }
        }
        Ok(Err(status)) => sample.code = status.code(),
        Err(_) => sample.code = tonic::Code::DeadlineExceeded,
    }
    sample.latency = scheduled.elapsed();
    sample
}

/// Runs the load and returns the report.
pub async fn run(config: LoadConfig) -> Result<Report, LoadError> {
    if !config.allow_remote && !is_loopback(&config.target) {
        return Err(LoadError::NotLoopback(config.target));
    }
    match config.mode {
        Mode::Open { rate } if !(rate > 0.0 && rate <= MAX_RATE) => {
            return Err(LoadError::Shape(format!(
                "rate must be in (0, {MAX_RATE}] requests/s, got {rate}"
            )));
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
                let scheduled = ticker.tick().await.into_std();
                if scheduled >= stop_at {
                    break;
                }
                let (client, config, samples) = (client.clone(), config.clone(), samples.clone());
                tasks.spawn(async move {
                    let s = one_request(client, &config, index, scheduled).await;
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
                        let s = one_request(client.clone(), &config, index, Instant::now()).await;
                        samples.lock().await.push(s);
                    }
                });
            }
        }
    }
    let offered_seconds = started.elapsed().as_secs_f64();
    // Every request ends by its deadline plus the grace, so this wait is bounded too.
    while tasks.join_next().await.is_some() {}
    let samples = std::mem::take(&mut *samples.lock().await);
    Ok(Report::new(
        &samples,
        config.mode,
        offered_seconds,
        started.elapsed().as_secs_f64(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(target: &str, mode: Mode) -> LoadConfig {
        LoadConfig {
            target: target.into(),
            allow_remote: false,
            mode,
            max_requests: 5,
            max_duration: Duration::from_secs(5),
            timeout: Duration::from_millis(500),
            workload: Workload {
                mix: vec![Kind::T2i],
                sizes: vec![(64, 64)],
                steps: 1,
                seed: 0,
                prompt: "x".into(),
                loras: Vec::new(),
            },
        }
    }

    #[test]
    fn only_loopback_targets_pass() {
        for (target, want) in [
            ("http://127.0.0.1:50050", true),
            ("http://127.8.9.10:1", true),
            ("http://localhost:50050", true),
            ("http://[::1]:50050", true),
            ("http://10.0.0.1:50050", false),
            ("http://192.168.1.2:50050", false),
            ("http://example.com:50050", false),
            ("http://127.0.0.1.example.com", false),
            ("not a url", false),
        ] {
            assert_eq!(is_loopback(target), want, "{target}");
        }
    }

    #[tokio::test]
    async fn refuses_remote_targets_and_impossible_shapes() {
        let remote = run(config(
            "http://10.1.2.3:50050",
            Mode::Closed { concurrency: 1 },
        ))
        .await;
        assert!(matches!(remote, Err(LoadError::NotLoopback(_))));
        for mode in [
            Mode::Open { rate: 0.0 },
            Mode::Open { rate: f64::NAN },
            Mode::Open { rate: 1e9 },
            Mode::Closed { concurrency: 0 },
        ] {
            let r = run(config("http://127.0.0.1:1", mode)).await;
            assert!(matches!(r, Err(LoadError::Shape(_))), "{mode:?}");
        }
    }

    #[tokio::test]
    async fn a_dead_target_still_ends_with_every_request_counted() {
        // Nothing listens on a port we bound and closed: every request fails, none is lost.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = format!("http://127.0.0.1:{port}");
        for mode in [Mode::Open { rate: 50.0 }, Mode::Closed { concurrency: 2 }] {
            let report = run(config(&target, mode)).await.unwrap();
            assert_eq!(report.sent, 5, "{report:?}");
            assert_eq!(report.by_code.get("Unavailable"), Some(&5), "{report:?}");
            assert!(report.latency.is_none());
        }
    }
}
