//! The DenoiserService contract over real gRPC: every bad field is INVALID_ARGUMENT naming the
//! field, seeds are reproducible, previews come when asked, Info describes the service, and
//! startup refuses a budget the weights do not fit in, and a request that can never fit is
//! RESOURCE_EXHAUSTED.

mod bfl_layout;
mod common;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use common::{Server, config, denoise, grid, start, start_with, unwire, wire};
use klein_proto::pb::{self, denoise_request::Mode, denoise_request::Noise};
use klein_runtime::{bytesize::ByteSize, device::DTypeSpec};

fn zeros(shape: &[usize]) -> pb::Tensor {
    wire(&Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap())
}

/// A valid 1-step text-to-image request on a 1x2 grid.
fn valid() -> pb::DenoiseRequest {
    pb::DenoiseRequest {
        prompt_embeds: Some(zeros(&[1, 512, 192])),
        grid: grid(1, 2),
        num_steps: 1,
        noise: Some(Noise::Seed(3)),
        ..Default::default()
    }
}

fn with_nan(shape: &[usize]) -> pb::Tensor {
    let mut t = zeros(shape);
    let mut data = t.data.to_vec();
    data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    t.data = Bytes::from(data);
    t
}

fn i2i(latents: pb::Tensor, strength: f32) -> Option<Mode> {
    Some(Mode::ImageToImage(pb::ImageToImage {
        image_latents: Some(latents),
        strength,
    }))
}

fn inpaint(mask: pb::Tensor) -> Option<Mode> {
    Some(Mode::Inpaint(pb::Inpaint {
        image_latents: Some(zeros(&[1, 2, 128])),
        mask: Some(mask),
        strength: 1.0,
    }))
}

fn reference(tokens: usize, h: u32, w: u32) -> pb::ReferenceLatents {
    pb::ReferenceLatents {
        latents: Some(zeros(&[tokens, 128])),
        grid: grid(h, w),
    }
}

#[tokio::test]
async fn bad_fields_are_invalid_argument_naming_the_field() {
    let mut server = start("tiny-klein-4b", DTypeSpec::F32).await;
    denoise(&mut server.client, valid())
        .await
        .expect("the base request is valid");
    type Edit = Box<dyn Fn(&mut pb::DenoiseRequest)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("model", Box::new(|r| r.model = "flux-dev".into())),
        ("prompt_embeds", Box::new(|r| r.prompt_embeds = None)),
        (
            "prompt_embeds",
            Box::new(|r| r.prompt_embeds = Some(zeros(&[1, 512, 100]))),
        ),
        (
            "prompt_embeds",
            Box::new(|r| r.prompt_embeds = Some(zeros(&[1, 77, 192]))),
        ),
        (
            "prompt_embeds",
            Box::new(|r| r.prompt_embeds = Some(zeros(&[5, 512, 192]))),
        ),
        (
            "prompt_embeds",
            Box::new(|r| r.prompt_embeds = Some(with_nan(&[1, 512, 192]))),
        ),
        (
            "prompt_embeds",
            Box::new(|r| r.prompt_embeds.as_mut().unwrap().data = Bytes::from_static(&[0; 3])),
        ),
        (
            "prompt_embeds",
            Box::new(|r| r.prompt_embeds.as_mut().unwrap().dtype = pb::Dtype::U8 as i32),
        ),
        (
            "negative_prompt_embeds",
            Box::new(|r| r.negative_prompt_embeds = Some(zeros(&[1, 512, 64]))),
        ),
        (
            "negative_prompt_embeds",
            Box::new(|r| r.negative_prompt_embeds = Some(with_nan(&[1, 512, 192]))),
        ),
        ("grid", Box::new(|r| r.grid = None)),
        ("grid", Box::new(|r| r.grid = grid(0, 2))),
        ("grid", Box::new(|r| r.grid = grid(200, 2))),
        ("num_steps", Box::new(|r| r.num_steps = 0)),
        ("num_steps", Box::new(|r| r.num_steps = 201)),
        (
            "guidance_scale",
            Box::new(|r| r.guidance_scale = Some(f32::NAN)),
        ),
        ("noise", Box::new(|r| r.noise = None)),
        (
            "initial_noise",
            Box::new(|r| r.noise = Some(Noise::InitialNoise(zeros(&[1, 128, 2, 1])))),
        ),
        (
            "initial_noise",
            Box::new(|r| r.noise = Some(Noise::InitialNoise(with_nan(&[1, 128, 1, 2])))),
        ),
        ("shift", Box::new(|r| r.shift = Some(0.0))),
        (
            "image_to_image.strength",
            Box::new(|r| r.mode = i2i(zeros(&[1, 2, 128]), 1.5)),
        ),
        (
            "image_to_image.strength",
            Box::new(|r| r.mode = i2i(zeros(&[1, 2, 128]), -0.1)),
        ),
        (
            "image_to_image.strength",
            Box::new(|r| r.mode = i2i(zeros(&[1, 2, 128]), f32::NAN)),
        ),
        (
            "image_to_image.image_latents",
            Box::new(|r| r.mode = i2i(zeros(&[1, 3, 128]), 0.5)),
        ),
        (
            "image_to_image.image_latents",
            Box::new(|r| r.mode = i2i(with_nan(&[1, 2, 128]), 0.5)),
        ),
        (
            "inpaint.mask",
            Box::new(|r| r.mode = inpaint(zeros(&[1, 3, 1]))),
        ),
        (
            "inpaint.mask",
            Box::new(|r| r.mode = inpaint(zeros(&[1, 2, 2]))),
        ),
        (
            "inpaint.mask",
            Box::new(|r| {
                r.mode = inpaint(wire(&Tensor::full(2f32, (1, 2, 1), &Device::Cpu).unwrap()))
            }),
        ),
        (
            "references[0].latents",
            Box::new(|r| r.references = vec![reference(5, 2, 2)]),
        ),
        (
            "references[1].grid",
            Box::new(|r| r.references = vec![reference(4, 2, 2), reference(1, 0, 1)]),
        ),
        (
            "references",
            Box::new(|r| r.references = (0..5).map(|_| reference(1, 1, 1)).collect()),
        ),
    ];
    for (field, edit) in cases {
        let mut req = valid();
        edit(&mut req);
        let err = denoise(&mut server.client, req).await.expect_err(field);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
}

async fn latents(server: &mut Server, req: pb::DenoiseRequest) -> Tensor {
    let (_, result) = denoise(&mut server.client, req).await.unwrap();
    unwire(result.latents.as_ref().unwrap())
}

#[tokio::test]
async fn seeds_are_reproducible_and_previews_come_when_asked() {
    let mut server = start("tiny-klein-4b", DTypeSpec::F32).await;
    let seeded = |seed| pb::DenoiseRequest {
        noise: Some(Noise::Seed(seed)),
        num_steps: 3,
        ..valid()
    };
    let a = latents(&mut server, seeded(7)).await;
    let b = latents(&mut server, seeded(7)).await;
    let c = latents(&mut server, seeded(8)).await;
    assert_eq!(a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
    assert_ne!(a.to_vec3::<f32>().unwrap(), c.to_vec3::<f32>().unwrap());
    // The seed's noise is the documented generator's.
    let noise = denoiser_svc::noise::seeded_noise(7, 1, 128, 1, 2).unwrap();
    let explicit = pb::DenoiseRequest {
        noise: Some(Noise::InitialNoise(wire(&noise))),
        ..seeded(7)
    };
    let d = latents(&mut server, explicit).await;
    assert_eq!(a.to_vec3::<f32>().unwrap(), d.to_vec3::<f32>().unwrap());

    let req = pb::DenoiseRequest {
        preview_every: 2,
        num_steps: 4,
        ..valid()
    };
    let (progress, _) = denoise(&mut server.client, req).await.unwrap();
    let previews: Vec<_> = progress.iter().map(|p| p.preview.is_some()).collect();
    assert_eq!(previews, vec![false, true, false, true]);
    let preview = unwire(progress[1].preview.as_ref().unwrap());
    assert_eq!(
        (preview.dims(), preview.dtype()),
        (&[1usize, 1, 2, 3][..], DType::U8)
    );
}

/// A request's embeddings come back as a handle; a later request sending the handle alone runs
/// on the same embeddings, a handle this replica does not hold is FAILED_PRECONDITION (the
/// caller then sends the embeddings), and with the cache off no handle is given.
#[tokio::test]
async fn repeated_prompts_send_a_handle_instead_of_their_embeddings() {
    let mut server = start("tiny-klein-4b", DTypeSpec::F32).await;
    let embeds = Tensor::randn(0f32, 1.0, (1, 512, 192), &Device::Cpu).unwrap();
    let sent = pb::DenoiseRequest {
        prompt_embeds: Some(wire(&embeds)),
        num_steps: 2,
        ..valid()
    };
    let (_, first) = denoise(&mut server.client, sent.clone()).await.unwrap();
    assert_eq!(first.embeddings_handle.len(), 16);
    let by_handle = pb::DenoiseRequest {
        prompt_embeds: None,
        embeddings_handle: first.embeddings_handle.clone(),
        ..sent.clone()
    };
    let (_, second) = denoise(&mut server.client, by_handle.clone())
        .await
        .unwrap();
    assert_eq!(second.embeddings_handle, first.embeddings_handle);
    let latents = |r: &pb::DenoiseResult| unwire(r.latents.as_ref().unwrap()).to_vec3::<f32>();
    assert_eq!(latents(&first).unwrap(), latents(&second).unwrap());
    let other = pb::DenoiseRequest {
        embeddings_handle: Bytes::from(vec![0u8; 16]),
        ..by_handle.clone()
    };
    let err = denoise(&mut server.client, other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().starts_with("embeddings handle unknown"),
        "{}",
        err.message()
    );

    let mut off = start_with(denoiser_svc::Config {
        embeddings_cache_bytes: ByteSize(0),
        ..config("tiny-klein-4b", DTypeSpec::F32)
    })
    .await;
    let (_, result) = denoise(&mut off.client, sent).await.unwrap();
    assert!(result.embeddings_handle.is_empty());
    let err = denoise(&mut off.client, by_handle).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

/// A handle names one model's embeddings: sent with a request for a model of another context
/// width it is INVALID_ARGUMENT naming the field, before any work.
#[tokio::test]
async fn a_handle_to_another_models_embeddings_is_invalid() {
    let mut server = start_with(two_models(0)).await;
    let (_, result) = denoise(&mut server.client, valid()).await.unwrap();
    let req = pb::DenoiseRequest {
        prompt_embeds: None,
        embeddings_handle: result.embeddings_handle,
        ..for_9b()
    };
    let err = denoise(&mut server.client, req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("embeddings_handle:"),
        "{}",
        err.message()
    );
}

/// The service's Info.
async fn info(server: &Server) -> pb::ServiceInfo {
    let mut client = server.client.clone();
    let info = client
        .info(pb::DenoiserServiceInfoRequest {})
        .await
        .unwrap();
    info.into_inner().info.unwrap()
}

#[tokio::test]
async fn info_describes_the_model_and_budget() {
    let mut server = start("tiny-klein-4b", DTypeSpec::Bf16).await;
    let info = info(&server).await;
    assert_eq!(info.service, "denoiser");
    assert_eq!(info.model_id, "tiny-klein-4b");
    assert_eq!(info.dtype, pb::Dtype::Bf16 as i32);
    assert_eq!(info.device, klein_test_support::test_device_name());
    assert_eq!(info.reserved_bytes, 0);
    assert_eq!(info.memory_budget_bytes, 4 << 30);
    assert!(info.weight_bytes > 0 && info.max_batch == 4);
    assert_eq!(info.details["is_distilled"], "true");
    assert_eq!(info.details["joint_attention_dim"], "192");
    // A request naming the model by id is accepted; the result is in the model dtype.
    let req = pb::DenoiseRequest {
        model: "tiny-klein-4b".into(),
        ..valid()
    };
    assert_eq!(latents(&mut server, req).await.dtype(), DType::BF16);
}

/// `quantize = "q8_0"`: Info reports the quantized weights' bytes, requests run, and the
/// result differs from the dense model's by the format's error only.
#[tokio::test]
async fn a_quantized_model_reports_its_smaller_weights_and_serves() {
    let mut dense = start("tiny-klein-4b", DTypeSpec::F32).await;
    let mut q8 = start_with(denoiser_svc::Config {
        quantize: "q8_0".parse().unwrap(),
        ..config("tiny-klein-4b", DTypeSpec::F32)
    })
    .await;
    let (d, q) = (info(&dense).await, info(&q8).await);
    assert!(
        q.weight_bytes < d.weight_bytes,
        "{} vs {}",
        q.weight_bytes,
        d.weight_bytes
    );
    let quantize = |i: &pb::ServiceInfo| i.details["quantize"].clone();
    assert_eq!((quantize(&d), quantize(&q)), ("none".into(), "q8_0".into()));
    let req = pb::DenoiseRequest {
        noise: Some(Noise::Seed(3)),
        num_steps: 2,
        ..valid()
    };
    let (a, b) = (
        latents(&mut dense, req.clone()).await,
        latents(&mut q8, req).await,
    );
    let e = klein_test_support::rel_l2(&b, &a);
    assert!(e > 0.0 && e < 0.05, "q8_0 against dense: rel-L2 {e}");
}

/// A GGUF transformer (projections in Q8_0 blocks, the rest F32) serves exactly what the
/// dense checkpoint quantized to q8_0 at load time serves, and Info says how it is stored.
#[tokio::test]
async fn a_gguf_model_serves_its_stored_blocks() {
    use candle_core::quantized::GgmlDType;
    use denoiser_svc::model::bfl::is_projection;

    let file = bfl_layout::temp("service-q8.gguf");
    bfl_layout::write_gguf(&file, &bfl_layout::tensors(), "", |name, dims| {
        match (is_projection(name), dims.len()) {
            (true, 2) => GgmlDType::Q8_0,
            _ => GgmlDType::F32,
        }
    });
    let mut gguf = start_with(denoiser_svc::Config {
        model_dir: Some(file.0.clone()),
        is_distilled: Some(true),
        ..config("tiny-klein-4b", DTypeSpec::F32)
    })
    .await;
    let mut q8 = start_with(denoiser_svc::Config {
        quantize: "q8_0".parse().unwrap(),
        ..config("tiny-klein-4b", DTypeSpec::F32)
    })
    .await;
    let (g, q) = (info(&gguf).await, info(&q8).await);
    assert_eq!(g.details["checkpoint_format"], "gguf");
    assert_eq!(g.details["stored_blocks"], "q8_0:20");
    assert_eq!(q.details["stored_blocks"], "");
    assert_eq!(g.weight_bytes, q.weight_bytes);
    let req = pb::DenoiseRequest {
        noise: Some(Noise::Seed(5)),
        num_steps: 2,
        ..valid()
    };
    let (a, b) = (
        latents(&mut gguf, req.clone()).await,
        latents(&mut q8, req).await,
    );
    assert_eq!(klein_test_support::max_abs_diff(&a, &b), 0.0);
}

/// The error a service started with `cfg` refuses to start with.
async fn startup_error(cfg: denoiser_svc::Config) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    denoiser_svc::serve(cfg, listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string()
}

#[tokio::test]
async fn a_budget_smaller_than_the_weights_refuses_to_start() {
    let mut cfg = config("tiny-klein-4b", DTypeSpec::F32);
    cfg.server.gpu_memory_budget = ByteSize(1 << 20);
    let err = startup_error(cfg).await;
    assert!(err.contains("gpu_memory_budget"), "{err}");
    assert!(
        err.contains("--quantize q4k"),
        "the error names the way out: {err}"
    );
    // Weights fit but no request ever can (each reserves at least 64 MiB): RESOURCE_EXHAUSTED.
    let mut cfg = config("tiny-klein-4b", DTypeSpec::F32);
    cfg.runtime_overhead = ByteSize(0);
    cfg.server.gpu_memory_budget = ByteSize(64 << 20);
    let mut server = start_with(cfg).await;
    let err = denoise(&mut server.client, valid()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let mut cfg = config("tiny-klein-4b", DTypeSpec::F32);
    cfg.runtime_overhead = ByteSize(0);
    cfg.server.gpu_memory_budget = ByteSize(256 << 20);
    let mut server = start_with(cfg).await;
    denoise(&mut server.client, valid()).await.unwrap();
}

#[tokio::test]
async fn a_warm_up_side_off_the_token_grid_refuses_to_start() {
    let mut cfg = config("tiny-klein-4b", DTypeSpec::F32);
    cfg.warm_up_side = 1000;
    let err = startup_error(cfg).await;
    assert!(err.contains("warm_up_side"), "{err}");
}

/// The service with the 4B-shaped default model and the 9B-shaped one as "9b"; by default only
/// one model's weights fit the device-weight cap at a time.
fn two_models(model_wait_secs: u64) -> denoiser_svc::Config {
    let mut cfg = config("tiny-klein-4b", DTypeSpec::F32);
    cfg.models.push(denoiser_svc::config::ModelEntry {
        id: Some("9b".into()),
        path: klein_test_support::pipeline_dir("tiny-klein-9b"),
        is_distilled: None,
        text_encoder: None,
        lora: Vec::new(),
        adapters: Vec::new(),
    });
    cfg.model_wait_secs = model_wait_secs;
    cfg
}

/// A request for "9b" (its context is 288 wide).
fn for_9b() -> pb::DenoiseRequest {
    pb::DenoiseRequest {
        model: "9b".into(),
        prompt_embeds: Some(zeros(&[1, 512, 288])),
        ..valid()
    }
}

/// Starts a 40-step run on the default model and returns its stream once it is running.
async fn long_run(server: &mut Server) -> tonic::Streaming<pb::DenoiseResponse> {
    let req = pb::DenoiseRequest {
        num_steps: 40,
        ..valid()
    };
    let mut stream = server.client.denoise(req).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("first progress");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_in_use_is_never_evicted_another_waits_for_it() {
    let mut server = start_with(two_models(60)).await;
    let mut first = long_run(&mut server).await;
    let mut other = server.client.clone();
    let waiting = tokio::spawn(async move {
        let out = denoise(&mut other, for_9b()).await;
        (out, std::time::Instant::now())
    });
    let mut first_done = None;
    while let Some(msg) = first.message().await.unwrap() {
        if let Some(pb::denoise_response::Event::Result(_)) = msg.event {
            first_done = Some(std::time::Instant::now());
        }
    }
    let first_done = first_done.expect("the running model finished its run");
    let (out, waited_done) = waiting.await.unwrap();
    let (progress, _) = out.expect("the waiting request ran");
    assert_eq!(progress.len(), 1);
    assert!(
        waited_done > first_done,
        "the 9b run could only start once the run holding the memory ended"
    );
    let info = info(&server).await;
    let state: Vec<(&str, &str, bool, u64, u64)> = info
        .models
        .iter()
        .map(|m| {
            let model = (m.id.as_str(), m.variant.as_str(), m.on_device);
            (model.0, model.1, model.2, m.loads, m.evictions)
        })
        .collect();
    assert_eq!(
        state,
        [
            ("tiny-klein-4b", "custom", false, 1, 1),
            ("9b", "custom", true, 1, 0)
        ]
    );
    assert_eq!(info.models[1].details["num_layers"], "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_model_wait_a_busy_model_is_resource_exhausted() {
    let mut server = start_with(two_models(0)).await;
    let _first = long_run(&mut server).await;
    let err = denoise(&mut server.client.clone(), for_9b())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("\"9b\""), "{}", err.message());
    let err = denoise(
        &mut server.client,
        pb::DenoiseRequest {
            model: "klein-13b".into(),
            ..valid()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("tiny-klein-4b, 9b"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_host_cap_below_a_model_or_a_repeated_id_refuses_to_start() {
    let mut cfg = config("tiny-klein-4b", DTypeSpec::F32);
    cfg.residency.host_memory_cap = Some(ByteSize(1 << 20));
    if klein_test_support::test_device().is_cpu() {
        let err = startup_error(cfg).await;
        assert!(
            err.contains("host weights but the cap is 1048576 bytes"),
            "{err}"
        );
    } else {
        // On a GPU the weights live on the device; host copies are optional and skipped.
        let mut server = start_with(cfg).await;
        denoise(&mut server.client, valid()).await.unwrap();
    }
    let mut cfg = two_models(1);
    cfg.models[0].id = Some("tiny-klein-4b".into());
    let err = startup_error(cfg).await;
    assert!(
        err.contains("duplicate model id \"tiny-klein-4b\""),
        "{err}"
    );
}

/// One checkpoint served twice, plain and with a LoRA merged (`[[models]]` with `lora`): a
/// request picks the adapted transformer by model id, Info names the adapter, and an adapter
/// that cannot be read refuses the start with its path.
#[tokio::test]
async fn a_model_entry_with_a_lora_serves_the_adapted_transformer() {
    let lora = klein_test_support::fixtures_dir()
        .join("loras/tiny-klein-4b-diffusers/pytorch_lora_weights.safetensors");
    let spec = denoiser_svc::lora::LoraSpec {
        path: lora.clone(),
        scale: 0.8,
    };
    let mut cfg = config("tiny-klein-4b", DTypeSpec::F32);
    cfg.models.push(denoiser_svc::config::ModelEntry {
        id: Some("styled".into()),
        path: klein_test_support::pipeline_dir("tiny-klein-4b"),
        is_distilled: None,
        text_encoder: None,
        lora: vec![spec.clone()],
        adapters: Vec::new(),
    });
    let mut server = start_with(cfg.clone()).await;
    let models = info(&server).await.models;
    let details = |id: &str| models.iter().find(|m| m.id == id).unwrap().details.clone();
    assert_eq!(details("tiny-klein-4b")["lora"], "");
    assert_eq!(details("styled")["lora"], format!("{}:0.8", lora.display()));
    let req = |model: &str| pb::DenoiseRequest {
        model: model.into(),
        num_steps: 2,
        ..valid()
    };
    let plain = latents(&mut server, req("")).await;
    let styled = latents(&mut server, req("styled")).await;
    let again = latents(&mut server, req("tiny-klein-4b")).await;
    let e = klein_test_support::rel_l2(&styled, &plain);
    assert!(e > 1e-2, "the adapter changes the result: rel-L2 {e}");
    assert_eq!(
        plain.to_vec3::<f32>().unwrap(),
        again.to_vec3::<f32>().unwrap()
    );

    cfg.models[0].lora = vec![denoiser_svc::lora::LoraSpec {
        path: "/nonexistent/lora.safetensors".into(),
        ..spec
    }];
    let err = startup_error(cfg).await;
    assert!(err.contains("/nonexistent/lora.safetensors"), "{err}");
}

/// Adapters chosen per request (`adapters` of a model, applied unmerged): the default model's
/// "style" at 0.8 gives what the model entry with the same file merged at 0.8 gives, the plain
/// request after it is unchanged, Info lists the names, and a request naming an adapter the
/// model lacks, or a strength out of range, is refused naming its field.
#[tokio::test]
async fn a_request_applies_the_adapters_it_names() {
    let lora = klein_test_support::fixtures_dir()
        .join("loras/tiny-klein-4b-diffusers/pytorch_lora_weights.safetensors");
    let mut cfg = config("tiny-klein-4b", DTypeSpec::F32);
    cfg.adapters = vec![denoiser_svc::lora::AdapterSpec {
        name: "style".into(),
        path: lora.clone(),
    }];
    cfg.models.push(denoiser_svc::config::ModelEntry {
        id: Some("merged".into()),
        path: klein_test_support::pipeline_dir("tiny-klein-4b"),
        is_distilled: None,
        text_encoder: None,
        lora: vec![denoiser_svc::lora::LoraSpec {
            path: lora.clone(),
            scale: 0.8,
        }],
        adapters: Vec::new(),
    });
    let mut server = start_with(cfg.clone()).await;
    let models = info(&server).await.models;
    assert_eq!(models[0].adapters, ["style"]);
    assert!(models[1].adapters.is_empty());
    let req = |model: &str, loras: Vec<pb::LoraAdapter>| pb::DenoiseRequest {
        model: model.into(),
        num_steps: 2,
        loras,
        ..valid()
    };
    let style = |scale| pb::LoraAdapter {
        name: "style".into(),
        scale,
    };
    let plain = latents(&mut server, req("", vec![])).await;
    let adapted = latents(&mut server, req("", vec![style(Some(0.8))])).await;
    let merged = latents(&mut server, req("merged", vec![])).await;
    let again = latents(&mut server, req("", vec![])).await;
    let e = klein_test_support::rel_l2(&adapted, &merged);
    let moved = klein_test_support::rel_l2(&adapted, &plain);
    println!("per request vs merged: rel-L2 {e:.3e} (the adapter moves it {moved:.3e})");
    assert!(e <= 1e-5, "{e}");
    assert!(moved > 1e-2, "{moved}");
    assert_eq!(
        plain.to_vec3::<f32>().unwrap(),
        again.to_vec3::<f32>().unwrap()
    );

    let mut refused = async |loras, model: &str| {
        denoise(&mut server.client, req(model, loras))
            .await
            .unwrap_err()
    };
    let unknown = refused(
        vec![pb::LoraAdapter {
            name: "anime".into(),
            scale: None,
        }],
        "",
    )
    .await;
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(
        unknown.message().contains("loras[0].name") && unknown.message().contains("style"),
        "{}",
        unknown.message()
    );
    let other_model = refused(vec![style(None)], "merged").await;
    assert!(
        other_model.message().contains("loras[0].name"),
        "{}",
        other_model.message()
    );
    let scale = refused(vec![style(Some(f32::INFINITY))], "").await;
    assert_eq!(scale.code(), tonic::Code::InvalidArgument);
    assert!(
        scale.message().contains("loras[0].scale"),
        "{}",
        scale.message()
    );

    cfg.adapters[0].path = "/nonexistent/style.safetensors".into();
    let err = startup_error(cfg).await;
    assert!(err.contains("/nonexistent/style.safetensors"), "{err}");
}

/// Another model's adapter on a model other than the default (the 4B fixture's adapter on the
/// 9B-shaped "9b"): the start succeeds (only the default model is built then); a request for
/// "9b" builds it, and fails with INTERNAL naming the adapter's file; the default model goes on
/// serving.
#[tokio::test]
async fn another_models_adapter_fails_its_models_first_load_naming_the_file() {
    let lora = klein_test_support::fixtures_dir()
        .join("loras/tiny-klein-4b-diffusers/pytorch_lora_weights.safetensors");
    let mut cfg = two_models(0);
    cfg.models.last_mut().expect("the 9b entry").adapters = vec![denoiser_svc::lora::AdapterSpec {
        name: "style".into(),
        path: lora.clone(),
    }];
    let mut server = start_with(cfg).await;
    let err = denoise(&mut server.client, for_9b()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    assert!(
        err.message().contains(&lora.display().to_string()),
        "{}",
        err.message()
    );
    denoise(&mut server.client, valid()).await.unwrap();
}
