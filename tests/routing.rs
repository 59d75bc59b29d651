//! Per-model routing over real gRPC (issue 12): two denoiser replicas serve different models
//! (the tiny 4B-shaped pipeline on one, the 9B-shaped one on the other) behind one gateway,
//! next to one encoder serving both text encoders and the shared VAE. Every request must reach
//! the replica that has its model: with plain balancing half of them would land on the other
//! replica and be refused. The images must equal each model's diffusers golden.

mod common;

use std::{future::Future, time::Duration};

use common::{generate, golden_t2i_request, max_pixel_diff, pixels};
use gateway::stack::StackOptions;
use klein_proto::{
    MAX_MESSAGE_BYTES,
    pb::{self, image_service_client::ImageServiceClient},
};
use klein_runtime::device::{DTypeSpec, DeviceSpec};
use klein_test_support::{golden, pipeline_dir, take};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const SMALL: &str = "tiny-klein-4b";
const LARGE: &str = "tiny-klein-9b";

/// Binds 127.0.0.1:0, runs `serve` on it until `stop`, and returns its `http://` URL once it
/// reports SERVING.
async fn start<F, Fut, E>(stop: &CancellationToken, serve: F) -> String
where
    F: FnOnce(TcpListener, tokio_util::sync::WaitForCancellationFutureOwned) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Debug + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = serve(listener, stop.clone().cancelled_owned());
    tokio::spawn(async move { task.await.expect("serves") });
    for _ in 0..600 {
        if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await {
            let req = HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(r) = HealthClient::new(ch).check(req).await
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                return url;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never reported SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_reaches_a_replica_that_has_its_model() {
    let device: DeviceSpec = klein_test_support::test_device_name().parse().unwrap();
    let mut opts = StackOptions::new(&pipeline_dir(SMALL), device, ([127, 0, 0, 1], 0).into())
        .add_model(LARGE, &pipeline_dir(LARGE));
    opts.encoder.server.dtype = DTypeSpec::F32;
    opts.denoiser.server.dtype = DTypeSpec::F32;
    let mut small = opts.denoiser.clone();
    small.models.clear();
    let mut large = opts.denoiser.clone();
    large.model_dir = Some(pipeline_dir(LARGE));
    large.models.clear();

    let stop = CancellationToken::new();
    let encoder = start(&stop, |l, s| encoder_svc::serve(opts.encoder.clone(), l, s)).await;
    let vae = start(&stop, |l, s| vae_svc::serve(opts.vae.clone(), l, s)).await;
    let den_small = start(&stop, |l, s| denoiser_svc::serve(small, l, s)).await;
    let den_large = start(&stop, |l, s| denoiser_svc::serve(large, l, s)).await;
    let mut gw = opts.gateway.clone();
    gw.encoder_addrs = vec![encoder];
    gw.denoiser_addrs = vec![den_small, den_large];
    gw.vae_addrs = vec![vae];
    let gateway = start(&stop, |l, s| gateway::serve(gw, l, s)).await;

    let channel = Channel::from_shared(gateway)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ImageServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let caps = c
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = caps.models.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        [SMALL, LARGE],
        "the catalog unites both replicas' models"
    );

    for round in 0..6 {
        let (model, case) = if round % 2 == 0 {
            (SMALL, "t2i")
        } else {
            (LARGE, "t2i_9b")
        };
        let out = generate(&mut c, golden_t2i_request(model, case))
            .await
            .unwrap_or_else(|e| panic!("round {round} ({model}): {e:?}"));
        let diff = max_pixel_diff(
            &pixels(&out.images[0].png),
            take(&golden(case), "image_uint8.f32"),
        );
        eprintln!("round {round}: {model} max pixel diff vs its golden = {diff}");
        assert!(diff <= 1.0, "round {round} ({model}): {diff}");
    }
    stop.cancel();
}
