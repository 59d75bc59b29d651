//! Stage services as real separate processes, so a test can SIGKILL one mid-request and read
//! each one's resident memory.
//!
//! The test binary re-executes itself (`std::env::current_exe()`) running only its ignored
//! `service_child` test, with `KLEIN_TEST_CHILD=<encoder|denoiser|vae>` and
//! `KLEIN_TEST_CHILD_PORT=<port, 0 = any>`. That test calls [`child_main`], which serves the
//! stage (f32 on the CPU, the tiny `tiny-klein-4b` fixture) on 127.0.0.1, prints
//! `klein-child listening <port>` and serves until it is killed, or until its stdin closes
//! because the parent test process ended. This avoids depending on other packages' binaries
//! being built. Without the variable, `service_child` returns at once.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use gateway::stack::StackOptions;
use klein_runtime::device::DeviceSpec;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const CHILD_ENV: &str = "KLEIN_TEST_CHILD";
const PORT_ENV: &str = "KLEIN_TEST_CHILD_PORT";
const READY_LINE: &str = "klein-child listening ";

/// Which stage a child process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    Encoder,
    Denoiser,
    Vae,
}

impl StageKind {
    fn name(self) -> &'static str {
        match self {
            Self::Encoder => "encoder",
            Self::Denoiser => "denoiser",
            Self::Vae => "vae",
        }
    }
}

/// The body of each test binary's ignored `service_child` test.
pub fn child_main() {
    let Ok(kind) = std::env::var(CHILD_ENV) else {
        return;
    };
    let port: u16 = std::env::var(PORT_ENV)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // The parent holds our stdin; when it ends (even by SIGKILL) the pipe closes: follow it.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let opts = StackOptions::new(
        &klein_test_support::pipeline_dir("tiny-klein-4b"),
        DeviceSpec::Cpu,
        ([127, 0, 0, 1], 0).into(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("child {kind}: bind 127.0.0.1:{port}: {e}"));
        println!("{READY_LINE}{}", listener.local_addr().unwrap().port());
        let forever = std::future::pending::<()>();
        match kind.as_str() {
            "encoder" => encoder_svc::serve(opts.encoder, listener, forever)
                .await
                .map_err(|e| e.to_string()),
            "denoiser" => denoiser_svc::serve(opts.denoiser, listener, forever)
                .await
                .map_err(|e| e.to_string()),
            "vae" => vae_svc::serve(opts.vae, listener, forever)
                .await
                .map_err(|e| e.to_string()),
            other => Err(format!("unknown child kind {other:?}")),
        }
    });
    if let Err(e) = result {
        panic!("child service failed: {e}");
    }
}

/// A stage served by a child process; killed when dropped.
pub struct StageProcess {
    pub kind: StageKind,
    pub port: u16,
    child: Child,
}

impl StageProcess {
    /// Starts `kind` on `port` (0 = any free port) and waits until it reports SERVING.
    pub async fn start(kind: StageKind, port: u16) -> Self {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "service_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, kind.name())
            .env(PORT_ENV, port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child service");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Reads the port, then keeps draining stdout so the child never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may have printed "test service_child ... " on the same line.
                let port = line.split_once(READY_LINE).map(|(_, p)| p);
                if let (Some(port), Some(t)) = (port, tx.as_ref()) {
                    let _ = t.send(port.trim().parse::<u16>().ok());
                    tx = None;
                }
            }
        });
        let port = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap()
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{kind:?} child never reported its port"));
        let process = Self { kind, port, child };
        wait_serving(&process.url(), Duration::from_secs(120)).await;
        process
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap: the process is gone when this returns.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StageProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the gRPC server at `url` reports overall health SERVING.
pub async fn wait_serving(url: &str, timeout: Duration) {
    let started = Instant::now();
    loop {
        if let Ok(ch) = Endpoint::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
        {
            let req = HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(resp) = HealthClient::new(ch).check(req).await
                && resp.into_inner().status == ServingStatus::Serving as i32
            {
                return;
            }
        }
        assert!(
            started.elapsed() < timeout,
            "{url} not SERVING after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
