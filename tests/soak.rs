//! Soak: many small requests through the gateway (in this process) and the three stages
//! (each its own child process, see `harness::procs`); the resident memory of every process
//! must stay flat.
//!
//! Method: a warm-up batch first (allocator pools, prompt cache and connection buffers reach
//! their working size), then the measured requests in rounds, each process's VmRSS read after
//! every round. The check: no process grows by more than `MARGIN_MIB` between the end of the
//! warm-up and any later round; a leak of 32 KiB per request breaks it within the run.
//!
//! Size: 1000 measured requests by default, in CI too (3.5 to 6 requests/s were measured on a
//! busy 2-core machine, so about 3 to 5 minutes); `KLEIN_SOAK_REQUESTS=N` changes it.

mod harness;

use std::time::Duration;

use harness::{
    Gateway, gateway_config, mib,
    procs::{StageKind, StageProcess},
    rss_bytes,
};
use loadgen::{Kind, LoadConfig, Mode, Workload};

const WARMUP: u64 = 100;
const REQUESTS: u64 = 1000;
const ROUNDS: u64 = 5;
const CONCURRENCY: usize = 4;
const MARGIN_MIB: f64 = 16.0;

#[test]
#[ignore = "entry point of the stage child processes; the soak test starts it itself"]
fn service_child() {
    harness::procs::child_main();
}

fn load(target: &str, requests: u64, seed: u64) -> LoadConfig {
    LoadConfig {
        target: target.to_owned(),
        allow_remote: false,
        mode: Mode::Closed {
            concurrency: CONCURRENCY,
        },
        max_requests: requests,
        max_duration: Duration::from_secs(600),
        timeout: Duration::from_secs(60),
        workload: Workload {
            mix: vec![Kind::T2i],
            sizes: vec![(64, 64)],
            steps: 1,
            seed,
            prompt: "a lighthouse at dusk".into(),
            loras: Vec::new(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_stays_flat_over_many_requests() {
    let requests = std::env::var("KLEIN_SOAK_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(REQUESTS);
    let stages = [
        StageProcess::start(StageKind::Encoder, 0).await,
        StageProcess::start(StageKind::Denoiser, 0).await,
        StageProcess::start(StageKind::Vae, 0).await,
    ];
    let gw = Gateway::start(gateway_config(
        &[stages[0].url()],
        &[stages[1].url()],
        &[stages[2].url()],
    ))
    .await;
    let mut pids: Vec<(String, u32)> = stages
        .iter()
        .map(|s| (format!("{:?}", s.kind).to_lowercase(), s.pid()))
        .collect();
    pids.push(("gateway+client".into(), std::process::id()));
    let rss = |pids: &[(String, u32)]| pids.iter().map(|(_, p)| rss_bytes(*p)).collect::<Vec<_>>();

    let warm = loadgen::run(load(&gw.url, WARMUP, 0)).await.unwrap();
    assert_eq!(warm.by_code.get("Ok"), Some(&WARMUP), "{warm:?}");
    let base = rss(&pids);
    let per_round = requests.div_ceil(ROUNDS);
    let mut rounds = Vec::new();
    let mut done = 0;
    let mut seconds = 0.0;
    while done < requests {
        let n = per_round.min(requests - done);
        let report = loadgen::run(load(&gw.url, n, WARMUP + done)).await.unwrap();
        assert_eq!(report.by_code.get("Ok"), Some(&n), "{report:?}");
        seconds += report.wall_seconds;
        done += n;
        rounds.push(rss(&pids));
    }
    let mut worst = 0.0f64;
    for (i, (name, _)) in pids.iter().enumerate() {
        let series: Vec<String> = rounds.iter().map(|r| format!("{:.1}", mib(r[i]))).collect();
        let growth = rounds
            .iter()
            .map(|r| mib(r[i]) - mib(base[i]))
            .fold(f64::MIN, f64::max);
        worst = worst.max(growth);
        eprintln!(
            "MEASURED soak: {name}: {:.1} MiB after warm-up, then {} MiB; largest growth {growth:+.1} MiB",
            mib(base[i]),
            series.join(", ")
        );
        assert!(
            growth <= MARGIN_MIB,
            "{name} grew {growth:.1} MiB over {requests} requests (margin {MARGIN_MIB} MiB)"
        );
    }
    eprintln!(
        "MEASURED soak: {requests} requests (+{WARMUP} warm-up) in {seconds:.1} s ({:.1} req/s, concurrency {CONCURRENCY}); worst growth {worst:+.1} MiB",
        requests as f64 / seconds
    );
    gw.stop().await;
    drop(stages);
}
