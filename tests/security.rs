//! Security basics over real gRPC on 127.0.0.1: TLS and mutual TLS of the shared server
//! bootstrap and of the gateway's stage clients, the gateway's API key, and its request size
//! limit. Certificates are generated at test time (rcgen) into a temporary folder; no key is
//! committed.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{generate, start_stack};
use gateway::{auth::ApiKey, config::Config as GatewayConfig, stack::StackOptions};
use klein_proto::pb::{
    self,
    denoiser_service_server::{DenoiserService, DenoiserServiceServer},
    image_service_client::ImageServiceClient,
    text_encoder_service_server::{TextEncoderService, TextEncoderServiceServer},
    vae_service_server::{VaeService, VaeServiceServer},
};
use klein_runtime::{
    config::ServerConfig, device::DeviceSpec, server::GrpcServer, tls::ClientTlsFiles,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Request, Response, Status,
    service::Routes,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A throwaway PKI: a CA, a server certificate for localhost / 127.0.0.1, a client
/// certificate of the same CA, and a client certificate of an unrelated CA.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("klein-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = new_ca("klein test CA");
        let rogue = new_ca("rogue CA");
        for (file, issuer) in [("server", &ca), ("client", &ca), ("rogue-client", &rogue)] {
            let key = KeyPair::generate().unwrap();
            let params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .unwrap();
            let cert = params.signed_by(&key, issuer).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        }
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("rogue-ca.pem"), rogue.pem()).unwrap();
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }

    /// A server config with TLS, and mutual TLS when `mutual`.
    fn server(&self, mutual: bool) -> ServerConfig {
        ServerConfig {
            tls_cert: Some(self.path("server.pem")),
            tls_key: Some(self.path("server.key")),
            tls_client_ca: mutual.then(|| self.path("ca.pem")),
            drain_timeout_secs: 1,
            ..ServerConfig::default()
        }
    }

    /// Client TLS trusting `ca`, presenting `identity` ("client" or "rogue-client").
    fn client(&self, ca: &str, identity: Option<&str>) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read(ca)));
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(
                self.read(&format!("{id}.pem")),
                self.read(&format!("{id}.key")),
            ));
        }
        tls
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// Serves `routes` (plus health) with `config`'s TLS on 127.0.0.1:0; SERVING at once.
async fn serve(config: ServerConfig, routes: Routes) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = GrpcServer::from_config(&["klein.v1.DenoiserService"], &config)
        .await
        .unwrap();
    server.health().set_serving().await;
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { server.run(routes, listener, s.cancelled_owned()).await });
    (addr, stop)
}

/// Health over `url` with optional TLS: the status, or the transport/status error code.
async fn health(url: &str, tls: Option<ClientTlsConfig>) -> Result<i32, Code> {
    let mut ep = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).unwrap();
    }
    let ch = ep.connect().await.map_err(|_| Code::Unavailable)?;
    let req = HealthCheckRequest {
        service: String::new(),
    };
    let mut req = Request::new(req);
    req.set_timeout(Duration::from_secs(2));
    HealthClient::new(ch)
        .check(req)
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

/// Answers Info only, as all three stages: enough for a gateway to call it ready.
struct InfoOnly;

fn info(service: &str) -> Option<pb::ServiceInfo> {
    Some(pb::ServiceInfo {
        service: service.into(),
        model_id: "tls-test".into(),
        ..Default::default()
    })
}

fn not_here<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not part of this test"))
}

#[tonic::async_trait]
impl DenoiserService for InfoOnly {
    type DenoiseStream = tokio_stream::Empty<Result<pb::DenoiseResponse, Status>>;

    async fn denoise(
        &self,
        _: Request<pb::DenoiseRequest>,
    ) -> Result<Response<Self::DenoiseStream>, Status> {
        not_here()
    }

    async fn info(
        &self,
        _: Request<pb::DenoiserServiceInfoRequest>,
    ) -> Result<Response<pb::DenoiserServiceInfoResponse>, Status> {
        Ok(Response::new(pb::DenoiserServiceInfoResponse {
            info: info("denoiser"),
        }))
    }
}

#[tonic::async_trait]
impl TextEncoderService for InfoOnly {
    async fn encode(
        &self,
        _: Request<pb::TextEncoderServiceEncodeRequest>,
    ) -> Result<Response<pb::TextEncoderServiceEncodeResponse>, Status> {
        not_here()
    }

    async fn info(
        &self,
        _: Request<pb::TextEncoderServiceInfoRequest>,
    ) -> Result<Response<pb::TextEncoderServiceInfoResponse>, Status> {
        Ok(Response::new(pb::TextEncoderServiceInfoResponse {
            info: info("encoder"),
        }))
    }
}

#[tonic::async_trait]
impl VaeService for InfoOnly {
    async fn encode(
        &self,
        _: Request<pb::VaeServiceEncodeRequest>,
    ) -> Result<Response<pb::VaeServiceEncodeResponse>, Status> {
        not_here()
    }

    async fn decode(
        &self,
        _: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        not_here()
    }

    async fn info(
        &self,
        _: Request<pb::VaeServiceInfoRequest>,
    ) -> Result<Response<pb::VaeServiceInfoResponse>, Status> {
        Ok(Response::new(pb::VaeServiceInfoResponse {
            info: info("vae"),
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_speak_tls_and_mutual_tls_and_refuse_everyone_else() {
    let pki = Pki::new("server");
    let serving = Ok(ServingStatus::Serving as i32);

    let (addr, stop) = serve(pki.server(false), Routes::default()).await;
    let https = format!("https://localhost:{}", addr.port());
    assert_eq!(
        health(&https, Some(pki.client("ca.pem", None))).await,
        serving
    );
    let by_ip = format!("https://127.0.0.1:{}", addr.port());
    assert_eq!(
        health(&by_ip, Some(pki.client("ca.pem", None))).await,
        serving
    );
    assert!(
        health(&https, Some(pki.client("rogue-ca.pem", None)))
            .await
            .is_err(),
        "a client that does not trust the server's CA must not connect"
    );
    assert!(
        health(&format!("http://{addr}"), None).await.is_err(),
        "plain text is refused"
    );
    stop.cancel();

    let (addr, stop) = serve(pki.server(true), Routes::default()).await;
    let https = format!("https://localhost:{}", addr.port());
    assert_eq!(
        health(&https, Some(pki.client("ca.pem", Some("client")))).await,
        serving
    );
    for (who, tls) in [
        ("no client certificate", pki.client("ca.pem", None)),
        (
            "a certificate of another CA",
            pki.client("ca.pem", Some("rogue-client")),
        ),
    ] {
        assert!(
            health(&https, Some(tls)).await.is_err(),
            "mutual TLS admitted a client with {who}"
        );
    }
    stop.cancel();
}

/// Starts a gateway over the denoiser at `denoiser` and waits up to `wait` for SERVING.
async fn gateway_ready(denoiser: &str, stage_tls: ClientTlsFiles, wait: Duration) -> bool {
    let mut cfg = GatewayConfig {
        denoiser_addrs: vec![denoiser.to_owned()],
        encoder_addrs: vec![denoiser.to_owned()],
        vae_addrs: vec![denoiser.to_owned()],
        stage_tls,
        ..GatewayConfig::default()
    };
    cfg.server.drain_timeout_secs = 1;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(gateway::serve(cfg, listener, s.cancelled_owned()));
    let started = Instant::now();
    let mut ready = false;
    while started.elapsed() < wait {
        if health(&url, None).await == Ok(ServingStatus::Serving as i32) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = task.await;
    ready
}

/// The gateway reports SERVING only once every stage answers: a request needs all three, and
/// a stage answers only once its model is loaded (`klein serve` prints "serving" on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_once_every_stage_answers() {
    let pki = Pki::new("readiness");
    let files = || ClientTlsFiles {
        ca: Some(pki.path("ca.pem")),
        cert: Some(pki.path("client.pem")),
        key: Some(pki.path("client.key")),
        domain: None,
    };
    let denoiser_only = Routes::new(DenoiserServiceServer::new(InfoOnly));
    let (addr, stop) = serve(pki.server(true), denoiser_only).await;
    let url = format!("https://localhost:{}", addr.port());
    assert!(
        !gateway_ready(&url, files(), Duration::from_secs(3)).await,
        "with only the denoiser answering the gateway must not report SERVING"
    );
    stop.cancel();
    let every = Routes::new(DenoiserServiceServer::new(InfoOnly))
        .add_service(TextEncoderServiceServer::new(InfoOnly))
        .add_service(VaeServiceServer::new(InfoOnly));
    let (addr, stop) = serve(pki.server(true), every).await;
    let url = format!("https://localhost:{}", addr.port());
    assert!(gateway_ready(&url, files(), Duration::from_secs(20)).await);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reaches_stages_over_mutual_tls_with_its_certificate_only() {
    let pki = Pki::new("stages");
    let routes = Routes::new(DenoiserServiceServer::new(InfoOnly))
        .add_service(TextEncoderServiceServer::new(InfoOnly))
        .add_service(VaeServiceServer::new(InfoOnly));
    let (addr, stop) = serve(pki.server(true), routes).await;
    let url = format!("https://localhost:{}", addr.port());
    let files = |cert: Option<&str>| ClientTlsFiles {
        ca: Some(pki.path("ca.pem")),
        cert: cert.map(|c| pki.path(&format!("{c}.pem"))),
        key: cert.map(|c| pki.path(&format!("{c}.key"))),
        domain: None,
    };
    assert!(
        gateway_ready(&url, files(Some("client")), Duration::from_secs(20)).await,
        "the gateway with its client certificate reached the stages over mutual TLS"
    );
    assert!(
        !gateway_ready(&url, files(None), Duration::from_secs(2)).await,
        "without a client certificate the gateway must not get through"
    );
    assert!(
        !gateway_ready(&url, files(Some("rogue-client")), Duration::from_secs(2)).await,
        "a certificate of another CA must not get through"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_generate_runs_over_mutual_tls_to_every_stage_and_matches_plain_tcp() {
    let pki = Pki::new("stack");
    let mut opts = StackOptions::new(
        &klein_test_support::pipeline_dir("tiny-klein-4b"),
        DeviceSpec::Cpu,
        ([127, 0, 0, 1], 0).into(),
    );
    for server in [
        &mut opts.encoder.server,
        &mut opts.denoiser.server,
        &mut opts.vae.server,
    ] {
        let tls = pki.server(true);
        server.tls_cert = tls.tls_cert;
        server.tls_key = tls.tls_key;
        server.tls_client_ca = tls.tls_client_ca;
    }
    opts.gateway.stage_tls = ClientTlsFiles {
        ca: Some(pki.path("ca.pem")),
        cert: Some(pki.path("client.pem")),
        key: Some(pki.path("client.key")),
        domain: None,
    };
    let running = common::start_with(opts).await;
    for addr in running.stage_addrs {
        let https = format!("https://localhost:{}", addr.port());
        assert!(health(&format!("http://{addr}"), None).await.is_err());
        assert!(
            health(&https, Some(pki.client("ca.pem", None)))
                .await
                .is_err(),
            "{addr}: a client without a certificate is refused"
        );
        assert_eq!(
            health(&https, Some(pki.client("ca.pem", Some("client")))).await,
            Ok(ServingStatus::Serving as i32),
            "{addr}: the stage serves over mutual TLS"
        );
    }
    let over_tls = generate(&mut common::client(&running).await, common_request())
        .await
        .expect("Generate through mutual-TLS stages");
    running.stop().await.unwrap();

    let plain = start_stack("tiny-klein-4b").await;
    let over_tcp = generate(&mut common::client(&plain).await, common_request())
        .await
        .unwrap();
    plain.stop().await.unwrap();
    assert_eq!(over_tls.images.len(), 1);
    assert_eq!(
        over_tls.images[0].png, over_tcp.images[0].png,
        "the transport does not change the image"
    );
}

async fn tls_client(addr: SocketAddr, tls: ClientTlsConfig) -> ImageServiceClient<Channel> {
    let ch = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    ImageServiceClient::new(ch)
}

fn keyed(
    req: pb::GenerateRequest,
    header: &'static str,
    value: &str,
) -> Request<pb::GenerateRequest> {
    let mut r = Request::new(req);
    r.metadata_mut().insert(header, value.parse().unwrap());
    r
}

async fn run(
    c: &mut ImageServiceClient<Channel>,
    req: Request<pb::GenerateRequest>,
) -> Result<usize, Status> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut n = 0;
    while let Some(msg) = stream.message().await? {
        if let Some(pb::generate_response::Event::Image(_)) = msg.event {
            n += 1;
        }
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_api_over_tls_needs_the_key_and_refuses_oversized_requests() {
    let pki = Pki::new("public");
    let running = start_stack("tiny-klein-4b").await;
    let [e, d, v] = running.stage_addrs.map(|a| vec![format!("http://{a}")]);
    let mut cfg = GatewayConfig {
        server: pki.server(false),
        encoder_addrs: e,
        denoiser_addrs: d,
        vae_addrs: v,
        api_key: Some(ApiKey::new("correct horse battery staple")),
        ..GatewayConfig::default()
    };
    cfg.limits.max_request_bytes = klein_runtime::bytesize::ByteSize(256 * 1024);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(gateway::serve(
        cfg,
        listener,
        stop.clone().cancelled_owned(),
    ));
    let https = format!("https://localhost:{}", addr.port());
    let started = Instant::now();
    // Health needs no key.
    while health(&https, Some(pki.client("ca.pem", None))).await
        != Ok(ServingStatus::Serving as i32)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "gateway not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        health(&format!("http://{addr}"), None).await.is_err(),
        "plain text refused"
    );

    let mut c = tls_client(addr, pki.client("ca.pem", None)).await;
    let req = common_request();
    assert_eq!(
        run(&mut c, Request::new(req.clone()))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    for (header, value) in [
        ("authorization", "Bearer correct horse battery stapl"),
        ("authorization", "Bearer correct horse battery staple!"),
        ("authorization", "Basic correct horse battery staple"),
        ("x-api-key", "wrong"),
    ] {
        let got = run(&mut c, keyed(req.clone(), header, value)).await;
        assert_eq!(
            got.unwrap_err().code(),
            Code::Unauthenticated,
            "{header}: {value}"
        );
    }
    let caps = c.get_capabilities(pb::GetCapabilitiesRequest {}).await;
    assert_eq!(caps.unwrap_err().code(), Code::Unauthenticated);
    for (header, value) in [
        ("authorization", "Bearer correct horse battery staple"),
        ("x-api-key", "correct horse battery staple"),
    ] {
        assert_eq!(
            run(&mut c, keyed(req.clone(), header, value))
                .await
                .unwrap(),
            1
        );
    }

    // A request larger than max_request_bytes is refused from its length prefix.
    let mut big = req.clone();
    big.reference_images = vec![Bytes::from(vec![7u8; 300 * 1024])];
    let t = Instant::now();
    let refused = run(
        &mut c,
        keyed(big, "x-api-key", "correct horse battery staple"),
    )
    .await
    .unwrap_err();
    eprintln!(
        "MEASURED security: 300 KiB request over a 256 KiB limit -> {:?} in {:?}",
        refused.code(),
        t.elapsed()
    );
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert_eq!(
        run(
            &mut c,
            keyed(req, "x-api-key", "correct horse battery staple")
        )
        .await
        .unwrap(),
        1,
        "still serving after the refusal"
    );
    stop.cancel();
    let _ = task.await;
    let mut plain = common::client(&running).await;
    generate(&mut plain, common_request()).await.unwrap();
    running.stop().await.unwrap();
}

fn common_request() -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: "a key".into(),
        width: 64,
        height: 64,
        num_steps: 1,
        seed: Some(3),
        ..Default::default()
    }
}

#[test]
fn a_pki_folder_is_removed_after_use() {
    let dir: PathBuf = {
        let pki = Pki::new("cleanup");
        assert!(Path::new(&pki.path("server.key")).is_file());
        pki.dir.clone()
    };
    assert!(!dir.exists(), "private keys must not outlive the test");
}
