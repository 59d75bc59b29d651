//! What 4-bit text-encoder weights do to a whole fixture run: the t2i golden (prompt 0, the
//! golden noise, 64x96, 4 steps) through denoiser-svc and vae-svc over gRPC, once from f32
//! embeddings, once from `--quantize q4k` embeddings (f32 compute; the tiny model's rows fall
//! back to q4_0) and, for scale, once from bf16 embeddings. The f32 image must match the
//! diffusers golden; the PSNRs against it are printed, the 4-bit one held above a floor.

mod common;

use std::future::Future;

use candle_core::{DType, Device, Tensor};
use encoder_svc::{
    config::Quantize,
    engine::{Encoder, ModelSpec},
    model::{quant::QuantFormat, weights::QuantPlan},
};
use klein_proto::{
    MAX_MESSAGE_BYTES,
    pb::{
        self, denoise_request::Noise, denoise_response::Event,
        denoiser_service_client::DenoiserServiceClient, vae_service_client::VaeServiceClient,
    },
    tensor,
};
use klein_runtime::{config::ServerConfig, device::DTypeSpec};
use klein_test_support::{golden, take, test_device, test_device_name};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::transport::Channel;

fn server_config() -> ServerConfig {
    ServerConfig {
        device: test_device_name().parse().unwrap(),
        dtype: DTypeSpec::F32,
        drain_timeout_secs: 1,
        ..ServerConfig::default()
    }
}

/// Serves `run(listener, shutdown)` on 127.0.0.1:0; returns a channel to it and the stopper.
async fn start<F, E>(
    run: impl FnOnce(TcpListener, oneshot::Receiver<()>) -> F,
) -> (Channel, oneshot::Sender<()>)
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Debug + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel();
    let served = run(listener, stopped);
    tokio::spawn(async move { served.await.unwrap() });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, stop)
}

/// Prompt 0's embedding (1, 512, 192), computed in `dtype`, returned as f32.
fn embed(dtype: DType, quantize: Quantize) -> Tensor {
    let tokenizer = common::tokenizer();
    let spec = ModelSpec {
        model_dir: common::model_dir(),
        gguf: None,
        dtype,
        quantize: QuantPlan::of(quantize),
    };
    let encoder = Encoder::load(&spec, tokenizer.pad_id(), &test_device()).unwrap();
    let ids = tokenizer.encode(&common::fixture_prompts()[0]).unwrap();
    encoder
        .encode(&[ids])
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// The decoded t2i image (1, 64, 96, 3) u8 for `embeds`.
async fn t2i(denoiser: Channel, vae: Channel, embeds: &Tensor) -> Tensor {
    let g = golden("t2i");
    let grid = Some(pb::LatentGrid {
        height: 4,
        width: 6,
    });
    let request = pb::DenoiseRequest {
        prompt_embeds: Some(tensor::encode(embeds).unwrap()),
        grid,
        num_steps: 4,
        noise: Some(Noise::InitialNoise(
            tensor::encode(take(&g, "noise")).unwrap(),
        )),
        ..Default::default()
    };
    let mut client = DenoiserServiceClient::new(denoiser)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut stream = client.denoise(request).await.unwrap().into_inner();
    let latents = loop {
        match stream.message().await.unwrap().expect("a result").event {
            Some(Event::Result(r)) => break r.latents,
            Some(Event::Progress(_)) => continue,
            None => panic!("empty event"),
        }
    };
    let mut vae = VaeServiceClient::new(vae)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let decoded = vae
        .decode(pb::DecodeRequest {
            latents,
            grid,
            force_tiling: false,
        })
        .await
        .unwrap()
        .into_inner();
    tensor::decode(decoded.images.as_ref().unwrap(), &Device::Cpu).unwrap()
}

/// PSNR in dB of two u8 images.
fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let mse = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_bit_embeddings_in_a_whole_t2i_run() {
    let model_dir = Some(common::model_dir());
    let denoiser_cfg = denoiser_svc::Config {
        server: server_config(),
        model_dir: model_dir.clone(),
        ..denoiser_svc::Config::default()
    };
    let vae_cfg = vae_svc::Config {
        server: server_config(),
        model_dir,
        ..vae_svc::Config::default()
    };
    let (denoiser, stop_denoiser) = start(|l, s| {
        denoiser_svc::serve(denoiser_cfg, l, async {
            let _ = s.await;
        })
    })
    .await;
    let (vae, stop_vae) = start(|l, s| {
        vae_svc::serve(vae_cfg, l, async {
            let _ = s.await;
        })
    })
    .await;

    let q4k = Quantize::Format(QuantFormat::Q4K);
    let full = t2i(
        denoiser.clone(),
        vae.clone(),
        &embed(DType::F32, Quantize::None),
    )
    .await;
    let four_bit = t2i(denoiser.clone(), vae.clone(), &embed(DType::F32, q4k)).await;
    let bf16 = t2i(denoiser, vae, &embed(DType::BF16, Quantize::None)).await;
    let reference = take(&golden("t2i"), "image_uint8.f32").clone();
    let exact = psnr(&full, &reference);
    let quantized = psnr(&four_bit, &full);
    let half = psnr(&bf16, &full);
    println!(
        "t2i image PSNR vs the f32 run: diffusers golden {exact:.1} dB, bf16 encoder {half:.1} dB, 4-bit encoder {quantized:.1} dB"
    );
    assert!(
        exact > 45.0,
        "the f32 run must reproduce the golden: {exact:.1} dB"
    );
    assert!(quantized > 20.0, "4-bit run: {quantized:.1} dB");
    let _ = (stop_denoiser.send(()), stop_vae.send(()));
}
