//! Bad input, table-driven, over every field of every RPC: the public ImageService and the
//! internal TextEncoderService, DenoiserService and VaeService (the whole stack in-process on
//! 127.0.0.1:0, f32 on the CPU). Each case starts from a valid request (checked to succeed),
//! breaks one field, and expects INVALID_ARGUMENT with that field named in the message; after
//! the table every service still serves a valid request.
//!
//! Fields with no invalid value are listed too: `seed`, `preview_every` (any u64/u32 is
//! valid), `DecodeRequest.force_tiling` (a bool), and the field-less `Info` /
//! `GetCapabilities` requests. Bytes that are not protobuf at all are refused by tonic's codec
//! before any handler runs, with INTERNAL as the gRPC spec prescribes for parse errors.

mod common;

use bytes::Bytes;
use common::{client, generate, png_of, start_stack};
use image::{DynamicImage, RgbImage, RgbaImage};
use klein_proto::pb::{
    self, denoise_request::Mode as DMode, denoise_request::Noise,
    denoiser_service_client::DenoiserServiceClient, generate_request::Mode as GMode,
    text_encoder_service_client::TextEncoderServiceClient, vae_service_client::VaeServiceClient,
};
use tonic::{Code, Status};

type Case<T> = (&'static str, fn(&mut T));

fn tensor(dtype: pb::Dtype, shape: &[u64], fill: &[u8]) -> pb::Tensor {
    let n: u64 = shape.iter().product();
    pb::Tensor {
        dtype: dtype as i32,
        shape: shape.to_vec(),
        data: Bytes::from(fill.repeat(n as usize)),
    }
}

fn f32s(shape: &[u64], v: f32) -> pb::Tensor {
    tensor(pb::Dtype::F32, shape, &v.to_le_bytes())
}

/// The bad `loras` of a GenerateRequest or a DenoiseRequest (the same rules in both).
macro_rules! lora_cases {
    ($t:ty) => {{
        let cases: [Case<$t>; 5] = [
            ("loras[0].name", |r| {
                r.loras = vec![lora("no-such-adapter", None)]
            }),
            ("loras[0].name", |r| r.loras = vec![lora("../x", None)]),
            ("loras[1].name", |r| {
                r.loras = vec![lora("a", None), lora("a", None)]
            }),
            ("loras[0].scale", |r| {
                r.loras = vec![lora("a", Some(f32::NAN))]
            }),
            ("loras", |r| {
                r.loras = (0..9).map(|i| lora(&format!("a{i}"), None)).collect()
            }),
        ];
        cases
    }};
}

fn lora(name: &str, scale: Option<f32>) -> pb::LoraAdapter {
    pb::LoraAdapter {
        name: name.into(),
        scale,
    }
}

fn rgb_png(w: u32, h: u32) -> Bytes {
    png_of(DynamicImage::ImageRgb8(RgbImage::from_pixel(
        w,
        h,
        image::Rgb([90, 120, 200]),
    )))
}

/// Expects INVALID_ARGUMENT naming `field`.
fn expect_invalid(rpc: &str, field: &str, got: Result<(), Status>) {
    let status = got
        .err()
        .unwrap_or_else(|| panic!("{rpc}: bad {field} was accepted"));
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{rpc}: bad {field}: {status:?}"
    );
    let head = field.split(['.', '[']).next().unwrap_or(field);
    assert!(
        status.message().contains(head),
        "{rpc}: bad {field}: message does not name it: {:?}",
        status.message()
    );
}

fn generate_cases() -> Vec<Case<pb::GenerateRequest>> {
    let mut cases: Vec<Case<pb::GenerateRequest>> = vec![
        ("prompt", |r| r.prompt = "x".repeat(17 * 1024)),
        ("negative_prompt", |r| {
            r.negative_prompt = "x".repeat(17 * 1024)
        }),
        ("model", |r| r.model = "no-such-model".into()),
        ("width", |r| r.width = 100),
        ("width", |r| r.width = 32),
        ("width", |r| r.width = 4096),
        ("height", |r| r.height = 72),
        ("height", |r| r.height = 1_000_000),
        ("num_steps", |r| r.num_steps = 201),
        ("guidance_scale", |r| r.guidance_scale = Some(f32::NAN)),
        ("guidance_scale", |r| r.guidance_scale = Some(-1.0)),
        ("num_images", |r| r.num_images = 5),
        ("image_to_image.image", |r| {
            r.mode = Some(GMode::ImageToImage(pb::ImageToImageInput {
                image: Bytes::new(),
                strength: None,
            }))
        }),
        ("image_to_image.image", |r| {
            r.mode = Some(GMode::ImageToImage(pb::ImageToImageInput {
                image: Bytes::from_static(b"GIF89a not supported"),
                strength: None,
            }))
        }),
        ("image_to_image.strength", |r| {
            r.mode = Some(GMode::ImageToImage(pb::ImageToImageInput {
                image: rgb_png(64, 64),
                strength: Some(1.5),
            }))
        }),
        ("inpaint.image", |r| {
            r.mode = Some(GMode::Inpaint(pb::InpaintInput {
                image: Bytes::from_static(b"\x89PNG\r\n\x1a\ntruncated"),
                mask: rgb_png(64, 64),
                strength: None,
            }))
        }),
        ("inpaint.mask", |r| {
            r.mode = Some(GMode::Inpaint(pb::InpaintInput {
                image: rgb_png(64, 64),
                mask: Bytes::new(),
                strength: None,
            }))
        }),
        ("inpaint.mask", |r| {
            r.mode = Some(GMode::Inpaint(pb::InpaintInput {
                image: rgb_png(64, 64),
                mask: rgb_png(80, 64),
                strength: None,
            }))
        }),
        ("inpaint.strength", |r| {
            let rgba = RgbaImage::from_pixel(64, 64, image::Rgba([1, 2, 3, 0]));
            r.mode = Some(GMode::Inpaint(pb::InpaintInput {
                image: png_of(DynamicImage::ImageRgba8(rgba)),
                mask: Bytes::new(),
                strength: Some(f32::NAN),
            }))
        }),
        ("reference_images", |r| {
            r.reference_images = vec![rgb_png(64, 64); 5]
        }),
        ("reference_images[1]", |r| {
            r.reference_images = vec![rgb_png(64, 64), Bytes::from_static(b"junk")]
        }),
        ("reference_images[0]", |r| {
            r.reference_images = vec![rgb_png(32, 32)]
        }),
        ("initial_noise", |r| {
            r.initial_noise = Some(f32s(&[1, 128, 4, 5], 0.0))
        }),
        ("initial_noise", |r| {
            r.initial_noise = Some(tensor(pb::Dtype::U8, &[1, 128, 4, 4], &[0]))
        }),
        ("initial_noise", |r| {
            let mut t = f32s(&[1, 128, 4, 4], 0.0);
            t.data = t.data.slice(4..);
            r.initial_noise = Some(t)
        }),
        ("initial_noise", |r| {
            let mut t = f32s(&[1, 128, 4, 4], 0.0);
            t.dtype = 77;
            r.initial_noise = Some(t)
        }),
    ];
    cases.extend(lora_cases!(pb::GenerateRequest));
    cases
}

fn encode_cases() -> Vec<Case<pb::TextEncoderServiceEncodeRequest>> {
    vec![
        ("prompts", |r| r.prompts.clear()),
        ("prompts", |r| r.prompts = vec!["a".into(); 64]),
        ("prompts[0]", |r| r.prompts = vec!["x".repeat(65 * 1024)]),
        ("negative_prompts", |r| {
            r.negative_prompts = vec!["a".into(), "b".into()]
        }),
        ("negative_prompts[0]", |r| {
            r.negative_prompts = vec!["x".repeat(65 * 1024)]
        }),
        ("model", |r| r.model = "no-such-model".into()),
    ]
}

fn denoise_cases() -> Vec<Case<pb::DenoiseRequest>> {
    let mut cases: Vec<Case<pb::DenoiseRequest>> = vec![
        ("model", |r| r.model = "no-such-model".into()),
        ("prompt_embeds", |r| r.prompt_embeds = None),
        ("prompt_embeds", |r| {
            let s = r.prompt_embeds.as_ref().unwrap().shape.clone();
            r.prompt_embeds = Some(f32s(&[s[0], 7, s[2]], 0.0))
        }),
        ("prompt_embeds", |r| {
            let s = r.prompt_embeds.as_ref().unwrap().shape.clone();
            r.prompt_embeds = Some(f32s(&s, f32::NAN))
        }),
        ("prompt_embeds", |r| {
            let s = r.prompt_embeds.as_ref().unwrap().shape.clone();
            r.prompt_embeds = Some(tensor(pb::Dtype::I64, &s, &[0; 8]))
        }),
        ("prompt_embeds", |r| {
            r.prompt_embeds.as_mut().unwrap().shape = vec![u64::MAX, 2, 2]
        }),
        ("negative_prompt_embeds", |r| {
            r.negative_prompt_embeds = Some(f32s(&[1, 3], 0.0))
        }),
        ("grid", |r| r.grid = None),
        ("grid", |r| {
            r.grid = Some(pb::LatentGrid {
                height: 0,
                width: 4,
            })
        }),
        ("grid", |r| {
            r.grid = Some(pb::LatentGrid {
                height: 100_000,
                width: 4,
            })
        }),
        ("num_steps", |r| r.num_steps = 0),
        ("num_steps", |r| r.num_steps = 201),
        ("guidance_scale", |r| r.guidance_scale = Some(f32::NAN)),
        ("noise", |r| r.noise = None),
        ("initial_noise", |r| {
            r.noise = Some(Noise::InitialNoise(f32s(&[1, 128, 4, 5], 0.0)))
        }),
        ("initial_noise", |r| {
            r.noise = Some(Noise::InitialNoise(f32s(&[1, 128, 4, 4], f32::INFINITY)))
        }),
        ("shift", |r| r.shift = Some(0.0)),
        ("shift", |r| r.shift = Some(f32::NAN)),
        ("image_to_image.image_latents", |r| {
            r.mode = Some(DMode::ImageToImage(pb::ImageToImage {
                image_latents: Some(f32s(&[1, 15, 128], 0.0)),
                strength: 0.5,
            }))
        }),
        ("image_to_image.strength", |r| {
            r.mode = Some(DMode::ImageToImage(pb::ImageToImage {
                image_latents: Some(f32s(&[1, 16, 128], 0.0)),
                strength: 2.0,
            }))
        }),
        ("inpaint.image_latents", |r| {
            r.mode = Some(DMode::Inpaint(pb::Inpaint {
                image_latents: None,
                mask: Some(f32s(&[1, 16, 1], 1.0)),
                strength: 1.0,
            }))
        }),
        ("inpaint.mask", |r| {
            r.mode = Some(DMode::Inpaint(pb::Inpaint {
                image_latents: Some(f32s(&[1, 16, 128], 0.0)),
                mask: Some(f32s(&[1, 16, 1], 3.0)),
                strength: 1.0,
            }))
        }),
        ("inpaint.mask", |r| {
            r.mode = Some(DMode::Inpaint(pb::Inpaint {
                image_latents: Some(f32s(&[1, 16, 128], 0.0)),
                mask: Some(f32s(&[1, 16, 2], 1.0)),
                strength: 1.0,
            }))
        }),
        ("inpaint.strength", |r| {
            r.mode = Some(DMode::Inpaint(pb::Inpaint {
                image_latents: Some(f32s(&[1, 16, 128], 0.0)),
                mask: Some(f32s(&[1, 16, 1], 1.0)),
                strength: -0.1,
            }))
        }),
        ("references", |r| {
            let one = pb::ReferenceLatents {
                latents: Some(f32s(&[16, 128], 0.0)),
                grid: Some(pb::LatentGrid {
                    height: 4,
                    width: 4,
                }),
            };
            r.references = vec![one; 5]
        }),
        ("references[0].latents", |r| {
            r.references = vec![pb::ReferenceLatents {
                latents: Some(f32s(&[15, 128], 0.0)),
                grid: Some(pb::LatentGrid {
                    height: 4,
                    width: 4,
                }),
            }]
        }),
        ("references[0].grid", |r| {
            r.references = vec![pb::ReferenceLatents {
                latents: Some(f32s(&[16, 128], 0.0)),
                grid: None,
            }]
        }),
    ];
    cases.extend(lora_cases!(pb::DenoiseRequest));
    cases
}

fn vae_encode_cases() -> Vec<Case<pb::VaeServiceEncodeRequest>> {
    vec![
        ("images", |r| r.images = None),
        ("images", |r| {
            r.images = Some(tensor(pb::Dtype::U8, &[64, 64, 3], &[0]))
        }),
        ("images", |r| {
            r.images = Some(tensor(pb::Dtype::U8, &[1, 64, 64, 4], &[0]))
        }),
        ("images", |r| {
            r.images = Some(tensor(pb::Dtype::U8, &[1, 72, 64, 3], &[0]))
        }),
        ("images", |r| {
            r.images = Some(tensor(pb::Dtype::U8, &[1, 48, 48, 3], &[0]))
        }),
        ("images", |r| {
            r.images = Some(tensor(pb::Dtype::U8, &[1, 64, 1024, 3], &[0]))
        }),
        ("images", |r| r.images = Some(f32s(&[1, 64, 64, 3], 2.0))),
        ("images", |r| {
            r.images = Some(tensor(pb::Dtype::U8, &[9, 64, 64, 3], &[0]))
        }),
        ("images", |r| {
            r.images = Some(tensor(pb::Dtype::I64, &[1, 64, 64, 3], &[0; 8]))
        }),
    ]
}

fn vae_decode_cases() -> Vec<Case<pb::DecodeRequest>> {
    vec![
        ("latents", |r| r.latents = None),
        ("latents", |r| r.latents = Some(f32s(&[1, 16, 64], 0.0))),
        ("latents", |r| r.latents = Some(f32s(&[16, 128], 0.0))),
        ("latents", |r| {
            r.latents = Some(f32s(&[1, 16, 128], f32::NAN))
        }),
        ("grid", |r| r.grid = None),
        ("grid", |r| {
            r.grid = Some(pb::LatentGrid {
                height: 2,
                width: 4,
            })
        }),
        ("grid.height", |r| {
            r.grid = Some(pb::LatentGrid {
                height: 0,
                width: 4,
            })
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_of_every_rpc_refuses_bad_values_by_name() {
    let running = start_stack("tiny-klein-4b").await;
    let mut gw = client(&running).await;
    let [enc, den, vae] = running.stage_addrs.map(|a| format!("http://{a}"));
    let mut enc = TextEncoderServiceClient::connect(enc).await.unwrap();
    let den = DenoiserServiceClient::connect(den)
        .await
        .unwrap()
        .max_decoding_message_size(klein_proto::MAX_MESSAGE_BYTES);
    let mut vae = VaeServiceClient::connect(vae)
        .await
        .unwrap()
        .max_decoding_message_size(klein_proto::MAX_MESSAGE_BYTES);
    let mut counted = 0;

    let base_generate = pb::GenerateRequest {
        prompt: "a cat".into(),
        width: 64,
        height: 64,
        num_steps: 1,
        seed: Some(1),
        preview_every: 7,
        ..Default::default()
    };
    generate(&mut gw, base_generate.clone()).await.unwrap();
    for (field, break_it) in generate_cases() {
        let mut r = base_generate.clone();
        break_it(&mut r);
        expect_invalid("Generate", field, generate(&mut gw, r).await.map(drop));
        counted += 1;
    }

    let base_encode = pb::TextEncoderServiceEncodeRequest {
        prompts: vec!["a cat".into()],
        ..Default::default()
    };
    let embeds = enc
        .encode(base_encode.clone())
        .await
        .unwrap()
        .into_inner()
        .prompt_embeds;
    for (field, break_it) in encode_cases() {
        let mut r = base_encode.clone();
        break_it(&mut r);
        expect_invalid("Encode", field, enc.encode(r).await.map(drop));
        counted += 1;
    }

    let base_denoise = pb::DenoiseRequest {
        prompt_embeds: embeds,
        grid: Some(pb::LatentGrid {
            height: 4,
            width: 4,
        }),
        num_steps: 1,
        noise: Some(Noise::Seed(1)),
        ..Default::default()
    };
    let denoise = |r: pb::DenoiseRequest| {
        let mut den = den.clone();
        async move {
            let mut stream = den.denoise(r).await?.into_inner();
            while stream.message().await?.is_some() {}
            Ok::<(), Status>(())
        }
    };
    denoise(base_denoise.clone()).await.unwrap();
    for (field, break_it) in denoise_cases() {
        let mut r = base_denoise.clone();
        break_it(&mut r);
        expect_invalid("Denoise", field, denoise(r).await);
        counted += 1;
    }

    let base_vae_encode = pb::VaeServiceEncodeRequest {
        images: Some(tensor(pb::Dtype::U8, &[1, 64, 64, 3], &[128])),
    };
    let latents = vae
        .encode(base_vae_encode.clone())
        .await
        .unwrap()
        .into_inner()
        .latents;
    for (field, break_it) in vae_encode_cases() {
        let mut r = base_vae_encode.clone();
        break_it(&mut r);
        expect_invalid("VaeService.Encode", field, vae.encode(r).await.map(drop));
        counted += 1;
    }
    let base_decode = pb::DecodeRequest {
        latents,
        grid: Some(pb::LatentGrid {
            height: 4,
            width: 4,
        }),
        force_tiling: true,
    };
    vae.decode(base_decode.clone()).await.unwrap();
    for (field, break_it) in vae_decode_cases() {
        let mut r = base_decode.clone();
        break_it(&mut r);
        expect_invalid("Decode", field, vae.decode(r).await.map(drop));
        counted += 1;
    }

    // Nothing above hurt anyone: every service still serves.
    generate(&mut gw, base_generate).await.unwrap();
    eprintln!(
        "MEASURED bad_input: {counted} bad-field cases refused with INVALID_ARGUMENT naming the field"
    );
    running.stop().await.unwrap();
}
