//! Overload: open-loop load at 4x the measured capacity (the bundled `loadgen` library over
//! real gRPC; the whole stack in-process, f32 on the CPU, 64x64 images with 2 steps).
//!
//! The gateway admits `SLOTS` requests at once and queues `QUEUE` more; everything beyond is
//! shed with RESOURCE_EXHAUSTED at once. Promises checked: throughput plateaus at capacity,
//! most of the excess is shed and the refusals are fast, the p99 latency of accepted requests
//! stays bounded by the queue (it cannot grow with the offered load), resident memory stays
//! bounded (no OOM), and the stack serves normally right after the burst.

mod common;
mod harness;

use std::time::{Duration, Instant};

use common::{client, generate, start_with};
use gateway::stack::StackOptions;
use harness::{mib, rss_bytes, small_request};
use klein_runtime::device::DeviceSpec;
use loadgen::{Kind, LoadConfig, Mode, Report, Workload};

const SLOTS: u64 = 2;
const QUEUE: usize = 2;
const BURST: Duration = Duration::from_secs(6);

fn load(target: &str, mode: Mode, requests: u64, duration: Duration) -> LoadConfig {
    LoadConfig {
        target: target.to_owned(),
        allow_remote: false,
        mode,
        max_requests: requests,
        max_duration: duration,
        timeout: Duration::from_secs(30),
        workload: Workload {
            mix: vec![Kind::T2i],
            sizes: vec![(64, 64)],
            steps: 2,
            seed: 7,
            prompt: "a lighthouse at dusk".into(),
            loras: Vec::new(),
        },
    }
}

fn ms(r: &Report) -> (f64, f64) {
    let l = r.latency.as_ref().expect("some requests were accepted");
    (l.p50_ms, l.p99_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_times_capacity_is_shed_fast_with_bounded_latency_and_recovers() {
    let mut opts = StackOptions::new(
        &klein_test_support::pipeline_dir("tiny-klein-4b"),
        DeviceSpec::Cpu,
        ([127, 0, 0, 1], 0).into(),
    );
    opts.gateway.max_concurrent_requests = SLOTS;
    opts.gateway.server.max_queue_depth = QUEUE;
    let running = start_with(opts).await;
    let target = format!("http://{}", running.addr);
    let mut c = client(&running).await;
    generate(&mut c, small_request(1, 2)).await.unwrap();
    let rss_before = rss_bytes(std::process::id());

    // Capacity: as many workers as slots, back to back.
    let cap = loadgen::run(load(
        &target,
        Mode::Closed {
            concurrency: SLOTS as usize,
        },
        16,
        Duration::from_secs(120),
    ))
    .await
    .unwrap();
    assert_eq!(cap.by_code.get("Ok"), Some(&16), "{cap:?}");
    let capacity = cap.throughput_rps;
    let (base_p50, base_p99) = ms(&cap);

    // The burst: open loop at 4x capacity.
    let rate = 4.0 * capacity;
    let offered = (rate * BURST.as_secs_f64()).ceil() as u64;
    let burst = loadgen::run(load(&target, Mode::Open { rate }, offered, BURST))
        .await
        .unwrap();
    let burst_end = Instant::now();
    let (p50, p99) = ms(&burst);
    let shed_p99 = burst.shed_latency.as_ref().map_or(0.0, |l| l.p99_ms);
    let rss_after = rss_bytes(std::process::id());
    // Throughput over the time requests were offered plus the drain of what was admitted.
    let served = burst.by_code.get("Ok").copied().unwrap_or(0);
    eprintln!(
        "MEASURED overload: capacity {capacity:.2} req/s (p50 {base_p50:.0} ms, p99 {base_p99:.0} ms at {SLOTS} workers)"
    );
    eprintln!(
        "MEASURED overload: 4x = {rate:.2} req/s offered for {:.1} s: sent {}, ok {served}, codes {:?}, throughput {:.2} req/s ({:.2}x capacity), shed fraction {:.3}, accepted p50 {p50:.0} ms p99 {p99:.0} ms, shed p99 {shed_p99:.1} ms, RSS {:.0} -> {:.0} MiB",
        burst.offered_seconds,
        burst.sent,
        burst.by_code,
        burst.throughput_rps,
        burst.throughput_rps / capacity,
        burst.shed_fraction,
        mib(rss_before),
        mib(rss_after),
    );
    println!("{}", serde_json::to_string(&burst).unwrap());

    // Only OK and RESOURCE_EXHAUSTED: nothing else breaks under load.
    assert!(
        burst
            .by_code
            .keys()
            .all(|k| k == "Ok" || k == "ResourceExhausted"),
        "{:?}",
        burst.by_code
    );
    // Plateau: served at about capacity, not more, not collapsing.
    let ratio = burst.throughput_rps / capacity;
    assert!(
        (0.6..=1.5).contains(&ratio),
        "throughput {ratio:.2}x capacity"
    );
    // Excess shed: with 4x offered, at least half must be refused...
    assert!(
        burst.shed_fraction >= 0.5,
        "shed {:.3}",
        burst.shed_fraction
    );
    // ...and quickly (the refusal does no work).
    assert!(shed_p99 < 100.0, "shed p99 {shed_p99:.1} ms");
    // Accepted latency bounded by the queue: at most QUEUE requests ahead, each taking about
    // a service time (SLOTS / capacity), plus its own; 2x slack for a busy 2-core machine.
    let service_ms = 1000.0 * SLOTS as f64 / capacity;
    let bound = 2.0 * (QUEUE as f64 / SLOTS as f64 + 1.0) * service_ms + 250.0;
    assert!(
        p99 <= bound,
        "accepted p99 {p99:.0} ms > bound {bound:.0} ms"
    );
    // No OOM: memory did not balloon with the queue.
    assert!(
        mib(rss_after) - mib(rss_before) < 256.0,
        "RSS {:.0} -> {:.0} MiB",
        mib(rss_before),
        mib(rss_after)
    );

    // Recovery: the next request is served at normal speed.
    let t = Instant::now();
    generate(&mut c, small_request(2, 2)).await.unwrap();
    let next = t.elapsed();
    eprintln!(
        "MEASURED overload: first request after the burst ok in {next:?} ({:?} after the burst ended)",
        burst_end.elapsed()
    );
    assert!(
        next.as_secs_f64() * 1000.0 <= 2.0 * base_p99 + 250.0,
        "recovery request took {next:?}"
    );
    running.stop().await.unwrap();
}
