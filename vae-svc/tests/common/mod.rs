//! A vae-svc server on 127.0.0.1:0 with the tiny fixture VAE, and clients for it.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use klein_proto::{MAX_MESSAGE_BYTES, pb, pb::vae_service_client::VaeServiceClient};
use klein_runtime::{bytesize::ByteSize, device::DTypeSpec};
use klein_test_support::{pipeline_dir, test_device_name};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use vae_svc::{Config, VaeError};

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    done: JoinHandle<Result<(), VaeError>>,
}

/// The fixture pipeline on `$KLEIN_TEST_DEVICE` with a roomy budget and tiny tiles for
/// forced tiling.
pub fn fixture_config(dtype: DTypeSpec) -> Config {
    let mut c = Config {
        model_dir: Some(pipeline_dir("tiny-klein-4b")),
        runtime_overhead: ByteSize(0),
        tile_tokens: 4,
        tile_overlap_tokens: 2,
        min_tile_tokens: 4,
        ..Config::default()
    };
    c.server.dtype = dtype;
    c.server.device = test_device_name().parse().unwrap();
    c.server.gpu_memory_budget = ByteSize(2 << 30);
    c.server.drain_timeout_secs = 5;
    c
}

/// Starts `vae_svc::serve` and waits until health reports SERVING.
pub async fn start(config: Config) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(vae_svc::serve(config, listener, async {
        let _ = stopped.await;
    }));
    let running = Running { addr, stop, done };
    running.wait_serving().await;
    running
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> Channel {
        for _ in 0..200 {
            if let Ok(c) = Channel::from_shared(self.url()).unwrap().connect().await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server at {} never accepted a connection", self.addr);
    }

    /// A client with the 64 MiB message limits.
    pub async fn client(&self) -> VaeServiceClient<Channel> {
        VaeServiceClient::new(self.channel().await)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Polls health of `klein.v1.VaeService` until SERVING (60 s at most).
    pub async fn wait_serving(&self) {
        let mut health = HealthClient::new(self.channel().await);
        for _ in 0..2400 {
            let req = HealthCheckRequest {
                service: "klein.v1.VaeService".into(),
            };
            let status = health.check(req).await.map(|r| r.into_inner().status).ok();
            if status == Some(ServingStatus::Serving as i32) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server never became SERVING");
    }

    /// Stops the server and returns what `serve` returned.
    pub async fn stop(self) -> Result<(), VaeError> {
        let _ = self.stop.send(());
        self.done.await.unwrap()
    }
}

/// A wire tensor from raw parts.
pub fn wire(dtype: pb::Dtype, shape: &[u64], data: Vec<u8>) -> pb::Tensor {
    pb::Tensor {
        dtype: dtype as i32,
        shape: shape.to_vec(),
        data: Bytes::from(data),
    }
}

/// f32 values as little-endian bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A wire tensor from a candle tensor.
pub fn to_wire(t: &candle_core::Tensor) -> pb::Tensor {
    klein_proto::tensor::encode(t).unwrap()
}

/// A candle tensor from a wire tensor.
pub fn from_wire(t: &pb::Tensor) -> candle_core::Tensor {
    klein_proto::tensor::decode(t, &candle_core::Device::Cpu).unwrap()
}

/// Peak signal-to-noise ratio of two u8 images of the same shape, dB.
pub fn psnr(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!(a.len(), b.len());
    let mse = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}
