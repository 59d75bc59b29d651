//! Harness of the load, fault and soak tests: stage services as separate processes, the
//! gateway in-process over them, resident-memory readings, and small request builders.

#![allow(dead_code)]

pub mod procs;

use std::time::{Duration, Instant};

use gateway::config::Config as GatewayConfig;
use klein_proto::pb;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// Resident set size of process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS in kB")
}

/// Mebibytes, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A 64x64 text-to-image request with `steps` steps and a fixed seed.
pub fn small_request(seed: u64, steps: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: "a lighthouse at dusk".into(),
        width: 64,
        height: 64,
        num_steps: steps,
        seed: Some(seed),
        ..Default::default()
    }
}

/// An in-process gateway over stage addresses (`http://127.0.0.1:port` each).
pub struct Gateway {
    /// `http://` URL of the gateway.
    pub url: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Gateway {
    /// Starts `config` (its stage addresses already set) on 127.0.0.1:0 and waits until it
    /// reports SERVING (every stage answers).
    pub async fn start(config: GatewayConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            gateway::serve(config, listener, s.cancelled_owned())
                .await
                .expect("gateway serves");
        });
        procs::wait_serving(&url, Duration::from_secs(60)).await;
        Self { url, stop, task }
    }

    /// Stops the gateway and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A gateway config over the given replica URLs, with short drain and small queues.
pub fn gateway_config(encoder: &[String], denoiser: &[String], vae: &[String]) -> GatewayConfig {
    let mut c = GatewayConfig {
        encoder_addrs: encoder.to_vec(),
        denoiser_addrs: denoiser.to_vec(),
        vae_addrs: vae.to_vec(),
        ..GatewayConfig::default()
    };
    c.server.drain_timeout_secs = 1;
    c
}

/// Seconds since `t`, for messages.
pub fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}
