//! A client that drops its Denoise stream mid-run stops the work within one step: the
//! reservation comes back and the engine serves the next request at once.

mod common;

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::{denoise, grid, start, wire};
use klein_proto::pb::{self, denoise_request::Noise, denoise_response::Event};
use klein_runtime::device::DTypeSpec;

fn request(steps: u32, side: u32) -> pb::DenoiseRequest {
    let embeds = Tensor::randn(0f32, 1.0, (1, 512, 192), &Device::Cpu).unwrap();
    pb::DenoiseRequest {
        prompt_embeds: Some(wire(&embeds)),
        grid: grid(side, side),
        num_steps: steps,
        noise: Some(Noise::Seed(1)),
        ..Default::default()
    }
}

async fn reserved(client: &mut common::Client) -> u64 {
    let info = client
        .info(pb::DenoiserServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    info.info.unwrap().reserved_bytes
}

#[tokio::test]
async fn dropping_the_stream_frees_the_engine_within_one_step() {
    let mut server = start("tiny-klein-4b", DTypeSpec::F32).await;
    let mut long = server
        .client
        .denoise(request(200, 8))
        .await
        .unwrap()
        .into_inner();
    // Time a few steps of the long run.
    let mut stamps = Vec::new();
    while stamps.len() < 4 {
        match long.message().await.unwrap().unwrap().event {
            Some(Event::Progress(p)) => stamps.push((p.step, Instant::now())),
            other => panic!("unexpected {other:?}"),
        }
    }
    let step_time = (stamps[3].1 - stamps[1].1) / 2;
    assert!(reserved(&mut server.client).await > 0);

    drop(long);
    let dropped = Instant::now();
    while reserved(&mut server.client).await > 0 {
        assert!(
            dropped.elapsed() < Duration::from_secs(30),
            "reservation never came back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let freed = dropped.elapsed();

    // The engine is free: a one-step request completes without waiting for the 196 steps left.
    let started = Instant::now();
    let (progress, _) = denoise(&mut server.client, request(1, 1)).await.unwrap();
    let next = started.elapsed();
    assert_eq!(progress.len(), 1);
    println!(
        "step {step_time:?}; reservation freed after {freed:?}; next request done in {next:?}"
    );
    let bound = 3 * step_time + Duration::from_millis(500);
    assert!(freed <= bound, "freed after {freed:?} (step {step_time:?})");
    assert!(
        next <= bound + step_time,
        "next request took {next:?} (step {step_time:?})"
    );
}
