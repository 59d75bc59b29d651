//! Whole sampling runs through real gRPC against the diffusers goldens: text-to-image,
//! image-to-image, inpainting, multi-reference and CFG (base checkpoint), each from the
//! fixture noise. f32: final latents rel-L2 <= 1e-4; bf16: within 2x torch's own
//! bf16-vs-f32 spread for that case (goldens/manifest.json), with one progress event a step in
//! order. Text-to-image on the klein-9B-shaped checkpoint too.

mod common;

use candle_core::{DType, Tensor};
use common::{Server, denoise, grid, start, unwire, wire};
use klein_proto::pb::{self, denoise_request::Mode, denoise_request::Noise};
use klein_runtime::device::DTypeSpec;
use klein_test_support::{golden, manifest, rel_l2, take};

/// `p0.prompt_embeds.<dt>` of an embeddings golden (prompt "a photo of a cat", the prompt of
/// every run golden).
fn prompt(embeddings: &str, dt: &str) -> pb::Tensor {
    let g = golden(embeddings);
    wire(take(&g, &format!("p0.prompt_embeds.{dt}")))
}

fn base_request(dt: &str, noise: &Tensor, steps: u32) -> pb::DenoiseRequest {
    pb::DenoiseRequest {
        prompt_embeds: Some(prompt("text_embeddings", dt)),
        grid: grid(4, 6),
        num_steps: steps,
        noise: Some(Noise::InitialNoise(wire(noise))),
        ..Default::default()
    }
}

/// Runs `req` and returns rel-L2 of the final latents against `final_latents.<dt>`, checking the
/// step count and the result's dtype.
async fn check(
    server: &mut Server,
    case: &str,
    dt: &str,
    req: pb::DenoiseRequest,
    steps_run: u32,
) -> f64 {
    let g = golden(case);
    let (progress, result) = denoise(&mut server.client, req).await.unwrap();
    assert_eq!(progress.len() as u32, steps_run, "{case}");
    assert!(progress.iter().all(|p| p.total_steps == steps_run));
    // On a GPU each step is reported after the next was queued: still one event a step, in
    // order, each with its own sigma.
    let steps: Vec<u32> = progress.iter().map(|p| p.step).collect();
    assert_eq!(steps, (1..=steps_run).collect::<Vec<_>>(), "{case}");
    assert!(
        progress.windows(2).all(|w| w[1].sigma < w[0].sigma),
        "{case}: sigmas not decreasing"
    );
    assert_eq!(progress.last().unwrap().sigma, 0.0);
    let latents = unwire(result.latents.as_ref().unwrap());
    let dtype = if dt == "f32" { DType::F32 } else { DType::BF16 };
    assert_eq!(latents.dtype(), dtype);
    rel_l2(&latents, take(&g, &format!("final_latents.{dt}")))
}

fn t2i(dt: &str) -> pb::DenoiseRequest {
    let g = golden("t2i");
    base_request(dt, take(&g, "noise"), 4)
}

/// Text-to-image on the 9B-shaped checkpoint, with its own (wider) prompt embeddings.
fn t2i_9b(dt: &str) -> pb::DenoiseRequest {
    let g = golden("t2i_9b");
    pb::DenoiseRequest {
        prompt_embeds: Some(prompt("text_embeddings_9b", dt)),
        ..base_request(dt, take(&g, "noise"), 4)
    }
}

fn i2i(dt: &str) -> pb::DenoiseRequest {
    let g = golden("i2i");
    pb::DenoiseRequest {
        mode: Some(Mode::ImageToImage(pb::ImageToImage {
            image_latents: Some(wire(take(&g, &format!("x0_packed.{dt}")))),
            strength: 0.6,
        })),
        ..base_request(dt, take(&g, "noise"), 6)
    }
}

fn inpaint(dt: &str) -> pb::DenoiseRequest {
    let g = golden("inpaint");
    pb::DenoiseRequest {
        mode: Some(Mode::Inpaint(pb::Inpaint {
            image_latents: Some(wire(take(&g, &format!("x0_packed.{dt}")))),
            mask: Some(wire(
                &take(&g, &format!("mask_tokens.{dt}"))
                    .to_dtype(DType::F32)
                    .unwrap(),
            )),
            strength: 0.8,
        })),
        ..base_request(dt, take(&g, "noise"), 6)
    }
}

fn multiref(dt: &str) -> pb::DenoiseRequest {
    let g = golden("multiref");
    let tokens = take(&g, &format!("ref_tokens.{dt}")).squeeze(0).unwrap();
    let reference = |start, len, h, w| pb::ReferenceLatents {
        latents: Some(wire(&tokens.narrow(0, start, len).unwrap())),
        grid: grid(h, w),
    };
    pb::DenoiseRequest {
        references: vec![reference(0, 16, 4, 4), reference(16, 24, 4, 6)],
        ..base_request(dt, take(&g, "noise"), 4)
    }
}

fn cfg(dt: &str) -> pb::DenoiseRequest {
    let g = golden("cfg");
    pb::DenoiseRequest {
        negative_prompt_embeds: Some(wire(take(&g, &format!("negative_prompt_embeds.{dt}")))),
        guidance_scale: Some(4.0),
        ..base_request(dt, take(&g, "noise"), 8)
    }
}

fn spread(case: &str) -> f64 {
    manifest()["cases"][case]["spread"]["final_latents"]["rel_l2"]
        .as_f64()
        .unwrap()
}

/// (case, request builder, steps run)
type Case = (&'static str, fn(&str) -> pb::DenoiseRequest, u32);
const DISTILLED: [Case; 4] = [
    ("t2i", t2i, 4),
    ("i2i", i2i, 4),
    ("inpaint", inpaint, 5),
    ("multiref", multiref, 4),
];

#[tokio::test]
async fn f32_runs_match_diffusers() {
    let mut server = start("tiny-klein-4b", DTypeSpec::F32).await;
    for (case, build, steps) in DISTILLED {
        let e = check(&mut server, case, "f32", build("f32"), steps).await;
        println!("{case} f32 final latents rel-L2 {e:.3e}");
        assert!(e <= 1e-4, "{case}: {e}");
    }
}

#[tokio::test]
async fn bf16_runs_are_within_the_torch_spread() {
    let mut server = start("tiny-klein-4b", DTypeSpec::Bf16).await;
    for (case, build, steps) in DISTILLED {
        let e = check(&mut server, case, "bf16", build("bf16"), steps).await;
        let s = spread(case);
        println!("{case} bf16 final latents rel-L2 {e:.3e} (torch spread {s:.3e})");
        assert!(e <= 2.0 * s, "{case}: {e} > 2 x {s}");
    }
}

#[tokio::test]
async fn cfg_on_the_base_model_matches_diffusers() {
    let mut server = start("tiny-klein-base-4b", DTypeSpec::F32).await;
    let e = check(&mut server, "cfg", "f32", cfg("f32"), 8).await;
    println!("cfg f32 final latents rel-L2 {e:.3e}");
    assert!(e <= 1e-4, "cfg: {e}");
    let mut server = start("tiny-klein-base-4b", DTypeSpec::Bf16).await;
    let e = check(&mut server, "cfg", "bf16", cfg("bf16"), 8).await;
    let s = spread("cfg");
    println!("cfg bf16 final latents rel-L2 {e:.3e} (torch spread {s:.3e})");
    assert!(e <= 2.0 * s, "cfg: {e} > 2 x {s}");
}

#[tokio::test]
async fn t2i_on_the_9b_shaped_model_matches_diffusers() {
    let mut server = start("tiny-klein-9b", DTypeSpec::F32).await;
    let e = check(&mut server, "t2i_9b", "f32", t2i_9b("f32"), 4).await;
    println!("t2i_9b f32 final latents rel-L2 {e:.3e}");
    assert!(e <= 1e-4, "t2i_9b: {e}");
    let mut server = start("tiny-klein-9b", DTypeSpec::Bf16).await;
    let e = check(&mut server, "t2i_9b", "bf16", t2i_9b("bf16"), 4).await;
    let s = spread("t2i_9b");
    println!("t2i_9b bf16 final latents rel-L2 {e:.3e} (torch spread {s:.3e})");
    assert!(e <= 2.0 * s, "t2i_9b: {e} > 2 x {s}");
}

#[tokio::test]
async fn distilled_model_ignores_guidance_with_a_warning() {
    let mut server = start("tiny-klein-4b", DTypeSpec::F32).await;
    let mut req = cfg("f32");
    req.num_steps = 1;
    let (_, result) = denoise(&mut server.client, req).await.unwrap();
    assert!(
        result.warnings.iter().any(|w| w.contains("distilled")),
        "{:?}",
        result.warnings
    );
}
