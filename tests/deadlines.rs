//! Deadlines over real gRPC (the whole stack in-process on 127.0.0.1:0, f32 on the CPU).
//!
//! What a client sees when its deadline (`grpc-timeout`) passes mid-request:
//! DEADLINE_EXCEEDED from the gateway, which ends the response stream at the deadline itself
//! (tonic's server-side `grpc-timeout` only bounds the handler that opens a stream, and
//! answers CANCELLED "Timeout expired" where it applies; the gateway reports a downstream
//! CANCELLED caused by the deadline as DEADLINE_EXCEEDED too). Ending the stream drops the
//! downstream Denoise call, and the denoiser stops the run at its next step: its
//! reservation is released and the next request runs at once.

mod common;
mod harness;

use std::time::{Duration, Instant};

use common::{client, generate, start_stack};
use harness::small_request;
use klein_proto::pb::{
    DenoiserServiceInfoRequest, denoiser_service_client::DenoiserServiceClient,
    generate_response::Event,
};
use tonic::Code;

/// Slack allowed past the deadline before the client hears of it (2-core CI, debug build).
const MARGIN: Duration = Duration::from_millis(500);

async fn denoiser_reserved(addr: std::net::SocketAddr) -> u64 {
    let mut c = DenoiserServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let info = c
        .info(DenoiserServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    info.info.expect("service info").reserved_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_deadline_ends_the_request_in_time_and_the_denoiser_stops() {
    let running = start_stack("tiny-klein-4b").await;
    let mut c = client(&running).await;
    let denoiser = running.stage_addrs[1];

    generate(&mut c, small_request(1, 2)).await.unwrap();
    let t = Instant::now();
    generate(&mut c, small_request(2, 2)).await.unwrap();
    let baseline = t.elapsed();

    // 200 steps at 256x256 run far longer than the deadline.
    let deadline = Duration::from_millis(800);
    let mut long = small_request(3, 200);
    (long.width, long.height) = (256, 256);
    let mut req = tonic::Request::new(long);
    req.set_timeout(deadline);
    let sent = Instant::now();
    let mut stream = c.generate(req).await.unwrap().into_inner();
    let mut steps = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(msg)) => {
                if let Some(Event::Step(_)) = msg.event {
                    steps += 1;
                }
            }
            Ok(None) => panic!("the stream ended without an error after {steps} steps"),
            Err(status) => break status,
        }
    };
    let waited = sent.elapsed();
    eprintln!(
        "MEASURED deadlines: deadline {deadline:?} -> {:?} after {waited:?} ({steps} steps ran), baseline request {baseline:?}",
        status.code()
    );
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert_eq!(status.code(), Code::DeadlineExceeded, "the gateway's code");
    assert!(waited >= deadline - Duration::from_millis(50), "{waited:?}");
    assert!(
        waited <= deadline + MARGIN,
        "answered {waited:?} after sending"
    );

    // Downstream work stops: the denoiser releases the run's reservation within a step or so.
    let stopped = Instant::now();
    while denoiser_reserved(denoiser).await != 0 {
        assert!(
            stopped.elapsed() < Duration::from_secs(2),
            "the denoiser still holds the cancelled run's memory"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let released = stopped.elapsed();
    // ...and the next request does not queue behind the abandoned one.
    let t = Instant::now();
    generate(&mut c, small_request(4, 2)).await.unwrap();
    let next = t.elapsed();
    eprintln!(
        "MEASURED deadlines: denoiser reservation released {released:?} after the error; next request {next:?}"
    );
    assert!(
        next < baseline * 3 + Duration::from_millis(500),
        "next request took {next:?} (baseline {baseline:?})"
    );
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_while_queued_is_exceeded_not_run() {
    let mut opts = gateway::stack::StackOptions::new(
        &klein_test_support::pipeline_dir("tiny-klein-4b"),
        klein_runtime::device::DeviceSpec::Cpu,
        ([127, 0, 0, 1], 0).into(),
    );
    opts.gateway.max_concurrent_requests = 1;
    let running = common::start_with(opts).await;
    let mut c = client(&running).await;
    // One long request holds the only slot.
    let mut long = small_request(5, 200);
    (long.width, long.height) = (256, 256);
    let mut hog = tonic::Request::new(long);
    hog.set_timeout(Duration::from_secs(3));
    let mut hog = c.clone().generate(hog).await.unwrap().into_inner();
    let first = hog.message().await.unwrap();
    assert!(first.is_some(), "the long request was accepted");
    // A second one waits in the queue until its deadline passes.
    let deadline = Duration::from_millis(300);
    let mut req = tonic::Request::new(small_request(6, 2));
    req.set_timeout(deadline);
    let sent = Instant::now();
    let status = match c.generate(req).await {
        Err(s) => s,
        Ok(resp) => {
            let mut s = resp.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("a queued request outlived its deadline and finished"),
                    Err(e) => break e,
                }
            }
        }
    };
    let waited = sent.elapsed();
    eprintln!(
        "MEASURED deadlines: queued request with {deadline:?} -> {:?} after {waited:?}",
        status.code()
    );
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(waited <= deadline + MARGIN, "{waited:?}");
    drop(hog);
    running.stop().await.unwrap();
}
