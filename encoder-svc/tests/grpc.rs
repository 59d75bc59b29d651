//! The service over real gRPC on 127.0.0.1:0: goldens through the wire, prompt-cache hits that
//! are bit-identical and counted, request validation (INVALID_ARGUMENT naming the field),
//! admission (RESOURCE_EXHAUSTED) and a budget too small to start.

mod common;

use std::{net::SocketAddr, time::Duration};

use candle_core::{DType, Device};
use encoder_svc::{
    Config, EncoderError,
    budget::activation_bytes,
    engine::{Encoder, ModelSpec},
    prompt::SEQ_LEN,
};
use klein_proto::{
    MAX_MESSAGE_BYTES, pb, pb::text_encoder_service_client::TextEncoderServiceClient,
};
use klein_runtime::{bytesize::ByteSize, config::ServerConfig, device::DeviceSpec};
use klein_test_support::{golden, rel_l2, take, test_device, test_device_name};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Code, transport::Channel};

type Client = TextEncoderServiceClient<Channel>;

struct Running {
    client: Client,
    stop: oneshot::Sender<()>,
    done: JoinHandle<Result<(), EncoderError>>,
}

fn device() -> DeviceSpec {
    test_device_name().parse().unwrap()
}

fn config(budget: u64) -> Config {
    Config {
        server: ServerConfig {
            gpu_memory_budget: ByteSize(budget),
            device: device(),
            drain_timeout_secs: 1,
            ..ServerConfig::default()
        },
        model_dir: Some(common::model_dir()),
        cache_bytes: ByteSize(64 << 20),
        ..Config::default()
    }
}

async fn start(config: Config) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(encoder_svc::serve(config, listener, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = TextEncoderServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Running { client, stop, done }
}

impl Running {
    /// Info, waiting (the server answers once the model is loaded and warmed up).
    async fn info(&mut self) -> pb::ServiceInfo {
        let call = self.client.info(pb::TextEncoderServiceInfoRequest {});
        let response = tokio::time::timeout(Duration::from_secs(900), call)
            .await
            .expect("server ready in time")
            .unwrap();
        response.into_inner().info.unwrap()
    }

    async fn encode(
        &mut self,
        prompts: &[&str],
        negatives: &[&str],
        model: &str,
    ) -> Result<pb::TextEncoderServiceEncodeResponse, tonic::Status> {
        let request = pb::TextEncoderServiceEncodeRequest {
            prompts: prompts.iter().map(|s| s.to_string()).collect(),
            negative_prompts: negatives.iter().map(|s| s.to_string()).collect(),
            model: model.into(),
        };
        self.client.encode(request).await.map(|r| r.into_inner())
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.done.await.unwrap().unwrap();
    }
}

fn decode(t: &Option<pb::Tensor>) -> candle_core::Tensor {
    klein_proto::tensor::decode(t.as_ref().expect("tensor present"), &Device::Cpu).unwrap()
}

fn reference(i: usize) -> candle_core::Tensor {
    take(
        &golden("text_embeddings"),
        &format!("p{i}.prompt_embeds.f32"),
    )
    .squeeze(0)
    .unwrap()
}

fn assert_invalid(
    result: Result<pb::TextEncoderServiceEncodeResponse, tonic::Status>,
    field: &str,
) {
    let status = result.expect_err("request must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(&format!("{field}:")),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encodes_over_grpc_and_serves_repeats_from_the_cache() {
    let prompts = common::fixture_prompts();
    let (p0, p1, p2, p3) = (&prompts[0], &prompts[1], &prompts[2], &prompts[3]);
    let mut server = start(config(1 << 30)).await;

    let info = server.info().await;
    assert_eq!(
        (info.service.as_str(), info.model_id.as_str()),
        ("encoder", "tiny-klein-4b")
    );
    assert_eq!(info.device, device().to_string());
    assert_eq!(info.dtype, pb::Dtype::F32 as i32);
    assert_eq!(info.quantization, "none");
    assert_eq!((info.max_batch, info.memory_budget_bytes), (4, 1 << 30));
    assert!(info.weight_bytes > 0);
    assert_eq!(info.details["output_dim"], "192");
    assert_eq!(info.details["layers_run"], "27");

    // Two prompts with CFG negatives; the two "" negatives are one model sequence.
    let first = server.encode(&[p0, p2], &[p1, p1], "").await.unwrap();
    assert_eq!(first.model_id, "tiny-klein-4b");
    let embeds = decode(&first.prompt_embeds);
    let negatives = decode(&first.negative_prompt_embeds);
    assert_eq!(embeds.dims(), &[2, SEQ_LEN, 192]);
    assert_eq!(negatives.dims(), &[2, SEQ_LEN, 192]);
    for (row, golden_index) in [(0, 0), (1, 2)] {
        let err = rel_l2(&embeds.get(row).unwrap(), &reference(golden_index));
        assert!(err <= 1e-4, "prompt {row}: rel-L2 {err:.3e}");
    }
    for row in 0..2 {
        let err = rel_l2(&negatives.get(row).unwrap(), &reference(1));
        assert!(err <= 1e-4, "negative {row}: rel-L2 {err:.3e}");
    }
    let facts = |t: &[pb::PromptTokens]| {
        t.iter()
            .map(|p| (p.token_count, p.truncated, p.cache_hit))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        facts(&first.prompts),
        [(17, false, false), (37, false, false)]
    );
    assert_eq!(
        facts(&first.negative_prompts),
        [(12, false, false), (12, false, false)]
    );
    let info = server.info().await;
    assert_eq!(info.details["cache_misses"], "3");
    assert_eq!(info.details["cache_entries"], "3");

    // A repeat is a cache hit: bit-identical bytes, counted, no negatives asked for.
    let again = server.encode(&[p0], &[], "tiny-klein-4b").await.unwrap();
    assert_eq!(facts(&again.prompts), [(17, false, true)]);
    assert!(again.negative_prompt_embeds.is_none() && again.negative_prompts.is_empty());
    let bytes = &first.prompt_embeds.as_ref().unwrap().data;
    let hit = &again.prompt_embeds.as_ref().unwrap().data;
    assert_eq!(
        hit[..],
        bytes[..bytes.len() / 2],
        "cache hit is bit-identical"
    );
    let info = server.info().await;
    assert_eq!(
        (
            info.details["cache_hits"].as_str(),
            info.details["cache_misses"].as_str()
        ),
        ("1", "3")
    );

    // The over-long prompt is cut at 512 tokens and still matches.
    let long = server.encode(&[p3], &[], "").await.unwrap();
    assert_eq!(facts(&long.prompts), [(512, true, false)]);
    let err = rel_l2(&decode(&long.prompt_embeds).get(0).unwrap(), &reference(3));
    assert!(err <= 1e-4, "long prompt: rel-L2 {err:.3e}");

    // Bad input.
    assert_invalid(server.encode(&[], &[], "").await, "prompts");
    assert_invalid(server.encode(&["a"; 5], &[], "").await, "prompts");
    assert_invalid(
        server.encode(&["a", "b"], &[""], "").await,
        "negative_prompts",
    );
    assert_invalid(server.encode(&["a"], &[], "flux-dev").await, "model");
    let huge = "cat ".repeat(20_000);
    assert_invalid(server.encode(&["a", &huge], &[], "").await, "prompts[1]");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_admits_what_fits_and_refuses_the_rest() {
    let tokenizer = common::tokenizer();
    let spec = ModelSpec {
        model_dir: common::model_dir(),
        gguf: None,
        dtype: DType::F32,
        quantize: None,
    };
    let encoder = Encoder::load(&spec, tokenizer.pad_id(), &test_device()).unwrap();
    let fixed = encoder.report().total_bytes() + Config::default().runtime_overhead.0;
    let one = activation_bytes(encoder.model().config(), DType::F32, 1, SEQ_LEN);
    drop(encoder);

    // Weights and runtime overhead plus room for exactly one prompt's activations.
    let mut server = start(config(fixed + one)).await;
    let info = server.info().await;
    assert_eq!(info.details["activation_capacity_bytes"], one.to_string());
    let status = server
        .encode(&["a cat", "a dog"], &[], "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let ok = server.encode(&["a cat"], &[], "").await.unwrap();
    assert_eq!(ok.prompts.len(), 1);
    server.stop().await;

    // Less than the weights plus one prompt: refused at startup, before serving.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = encoder_svc::serve(config(fixed + one - 1), listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, EncoderError::BudgetTooSmall { .. }), "{err}");
    assert!(err.to_string().contains("gpu_memory_budget"), "{err}");
}
