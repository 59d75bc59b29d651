//! The shared server bootstrap over real gRPC on 127.0.0.1:0: health NOT_SERVING -> SERVING,
//! reflection, 64 MiB message limits (a 20 MiB tensor round trip), and graceful drain.
//!
//! The VaeService here is a narrow fake (Decode echoes its latents) because the unit under
//! test is the transport, not the model.

use std::time::{Duration, Instant};

use bytes::Bytes;
use klein_proto::{
    MAX_MESSAGE_BYTES,
    pb::{
        self,
        vae_service_client::VaeServiceClient,
        vae_service_server::{VaeService, VaeServiceServer},
    },
};
use klein_runtime::server::{GrpcServer, Health, LIVENESS_SERVICE};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, service::Routes, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

const VAE: &str = "klein.v1.VaeService";

/// Decode echoes the latents back as "images"; `force_tiling` makes it sleep for the given
/// number of milliseconds stored in the grid height, to hold a request in flight.
struct EchoVae;

#[tonic::async_trait]
impl VaeService for EchoVae {
    async fn encode(
        &self,
        _: Request<pb::VaeServiceEncodeRequest>,
    ) -> Result<Response<pb::VaeServiceEncodeResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn decode(
        &self,
        req: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let req = req.into_inner();
        if req.force_tiling {
            let ms = req.grid.map(|g| g.height).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms.into())).await;
        }
        Ok(Response::new(pb::DecodeResponse {
            images: req.latents,
            tile_plan: None,
        }))
    }

    async fn info(
        &self,
        _: Request<pb::VaeServiceInfoRequest>,
    ) -> Result<Response<pb::VaeServiceInfoResponse>, Status> {
        Ok(Response::new(pb::VaeServiceInfoResponse::default()))
    }
}

struct Running {
    addr: std::net::SocketAddr,
    health: Health,
    stop: oneshot::Sender<()>,
    done: JoinHandle<()>,
}

async fn start(drain: Duration) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = GrpcServer::new(&[VAE], drain).await;
    let health = server.health();
    let routes = Routes::new(
        VaeServiceServer::new(EchoVae)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        server
            .run(routes, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Running {
        addr,
        health,
        stop,
        done,
    }
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn status(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let resp = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(resp.status).unwrap()
}

fn vae_client(ch: Channel) -> VaeServiceClient<Channel> {
    VaeServiceClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

#[tokio::test]
async fn health_goes_not_serving_to_serving_and_back_on_drain() {
    let srv = start(Duration::from_secs(5)).await;
    let mut health = HealthClient::new(channel(srv.addr).await);
    assert_eq!(status(&mut health, "").await, ServingStatus::NotServing);
    assert_eq!(status(&mut health, VAE).await, ServingStatus::NotServing);
    assert_eq!(
        status(&mut health, LIVENESS_SERVICE).await,
        ServingStatus::Serving
    );

    srv.health.set_serving().await;
    assert_eq!(status(&mut health, "").await, ServingStatus::Serving);
    assert_eq!(status(&mut health, VAE).await, ServingStatus::Serving);

    // Watch "" and see it flip to NOT_SERVING when shutdown begins.
    let mut watch = health
        .watch(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    srv.stop.send(()).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap();
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    drop(watch);
    tokio::time::timeout(Duration::from_secs(10), srv.done)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn reflection_lists_every_klein_service_and_health() {
    let srv = start(Duration::from_secs(1)).await;
    let mut client = ServerReflectionClient::new(channel(srv.addr).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "klein.v1.TextEncoderService",
        "klein.v1.DenoiserService",
        "klein.v1.VaeService",
        "klein.v1.ImageService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    srv.stop.send(()).unwrap();
    srv.done.await.unwrap();
}

#[tokio::test]
async fn a_20_mib_tensor_round_trips_and_an_oversized_message_is_refused() {
    let srv = start(Duration::from_secs(1)).await;
    let mut vae = vae_client(channel(srv.addr).await);

    let n = 20 * 1024 * 1024 / 4;
    let data: Vec<u8> = (0..n as u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let latents = pb::Tensor {
        dtype: pb::Dtype::F32 as i32,
        shape: vec![1, (n / 128) as u64, 128],
        data: Bytes::from(data),
    };
    let resp = vae
        .decode(pb::DecodeRequest {
            latents: Some(latents.clone()),
            grid: None,
            force_tiling: false,
        })
        .await
        .unwrap()
        .into_inner();
    let back = resp.images.unwrap();
    assert_eq!(back.shape, latents.shape);
    assert!(
        back.data == latents.data,
        "20 MiB payload changed in transit"
    );

    let too_big = pb::Tensor {
        dtype: pb::Dtype::U8 as i32,
        shape: vec![(MAX_MESSAGE_BYTES + 1024) as u64],
        data: Bytes::from(vec![0u8; MAX_MESSAGE_BYTES + 1024]),
    };
    // A client without our encoding cap sends it; the server's 64 MiB decoding limit refuses it.
    let mut unlimited = VaeServiceClient::new(channel(srv.addr).await);
    let err = unlimited
        .decode(pb::DecodeRequest {
            latents: Some(too_big),
            grid: None,
            force_tiling: false,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "oversized message gave {err:?}"
    );
    srv.stop.send(()).unwrap();
    srv.done.await.unwrap();
}

fn slow_decode(ms: u32) -> pb::DecodeRequest {
    pb::DecodeRequest {
        latents: Some(pb::Tensor {
            dtype: pb::Dtype::U8 as i32,
            shape: vec![1],
            data: Bytes::from_static(&[7]),
        }),
        grid: Some(pb::LatentGrid {
            height: ms,
            width: 1,
        }),
        force_tiling: true,
    }
}

#[tokio::test]
async fn in_flight_requests_finish_during_the_drain() {
    let srv = start(Duration::from_secs(10)).await;
    let mut vae = vae_client(channel(srv.addr).await);
    let inflight = tokio::spawn(async move { vae.decode(slow_decode(400)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    srv.stop.send(()).unwrap();
    let resp = inflight
        .await
        .unwrap()
        .expect("in-flight request completes during drain");
    assert_eq!(
        resp.into_inner().images.unwrap().data,
        Bytes::from_static(&[7])
    );
    tokio::time::timeout(Duration::from_secs(5), srv.done)
        .await
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn the_drain_deadline_bounds_shutdown() {
    let srv = start(Duration::from_millis(300)).await;
    let mut vae = vae_client(channel(srv.addr).await);
    let inflight = tokio::spawn(async move { vae.decode(slow_decode(60_000)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    srv.stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), srv.done)
        .await
        .unwrap()
        .unwrap();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "returned before the deadline: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "drain deadline not honoured: {waited:?}"
    );
    inflight.abort();
}
