//! The run's outcome: counts by gRPC code and latency percentiles of accepted requests.

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{Kind, Mode};

/// One finished request.
#[derive(Debug, Clone)]
pub struct Sample {
    pub kind: Kind,
    pub code: tonic::Code,
    /// Client-side wall time from send to the last event.
    pub latency: Duration,
    /// Queue wait the gateway reported (admission at every stage), seconds.
    pub queue_seconds: f64,
    /// Images received.
    pub images: u32,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn percentiles(values_us: impl Iterator<Item = u64>) -> Option<Percentiles> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
    for v in values_us {
        h.saturating_record(v.max(1));
    }
    (!h.is_empty()).then(|| Percentiles {
        p50_ms: h.value_at_quantile(0.50) as f64 / 1000.0,
        p90_ms: h.value_at_quantile(0.90) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: h.max() as f64 / 1000.0,
    })
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// "open" or "closed".
    pub mode: String,
    /// Requests per second offered (open loop) or workers (closed loop).
    pub offered: f64,
    /// Requests started.
    pub sent: u64,
    /// Requests by final gRPC code name (e.g. "Ok", "ResourceExhausted").
    pub by_code: BTreeMap<String, u64>,
    /// Accepted requests by kind.
    pub ok_by_kind: BTreeMap<String, u64>,
    /// OK requests per second over the whole run.
    pub throughput_rps: f64,
    /// Images received per second over the whole run.
    pub images_per_second: f64,
    /// Fraction of requests refused with RESOURCE_EXHAUSTED.
    pub shed_fraction: f64,
    /// Latency of accepted requests, client side.
    pub latency: Option<Percentiles>,
    /// Queue wait of accepted requests, as the gateway reported it.
    pub queue_wait: Option<Percentiles>,
    /// Latency minus queue wait of accepted requests.
    pub service_time: Option<Percentiles>,
    /// Latency of refused (RESOURCE_EXHAUSTED) requests: how fast shedding answers.
    pub shed_latency: Option<Percentiles>,
    /// Seconds during which requests were started.
    pub offered_seconds: f64,
    /// Seconds until the last request finished.
    pub wall_seconds: f64,
}

impl Report {
    /// Aggregates `samples`.
    pub fn new(samples: &[Sample], mode: Mode, offered_seconds: f64, wall_seconds: f64) -> Self {
        let mut by_code = BTreeMap::new();
        let mut ok_by_kind = BTreeMap::new();
        for s in samples {
            *by_code.entry(format!("{:?}", s.code)).or_insert(0) += 1;
            if s.code == tonic::Code::Ok {
                *ok_by_kind
                    .entry(format!("{:?}", s.kind).to_lowercase())
                    .or_insert(0) += 1;
            }
        }
        let ok: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.code == tonic::Code::Ok)
            .collect();
        let shed: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.code == tonic::Code::ResourceExhausted)
            .collect();
        let (mode_name, offered) = match mode {
            Mode::Open { rate } => ("open", rate),
            Mode::Closed { concurrency } => ("closed", concurrency as f64),
        };
        Self {
            mode: mode_name.into(),
            offered,
            sent: samples.len() as u64,
            by_code,
            ok_by_kind,
            throughput_rps: ok.len() as f64 / wall_seconds.max(1e-9),
            images_per_second: ok.iter().map(|s| f64::from(s.images)).sum::<f64>()
                / wall_seconds.max(1e-9),
            shed_fraction: shed.len() as f64 / (samples.len().max(1)) as f64,
            latency: percentiles(ok.iter().map(|s| s.latency.as_micros() as u64)),
            queue_wait: percentiles(ok.iter().map(|s| (s.queue_seconds * 1e6) as u64)),
            service_time: percentiles(
                ok.iter()
                    .map(|s| ((s.latency.as_secs_f64() - s.queue_seconds).max(0.0) * 1e6) as u64),
            ),
            shed_latency: percentiles(shed.iter().map(|s| s.latency.as_micros() as u64)),
            offered_seconds,
            wall_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(code: tonic::Code, ms: u64) -> Sample {
        Sample {
            kind: Kind::T2i,
            code,
            latency: Duration::from_millis(ms),
            queue_seconds: 0.01,
            images: 1,
        }
    }

    #[test]
    fn aggregates_codes_and_percentiles_of_accepted_requests() {
        let mut samples: Vec<Sample> = (1..=100).map(|i| sample(tonic::Code::Ok, i * 10)).collect();
        samples.extend((0..25).map(|_| sample(tonic::Code::ResourceExhausted, 2)));
        let r = Report::new(&samples, Mode::Open { rate: 4.0 }, 10.0, 20.0);
        assert_eq!(r.sent, 125);
        assert_eq!(r.by_code["Ok"], 100);
        assert_eq!(r.by_code["ResourceExhausted"], 25);
        assert!((r.shed_fraction - 0.2).abs() < 1e-12);
        assert!((r.throughput_rps - 5.0).abs() < 1e-12);
        assert!((r.images_per_second - 5.0).abs() < 1e-12);
        let l = r.latency.unwrap();
        assert!((l.p50_ms - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_ms - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max_ms - 1000.0).abs() < 1.0, "{l:?}");
        assert!(r.shed_latency.unwrap().max_ms < 3.0);
    }
}
