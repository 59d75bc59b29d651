//! Isolation: malformed requests, sent to the gateway and straight to the internal services
//! while good requests run, never change the good requests' images. The good images must be
//! bit-identical to a quiet run with the same seeds (the whole stack in-process, f32 on the
//! CPU).

mod common;
mod harness;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::{client, generate, pixels, start_stack};
use harness::small_request;
use klein_proto::pb::{
    self, denoiser_service_client::DenoiserServiceClient,
    text_encoder_service_client::TextEncoderServiceClient, vae_service_client::VaeServiceClient,
};
use tokio::task::JoinSet;

const SEEDS: [u64; 4] = [11, 22, 33, 44];
const STEPS: u32 = 3;

fn good(seed: u64) -> pb::GenerateRequest {
    let mut r = small_request(seed, STEPS);
    r.width = 96;
    r
}

fn f32_tensor(shape: &[u64], value: f32) -> pb::Tensor {
    let n: u64 = shape.iter().product();
    pb::Tensor {
        dtype: pb::Dtype::F32 as i32,
        shape: shape.to_vec(),
        data: Bytes::from(
            std::iter::repeat_n(value.to_le_bytes(), n as usize)
                .flatten()
                .collect::<Vec<u8>>(),
        ),
    }
}

/// Malformed public requests: each fails validation or poisons only itself.
fn bad_public(i: usize) -> pb::GenerateRequest {
    let mut r = good(1000 + i as u64);
    match i % 5 {
        0 => r.width = 100,
        1 => {
            r.mode = Some(pb::generate_request::Mode::ImageToImage(
                pb::ImageToImageInput {
                    image: Bytes::from_static(b"\x89PNG\r\n\x1a\nnot really"),
                    strength: Some(0.5),
                },
            ))
        }
        2 => r.initial_noise = Some(f32_tensor(&[1, 128, 4, 4], 0.0)),
        // Right shape, NaN everywhere: it may run, but only this request may see NaNs.
        3 => r.initial_noise = Some(f32_tensor(&[1, 128, 4, 6], f32::NAN)),
        _ => r.num_steps = 100_000,
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_never_change_good_images() {
    let running = start_stack("tiny-klein-4b").await;
    let mut c = client(&running).await;
    let mut quiet = BTreeMap::new();
    for seed in SEEDS {
        let out = generate(&mut c, good(seed)).await.unwrap();
        quiet.insert(seed, pixels(&out.images[0].png));
    }
    let [enc, den, vae] = running.stage_addrs.map(|a| format!("http://{a}"));
    let embeds = TextEncoderServiceClient::connect(enc.clone())
        .await
        .unwrap()
        .encode(pb::TextEncoderServiceEncodeRequest {
            prompts: vec!["x".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .prompt_embeds
        .unwrap();
    let embed_shape = embeds.shape.clone();

    let mut tasks = JoinSet::new();
    // The good requests, all at once.
    for seed in SEEDS {
        let mut c = c.clone();
        tasks.spawn(async move {
            let out = generate(&mut c, good(seed)).await;
            (format!("good {seed}"), Some(seed), out.map(|o| o.images))
        });
    }
    // Interleaved malformed traffic at every layer.
    for i in 0..10 {
        let mut c = c.clone();
        tasks.spawn(async move {
            let out = generate(&mut c, bad_public(i)).await;
            ("public".to_owned(), None, out.map(|o| o.images))
        });
        let (den, vae, enc) = (den.clone(), vae.clone(), enc.clone());
        let shape = embed_shape.clone();
        tasks.spawn(async move {
            let mut d = DenoiserServiceClient::connect(den).await.unwrap();
            let nan_embeds = pb::DenoiseRequest {
                prompt_embeds: Some(f32_tensor(&shape, f32::NAN)),
                grid: Some(pb::LatentGrid {
                    height: 4,
                    width: 6,
                }),
                num_steps: STEPS,
                noise: Some(pb::denoise_request::Noise::Seed(11)),
                ..Default::default()
            };
            let code = match d.denoise(nan_embeds).await {
                Err(s) => s.code(),
                Ok(r) => {
                    let mut s = r.into_inner();
                    loop {
                        match s.message().await {
                            Ok(Some(_)) => {}
                            Ok(None) => break tonic::Code::Ok,
                            Err(e) => break e.code(),
                        }
                    }
                }
            };
            let mut v = VaeServiceClient::connect(vae).await.unwrap();
            let _ = v
                .decode(pb::DecodeRequest {
                    latents: Some(f32_tensor(&[1, 24, 128], f32::INFINITY)),
                    grid: Some(pb::LatentGrid {
                        height: 5,
                        width: 5,
                    }),
                    force_tiling: false,
                })
                .await;
            let _ = v
                .decode(pb::DecodeRequest {
                    latents: Some(f32_tensor(&[1, 24, 128], f32::NAN)),
                    grid: Some(pb::LatentGrid {
                        height: 4,
                        width: 6,
                    }),
                    force_tiling: false,
                })
                .await;
            let mut e = TextEncoderServiceClient::connect(enc).await.unwrap();
            let _ = e
                .encode(pb::TextEncoderServiceEncodeRequest {
                    prompts: vec!["a".into(); 64],
                    negative_prompts: vec!["b".into()],
                    model: "no-such-model".into(),
                })
                .await;
            let out = match code {
                tonic::Code::Ok => Ok(vec![]),
                code => Err(tonic::Status::new(code, "")),
            };
            ("denoiser".to_owned(), None, out)
        });
    }
    let mut outcomes = BTreeMap::<String, usize>::new();
    while let Some(done) = tasks.join_next().await {
        let (name, seed, out) = done.unwrap();
        match seed {
            Some(seed) => {
                let images = out.unwrap_or_else(|s| panic!("{name} failed: {s:?}"));
                let got = pixels(&images[0].png);
                let want = &quiet[&seed];
                let same = got.flatten_all().unwrap().to_vec1::<u8>().unwrap()
                    == want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
                assert!(same, "{name}: pixels differ from the quiet run");
            }
            None => {
                let code = out.map_or_else(|s| s.code(), |_| tonic::Code::Ok);
                let key = format!("{name} {code:?}");
                *outcomes.entry(key).or_default() += 1;
            }
        }
    }
    eprintln!(
        "MEASURED isolation: {} good images bit-identical to the quiet run; malformed outcomes {outcomes:?}",
        SEEDS.len()
    );
    running.stop().await.unwrap();
}
