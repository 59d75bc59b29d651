//! Shared helpers: an in-process denoiser-svc on 127.0.0.1:0 over a tiny fixture pipeline,
//! and a client that collects a Denoise stream.

#![allow(dead_code)]

use candle_core::{Device, Tensor};
use denoiser_svc::Config;
use klein_proto::{
    MAX_MESSAGE_BYTES,
    pb::{self, denoise_response::Event, denoiser_service_client::DenoiserServiceClient},
    tensor,
};
use klein_runtime::{config::ServerConfig, device::DTypeSpec};
use klein_test_support::pipeline_dir;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub type Client = DenoiserServiceClient<Channel>;

/// A running service; stops (and drains) when dropped.
pub struct Server {
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    pub done: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The service config for a fixture pipeline.
pub fn config(pipeline: &str, dtype: DTypeSpec) -> Config {
    Config {
        server: ServerConfig {
            dtype,
            device: klein_test_support::test_device_name().parse().unwrap(),
            drain_timeout_secs: 1,
            ..ServerConfig::default()
        },
        model_dir: Some(pipeline_dir(pipeline)),
        ..Config::default()
    }
}

/// Starts the service with `config` and connects a client.
pub async fn start_with(config: Config) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        denoiser_svc::serve(config, listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let channel = loop {
        match Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(ch) => break ch,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let client = DenoiserServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Server {
        client,
        stop: Some(stop),
        done: Some(done),
    }
}

/// Starts the service over `pipeline` (e.g. `tiny-klein-4b`) in `dtype`.
pub async fn start(pipeline: &str, dtype: DTypeSpec) -> Server {
    start_with(config(pipeline, dtype)).await
}

/// A candle tensor on the wire.
pub fn wire(t: &Tensor) -> pb::Tensor {
    tensor::encode(t).unwrap()
}

/// A wire tensor as a candle tensor (CPU).
pub fn unwire(t: &pb::Tensor) -> Tensor {
    tensor::decode(t, &Device::Cpu).unwrap()
}

/// Runs a Denoise call to the end: (progress events, result), or the error status.
pub async fn denoise(
    client: &mut Client,
    req: pb::DenoiseRequest,
) -> Result<(Vec<pb::DenoiseProgress>, pb::DenoiseResult), tonic::Status> {
    let mut stream = client.denoise(req).await?.into_inner();
    let mut progress = Vec::new();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(Event::Progress(p)) => progress.push(p),
            Some(Event::Result(r)) => return Ok((progress, r)),
            None => panic!("empty event"),
        }
    }
    panic!("stream ended without a result")
}

/// The grid message.
pub fn grid(height: u32, width: u32) -> Option<pb::LatentGrid> {
    Some(pb::LatentGrid { height, width })
}
