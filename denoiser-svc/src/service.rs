//! Service startup: device, checkpoint, budget, engine, warm-up, then serving until shutdown.

use std::{future::Future, path::Path, sync::Arc};

use candle_core::DType;
use klein_kernels::quant::Quantize;
use klein_proto::{
    MAX_MESSAGE_BYTES, pb, pb::denoiser_service_server::DenoiserServiceServer, tensor,
};
use klein_runtime::{
    budget::MemoryBudget,
    gpu_memory,
    models::{Caps, ModelSource, Registry},
    server::GrpcServer,
    telemetry,
};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::{
    config::Config,
    embeddings::EmbeddingsCache,
    engine::{DenoiseEngine, Loaded},
    error::DenoiseError,
    grpc::{Denoiser, DenoiserGrpc},
    lora::NamedAdapters,
    model::AttentionConfig,
    served::ServedModel,
    validate::PIXELS_PER_TOKEN,
    warm_up::{Tuning, warm_up},
    weights::{Checkpoint, LoadError, TransformerSource},
};

/// gRPC name of the service (health, reflection).
pub const SERVICE_NAME: &str = "klein.v1.DenoiserService";

/// Opens the device, loads and warms up the model on the engine thread, and serves
/// `DenoiserService` on `listener` until `shutdown` resolves (then drains).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DenoiseError> {
    let denoiser = Arc::new(start(&config)?);
    let server = GrpcServer::from_config(&[SERVICE_NAME], &config.server)
        .await
        .map_err(|e| DenoiseError::Config(e.to_string()))?;
    server.health().set_serving().await;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(());
    if let Some(addr) = config.server.metrics_listen {
        let metrics = TcpListener::bind(addr).await?;
        tokio::spawn(telemetry::serve_metrics(metrics, async move {
            let _ = stop_rx.changed().await;
        }));
    }
    let routes = Routes::new(
        DenoiserServiceServer::new(DenoiserGrpc(denoiser))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(());
    };
    Ok(server.run(routes, listener, shutdown).await?)
}

/// Everything before serving: checks, budget, engine (models loaded and warmed up).
pub fn start(config: &Config) -> Result<Denoiser, DenoiseError> {
    if !config.warm_up_side.is_multiple_of(PIXELS_PER_TOKEN as u32) {
        return Err(DenoiseError::Config(
            "warm_up_side must be 0 or a multiple of 16 (pixels per latent token)".into(),
        ));
    }
    let entries = config.model_entries();
    if entries.is_empty() {
        return Err(DenoiseError::Config(
            "no model: set model_dir (--model-dir) or list models (--model ID=PATH)".into(),
        ));
    }
    let dtype = DType::from(config.server.dtype);
    if dtype == DType::F16 {
        return Err(DenoiseError::Config(
            "dtype f16 is not supported (activations overflow); use bf16 or f32".into(),
        ));
    }
    let device = config.server.device.open()?;
    // Only bf16 on a GPU runs the linear layers on cuBLASLt.
    let tune_side = match device {
        candle_core::Device::Cuda(_) if dtype == DType::BF16 => {
            config.warm_up_side.min(config.max_image_side) as usize
        }
        _ => 0,
    };
    let attention = AttentionConfig {
        max_score_bytes: config.attention_chunk_bytes.0 as usize,
    };
    let mut sources = Vec::with_capacity(entries.len());
    let mut served = Vec::with_capacity(entries.len());
    for entry in &entries {
        let checkpoint = Checkpoint::locate(&entry.path)?
            .with_quantize(config.quantize)
            .with_loras(&entry.lora)?;
        let model = ServedModel::new(entry, &checkpoint, dtype, config)?;
        let source = TransformerSource {
            checkpoint,
            dtype,
            attention,
            cuda_graphs: config.cuda_graphs,
            adapters: Arc::new(NamedAdapters::read(&entry.adapters).map_err(LoadError::from)?),
        };
        sources.push((model.context.model_id.clone(), source));
        served.push(model);
    }
    let largest = sources
        .iter()
        .map(|(_, s)| s.device_bytes())
        .max()
        .unwrap_or(0);
    let weight_cap = config.residency.device_weight_cap.map_or(largest, |b| b.0);
    let caps = Caps {
        device: weight_cap,
        host: config.residency.host_memory_cap.map_or(u64::MAX, |b| b.0),
    };
    let budget_bytes = config.server.gpu_memory_budget.0;
    let fixed = weight_cap + config.runtime_overhead.0;
    if fixed > budget_bytes {
        let hint = if config.quantize == Quantize::None {
            "; `--quantize q4k` keeps the block projections in 4.5 bits per weight"
        } else {
            ""
        };
        return Err(DenoiseError::Config(format!(
            "gpu_memory_budget {budget_bytes} bytes is smaller than the resident weights \
             ({weight_cap} bytes in {dtype:?}, quantize {}) plus the runtime overhead ({} \
             bytes){hint}",
            config.quantize, config.runtime_overhead.0
        )));
    }
    let budget = MemoryBudget::new(
        "denoiser",
        budget_bytes - fixed,
        config.server.max_queue_depth,
    );
    let models = Registry::new("denoiser", device.clone(), caps, sources)?;
    let status = models.status();
    let engine_name = format!("denoiser-{}", config.server.device).replace(':', "-");
    let service_device = device.clone();
    let fit = budget.clone();
    let model_wait = std::time::Duration::from_secs(config.model_wait_secs);
    let tuning_cache = config.tuning_cache_path().map(Path::to_path_buf);
    let engine = DenoiseEngine::spawn(&engine_name, move || {
        let mut models = models;
        models.preload()?;
        let mut tuning = Tuning::read(tune_side, tuning_cache);
        for id in models.status().models().iter().filter(|m| m.on_device) {
            if let Some(model) = models.get(&id.id) {
                warm_up(model, &device, dtype)?;
                tuning.tune(model, &device, dtype);
            }
        }
        tuning.write();
        // cuBLAS is loaded now: what is free is what activations really have.
        gpu_memory::fit_budget(&fit, &device, gpu_memory::FIT_MARGIN_BYTES);
        Ok(Loaded {
            models,
            device,
            dtype,
            model_wait,
        })
    })?;
    let default = &served[0];
    tracing::info!(
        models = served.len(),
        default = %default.context.model_id,
        ?dtype,
        weight_cap,
        "denoiser ready"
    );
    let info = pb::ServiceInfo {
        service: "denoiser".into(),
        model_id: default.context.model_id.clone(),
        dtype: tensor::dtype_to_wire(dtype)
            .map(|d| d as i32)
            .unwrap_or_default(),
        device: config.server.device.to_string(),
        quantization: "none".into(),
        memory_budget_bytes: budget_bytes,
        weight_bytes: default.info.weight_bytes,
        max_batch: config.max_batch,
        max_image_side: config.max_image_side,
        max_image_pixels: config.max_image_pixels,
        details: default.info.details.clone(),
        ..Default::default()
    };
    Ok(Denoiser {
        engine,
        budget,
        models: served,
        status,
        dtype,
        device: service_device,
        attention,
        info,
        embeddings: EmbeddingsCache::new(config.embeddings_cache_bytes.0),
    })
}
