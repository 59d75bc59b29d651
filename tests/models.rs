//! Two klein models of different shapes served by one stack (issue 12): the tiny 4B-shaped and
//! 9B-shaped pipelines, each service's host-RAM cap fitting only one of them. Requests
//! alternate between the models; each one must make its model resident again (evicting the
//! other: least recently used), the images must still equal each model's diffusers golden, and
//! the loads and evictions must show in Info and in the Prometheus metrics. A request naming
//! an unknown model is refused with INVALID_ARGUMENT listing the models.

mod common;

use candle_core::DType;
use common::{client, generate, golden_t2i_request, max_pixel_diff, pixels, start_with};
use gateway::stack::StackOptions;
use klein_proto::pb;
use klein_runtime::{
    bytesize::ByteSize,
    device::{DTypeSpec, DeviceSpec},
    telemetry,
};
use klein_test_support::{golden, pipeline_dir, take};

const SMALL: &str = "tiny-klein-4b";
const LARGE: &str = "tiny-klein-9b";

/// f32 weight bytes of each pipeline's (text encoder, transformer).
fn weight_bytes(name: &str) -> (u64, u64) {
    let dir = pipeline_dir(name);
    let spec = encoder_svc::engine::ModelSpec {
        model_dir: dir.clone(),
        gguf: None,
        dtype: DType::F32,
        quantize: None,
    };
    let encoder = encoder_svc::engine::weight_bytes(&spec.config().unwrap(), DType::F32, None);
    let transformer = denoiser_svc::weights::Checkpoint::locate(&dir)
        .unwrap()
        .weight_bytes(DType::F32);
    (encoder, transformer)
}

/// (loads, evictions) of `model` in a service's Info.
fn counts(info: &pb::ServiceInfo, model: &str) -> (u64, u64) {
    let m = info.models.iter().find(|m| m.id == model).unwrap();
    (m.loads, m.evictions)
}

/// The value of a Prometheus counter line with these labels.
fn counter(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_models_evict_and_reload_under_the_ram_cap() {
    let metrics = telemetry::metrics_handle();
    let device: DeviceSpec = klein_test_support::test_device_name().parse().unwrap();
    let (enc_small, tr_small) = weight_bytes(SMALL);
    let (enc_large, tr_large) = weight_bytes(LARGE);
    assert!(enc_large > enc_small && tr_large > tr_small);
    // Each cap holds the larger model alone: never both at once.
    let mut opts = StackOptions::new(&pipeline_dir(SMALL), device, ([127, 0, 0, 1], 0).into())
        .add_model(LARGE, &pipeline_dir(LARGE))
        .host_memory_caps(ByteSize(enc_large), ByteSize(tr_large));
    opts.encoder.server.dtype = DTypeSpec::F32;
    opts.denoiser.server.dtype = DTypeSpec::F32;
    // No prompt cache and no embeddings handles: every request must run its encoder model.
    opts.encoder.cache_bytes = ByteSize(0);
    opts.denoiser.embeddings_cache_bytes = ByteSize(0);
    // On the CPU the models live in host RAM: lift the device-weight caps (by default the
    // largest model) so that the host-RAM governor is what evicts. On a GPU the host cap only
    // bounds the host copies, and the default device cap evicts.
    if device == DeviceSpec::Cpu {
        opts.encoder.residency.device_weight_cap = Some(ByteSize(enc_small + enc_large));
        opts.denoiser.residency.device_weight_cap = Some(ByteSize(tr_small + tr_large));
    }
    let running = start_with(opts).await;
    let mut c = client(&running).await;

    let caps = c
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<(&str, bool, u32)> = caps
        .models
        .iter()
        .map(|m| (m.id.as_str(), m.distilled, m.default_steps))
        .collect();
    assert_eq!(listed, [(SMALL, true, 4), (LARGE, true, 4)]);

    for (round, (model, case)) in [
        (SMALL, "t2i"),
        (LARGE, "t2i_9b"),
        (SMALL, "t2i"),
        (LARGE, "t2i_9b"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = generate(&mut c, golden_t2i_request(model, case))
            .await
            .unwrap();
        let diff = max_pixel_diff(
            &pixels(&out.images[0].png),
            take(&golden(case), "image_uint8.f32"),
        );
        eprintln!("round {round}: {model} max pixel diff vs its diffusers f32 golden = {diff}");
        assert!(
            diff <= 1.0,
            "round {round} ({model}): max pixel diff {diff} > 1"
        );
    }

    let services = c
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services;
    for service in ["encoder", "denoiser"] {
        let info = services.iter().find(|s| s.service == service).unwrap();
        // Startup loads the small model (the default; the large one does not fit beside it);
        // each round then evicts the other model and loads its own.
        assert_eq!(
            counts(info, SMALL),
            (2, 2),
            "{service}: {SMALL} (loads, evictions)"
        );
        assert_eq!(
            counts(info, LARGE),
            (2, 1),
            "{service}: {LARGE} (loads, evictions)"
        );
        let resident: Vec<&str> = info
            .models
            .iter()
            .filter(|m| m.on_device)
            .map(|m| m.id.as_str())
            .collect();
        assert_eq!(
            resident,
            [LARGE],
            "{service}: only the last used model is resident"
        );
        let text = metrics.render();
        let svc = format!("service=\"{service}\"");
        for (model, loads, evictions) in [(SMALL, 2.0, 2.0), (LARGE, 2.0, 1.0)] {
            let m = format!("model=\"{model}\"");
            let labels = [svc.as_str(), m.as_str(), "tier=\"device\""];
            assert_eq!(
                counter(&text, "klein_model_loads_total", &labels),
                loads,
                "{service} {model}"
            );
            assert_eq!(
                counter(&text, "klein_model_evictions_total", &labels),
                evictions,
                "{service} {model}"
            );
        }
    }

    let err = generate(&mut c, golden_t2i_request("klein-13b", "t2i"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    for name in ["model", "klein-13b", SMALL, LARGE] {
        assert!(
            err.message().contains(name),
            "{name} missing in {:?}",
            err.message()
        );
    }
}
