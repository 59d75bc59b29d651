//! One request end to end: encode (text, and images for I2I / inpaint / references) ->
//! denoise (streamed progress) -> decode (f32 VAE) -> PNG. A prompt whose embeddings a
//! denoiser kept skips the text encoder and sends their handle ([`crate::embeddings`]). Events
//! go to the client as they happen; dropping the returned future (client gone) drops every
//! downstream call in flight, which cancels them there too.

use std::time::Instant;

use klein_proto::pb::{self, generate_response::Event};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Status;

use crate::{
    clients::{Deadline, Stages, TraceContext, request, with_retry},
    embeddings::{HandleKey, is_unknown_handle},
    error::{GatewayError, Stage},
    image_io::{self, PngMetadata},
    tensors,
    validate::{Mode, ValidGenerate},
};

/// Where a request's events go.
pub type Events = mpsc::Sender<Result<pb::GenerateResponse, Status>>;

async fn emit(events: &Events, event: Event) {
    // A closed channel means the client left; the caller notices and drops this future.
    let _ = events
        .send(Ok(pb::GenerateResponse { event: Some(event) }))
        .await;
}

fn contract(stage: Stage, reason: impl Into<String>) -> GatewayError {
    GatewayError::Contract {
        stage,
        reason: reason.into(),
    }
}

/// Seconds spent so far per stage.
#[derive(Debug, Default, Clone, Copy)]
struct Timings {
    queue: f64,
    encode: f64,
    denoise: f64,
    decode: f64,
}

/// Runs `req` and streams its events; returns when the last image was sent.
pub async fn run(
    stages: &Stages,
    req: ValidGenerate,
    trace: &TraceContext,
    deadline: Deadline,
    queue_seconds: f64,
    events: &Events,
) -> Result<(), GatewayError> {
    let started = Instant::now();
    let mut timings = Timings {
        queue: queue_seconds,
        ..Timings::default()
    };
    let attempts = stages.max_attempts();
    emit(
        events,
        Event::Accepted(pb::Accepted {
            request_id: trace.request_id.clone(),
            seed: req.seed,
        }),
    )
    .await;

    emit(
        events,
        Event::Stage(pb::StageStarted {
            stage: pb::Stage::Encoding as i32,
        }),
    )
    .await;
    let t = Instant::now();
    // A prompt whose embeddings a denoiser kept skips the encoder: the request sends the handle.
    let key = HandleKey::of(&req);
    let handle = stages.handles.get(&key);
    let encode_text = || async {
        let msg = pb::TextEncoderServiceEncodeRequest {
            prompts: vec![req.prompt.clone()],
            negative_prompts: if req.cfg.is_some() {
                vec![req.negative_prompt.clone()]
            } else {
                vec![]
            },
            model: req.model.text_encoder.clone(),
        };
        with_retry(Stage::Encoder, attempts, &deadline, || {
            let mut client = stages.encoder(&req.model.text_encoder);
            let r = request(msg.clone(), &deadline, trace, Stage::Encoder)?;
            Ok(async move { client.encode(r).await })
        })
        .await
    };
    let text = async {
        if handle.is_some() {
            return Ok(None);
        }
        encode_text().await.map(Some)
    };
    let encode_image = |img: &image::RgbImage| {
        let msg = pb::VaeServiceEncodeRequest {
            images: Some(tensors::image_tensor(img)),
        };
        async move {
            let resp = with_retry(Stage::Vae, attempts, &deadline, || {
                let mut client = stages.vae.clone();
                let r = request(msg.clone(), &deadline, trace, Stage::Vae)?;
                Ok(async move { client.encode(r).await })
            })
            .await?;
            match (resp.latents, resp.grid) {
                (Some(latents), Some(grid)) => Ok((latents, grid)),
                _ => Err(contract(Stage::Vae, "Encode returned no latents or grid")),
            }
        }
    };
    let source = async {
        match &req.mode {
            Mode::TextToImage => Ok(None),
            Mode::ImageToImage { image, .. } | Mode::Inpaint { image, .. } => {
                encode_image(image).await.map(Some)
            }
        }
    };
    let refs = async {
        // References are few (<= 4) and the VAE serves one request at a time: in order is as
        // fast as concurrently.
        let mut out = Vec::with_capacity(req.references.len());
        for r in &req.references {
            out.push(encode_image(r).await?);
        }
        Ok::<_, GatewayError>(out)
    };
    let (text, source, refs) = tokio::join!(text, source, refs);
    let (text, source, refs) = (text?, source?, refs?);
    timings.encode = t.elapsed().as_secs_f64();

    let grid = pb::LatentGrid {
        height: req.height / 16,
        width: req.width / 16,
    };
    let mode = match (&req.mode, source) {
        (Mode::ImageToImage { strength, .. }, Some((latents, _))) => {
            Some(pb::denoise_request::Mode::ImageToImage(pb::ImageToImage {
                image_latents: Some(latents),
                strength: *strength,
            }))
        }
        (Mode::Inpaint { mask, strength, .. }, Some((latents, _))) => {
            Some(pb::denoise_request::Mode::Inpaint(pb::Inpaint {
                image_latents: Some(latents),
                mask: Some(tensors::mask_tensor(mask)),
                strength: *strength,
            }))
        }
        _ => None,
    };
    let noise = match &req.initial_noise {
        Some(t) => pb::denoise_request::Noise::InitialNoise(t.clone()),
        None => pb::denoise_request::Noise::Seed(req.seed),
    };
    let mut denoise = pb::DenoiseRequest {
        model: req.model.id.clone(),
        grid: Some(grid),
        num_steps: req.steps,
        guidance_scale: req.cfg,
        shift: None,
        mode,
        references: refs
            .into_iter()
            .map(|(latents, grid)| pb::ReferenceLatents {
                latents: Some(strip_batch(latents)),
                grid: Some(grid),
            })
            .collect(),
        preview_every: req.preview_every,
        noise: Some(noise),
        loras: req
            .loras
            .iter()
            .map(|(name, scale)| pb::LoraAdapter {
                name: name.clone(),
                scale: Some(*scale),
            })
            .collect(),
        ..Default::default()
    };
    match text {
        Some(text) => with_embeddings(&mut denoise, text, req.num_images)?,
        None => denoise.embeddings_handle = handle.clone().unwrap_or_default(),
    }

    emit(
        events,
        Event::Stage(pb::StageStarted {
            stage: pb::Stage::Denoising as i32,
        }),
    )
    .await;
    let t = Instant::now();
    let result =
        match denoise_stream(stages, denoise.clone(), trace, &deadline, attempts, events).await {
            Err(e) if denoise.prompt_embeds.is_none() && is_unknown_handle(&e) => {
                stages.handles.forget(&key);
                with_embeddings(&mut denoise, encode_text().await?, req.num_images)?;
                denoise_stream(stages, denoise, trace, &deadline, attempts, events).await?
            }
            result => result?,
        };
    stages
        .handles
        .remember(key, result.embeddings_handle.clone());
    timings.denoise = t.elapsed().as_secs_f64();
    timings.queue += result.queue_seconds;
    let mut warnings = req.warnings.clone();
    warnings.extend(result.warnings);
    let latents = result
        .latents
        .ok_or_else(|| contract(Stage::Denoiser, "no latents in the result"))?;

    emit(
        events,
        Event::Stage(pb::StageStarted {
            stage: pb::Stage::Decoding as i32,
        }),
    )
    .await;
    let t = Instant::now();
    let msg = pb::DecodeRequest {
        latents: Some(latents),
        grid: Some(grid),
        force_tiling: false,
    };
    let decoded = with_retry(Stage::Vae, attempts, &deadline, || {
        let mut client = stages.vae.clone();
        let r = request(msg.clone(), &deadline, trace, Stage::Vae)?;
        Ok(async move { client.decode(r).await })
    })
    .await?;
    let images = decoded
        .images
        .as_ref()
        .and_then(tensors::split_images)
        .ok_or_else(|| contract(Stage::Vae, "Decode returned no u8 [B, H, W, 3] images"))?;
    if images.len() != req.num_images as usize {
        return Err(contract(
            Stage::Vae,
            format!(
                "decoded {} images, expected {}",
                images.len(),
                req.num_images
            ),
        ));
    }
    let vae_seconds = t.elapsed().as_secs_f64();
    let pngs = encode_pngs(images, &req).await?;
    timings.decode = t.elapsed().as_secs_f64();
    let total = started.elapsed().as_secs_f64() + queue_seconds;
    tracing::info!(
        request_id = %trace.request_id,
        queue_seconds = timings.queue,
        encode_seconds = timings.encode,
        denoise_seconds = timings.denoise,
        denoiser_compute_seconds = result.compute_seconds,
        decode_seconds = timings.decode,
        vae_call_seconds = vae_seconds,
        total_seconds = total,
        "generate done"
    );
    for (i, png) in pngs.into_iter().enumerate() {
        emit(
            events,
            Event::Image(pb::Image {
                png: png.into(),
                index: i as u32,
                seed: req.seed.wrapping_add(i as u64),
                width: req.width,
                height: req.height,
                timings: Some(pb::Timings {
                    queue_seconds: timings.queue,
                    encode_seconds: timings.encode,
                    denoise_seconds: timings.denoise,
                    decode_seconds: timings.decode,
                    total_seconds: total,
                }),
                warnings: warnings.clone(),
            }),
        )
        .await;
    }
    for (stage, secs) in [
        ("encode", timings.encode),
        ("denoise", timings.denoise),
        ("decode", timings.decode),
    ] {
        metrics::histogram!("klein_gateway_stage_seconds", "stage" => stage).record(secs);
    }
    Ok(())
}

/// `[1, N, 128]` reference latents as the `[N, 128]` the denoiser takes.
fn strip_batch(mut t: pb::Tensor) -> pb::Tensor {
    if t.shape.len() == 3 && t.shape[0] == 1 {
        t.shape.remove(0);
    }
    t
}

/// `msg` with the encoder's embeddings, repeated for `num_images`, instead of a handle.
fn with_embeddings(
    msg: &mut pb::DenoiseRequest,
    text: pb::TextEncoderServiceEncodeResponse,
    num_images: u32,
) -> Result<(), GatewayError> {
    let prompt_embeds = text
        .prompt_embeds
        .ok_or_else(|| contract(Stage::Encoder, "no prompt_embeds"))?;
    msg.prompt_embeds = Some(tensors::repeat_batch(&prompt_embeds, num_images));
    msg.negative_prompt_embeds = text
        .negative_prompt_embeds
        .as_ref()
        .map(|t| tensors::repeat_batch(t, num_images));
    msg.embeddings_handle = Default::default();
    Ok(())
}

/// Runs the Denoise stream, forwarding progress; retries on UNAVAILABLE only before the
/// first event (nothing has happened yet, so the call is still idempotent).
async fn denoise_stream(
    stages: &Stages,
    msg: pb::DenoiseRequest,
    trace: &TraceContext,
    deadline: &Deadline,
    attempts: u32,
    events: &Events,
) -> Result<pb::DenoiseResult, GatewayError> {
    let mut stream = with_retry(Stage::Denoiser, attempts, deadline, || {
        let mut client = stages.denoiser(&msg.model);
        let r = request(msg.clone(), deadline, trace, Stage::Denoiser)?;
        Ok(async move { client.denoise(r).await })
    })
    .await?;
    while let Some(item) = stream.next().await {
        let item =
            item.map_err(|s| crate::error::downstream(Stage::Denoiser, s, deadline.passed()))?;
        match item.event {
            Some(pb::denoise_response::Event::Progress(p)) => {
                let preview_png = p
                    .preview
                    .as_ref()
                    .and_then(tensors::split_images)
                    .and_then(|imgs| imgs.into_iter().next())
                    .and_then(|img| {
                        let meta = PngMetadata {
                            prompt: "",
                            seed: 0,
                            steps: p.step,
                            model: "preview",
                        };
                        image_io::encode_png(&img, &meta).ok()
                    })
                    .unwrap_or_default();
                emit(
                    events,
                    Event::Step(pb::Step {
                        step: p.step,
                        total_steps: p.total_steps,
                        preview_png: preview_png.into(),
                    }),
                )
                .await;
            }
            Some(pb::denoise_response::Event::Result(r)) => return Ok(r),
            None => return Err(contract(Stage::Denoiser, "empty stream event")),
        }
    }
    Err(contract(Stage::Denoiser, "stream ended without a result"))
}

/// The decoded images as PNGs, each with the request's metadata, encoded off the async runtime
/// (a 1024² image keeps every core busy for a few milliseconds).
async fn encode_pngs(
    images: Vec<image::RgbImage>,
    req: &ValidGenerate,
) -> Result<Vec<Vec<u8>>, GatewayError> {
    let failed = |e: String| contract(Stage::Vae, format!("PNG encoding: {e}"));
    let (prompt, model, seed, steps) = (
        req.prompt.clone(),
        req.model.id.clone(),
        req.seed,
        req.steps,
    );
    tokio::task::spawn_blocking(move || {
        images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let meta = PngMetadata {
                    prompt: &prompt,
                    seed: seed.wrapping_add(i as u64),
                    steps,
                    model: &model,
                };
                image_io::encode_png(img, &meta).map_err(|e| failed(e.to_string()))
            })
            .collect()
    })
    .await
    .map_err(|e| failed(e.to_string()))?
}
