//! Service startup: device, checkpoint, budget, engine, warm-up, then serving until shutdown.

use std::{collections::HashMap, future::Future, sync::Arc};

use candle_core::{DType, Tensor};
use klein_proto::{
    MAX_MESSAGE_BYTES, pb, pb::denoiser_service_server::DenoiserServiceServer, tensor,
};
use klein_runtime::{budget::MemoryBudget, gpu_memory, server::GrpcServer, telemetry};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::{
    config::Config,
    engine::{DenoiseEngine, Loaded},
    error::DenoiseError,
    grpc::{Denoiser, DenoiserGrpc},
    model::{AttentionConfig, grid_ids, text_ids},
    validate::{MAX_STEPS, RequestContext, TEXT_TOKENS},
    weights::{Checkpoint, Format},
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

/// Everything before serving: checks, budget, engine (model loaded and warmed up).
pub fn start(config: &Config) -> Result<Denoiser, DenoiseError> {
    let model_dir = config
        .model_dir
        .as_deref()
        .ok_or_else(|| DenoiseError::Config("model_dir (--model-dir) is required".into()))?;
    let dtype = DType::from(config.server.dtype);
    if dtype == DType::F16 {
        return Err(DenoiseError::Config(
            "dtype f16 is not supported (activations overflow); use bf16 or f32".into(),
        ));
    }
    let device = config.server.device.open()?;
    let checkpoint = Checkpoint::locate(model_dir)?;
    let is_distilled = config
        .is_distilled
        .or(checkpoint.is_distilled)
        .ok_or_else(|| {
            DenoiseError::Config(format!(
                "{}: no model_index.json says whether the model is distilled; set is_distilled",
                model_dir.display()
            ))
        })?;
    let weight_bytes = checkpoint.weight_bytes(dtype);
    let budget_bytes = config.server.gpu_memory_budget.0;
    let fixed = weight_bytes + config.runtime_overhead.0;
    if fixed > budget_bytes {
        return Err(DenoiseError::Config(format!(
            "gpu_memory_budget {budget_bytes} bytes is smaller than the weights ({weight_bytes} bytes in {dtype:?}) \
             plus the runtime overhead ({} bytes)",
            config.runtime_overhead.0
        )));
    }
    let budget = MemoryBudget::new(
        "denoiser",
        budget_bytes - fixed,
        config.server.max_queue_depth,
    );
    let attention = AttentionConfig {
        max_score_bytes: config.attention_chunk_bytes.0 as usize,
    };
    let model_cfg = checkpoint.config.clone();
    let model_id = config
        .model_id
        .clone()
        .unwrap_or_else(|| checkpoint.model_id.clone());
    let engine_name = format!("denoiser-{}", config.server.device).replace(':', "-");
    let load = checkpoint.clone();
    let fit = budget.clone();
    let engine = DenoiseEngine::spawn(&engine_name, move || {
        let model = load.load(dtype, &device, attention)?;
        warm_up(&model, &device, dtype)?;
        // cuBLAS is loaded now: what is free is what activations really have.
        gpu_memory::fit_budget(&fit, &device, gpu_memory::FIT_MARGIN_BYTES);
        Ok(Loaded {
            model,
            device,
            dtype,
        })
    })?;
    tracing::info!(%model_id, ?dtype, weight_bytes, is_distilled, "denoiser ready");

    let c = &model_cfg;
    let details: HashMap<String, String> = [
        ("hidden_size", c.hidden_size().to_string()),
        ("num_layers", c.num_layers.to_string()),
        ("num_single_layers", c.num_single_layers.to_string()),
        ("num_attention_heads", c.num_attention_heads.to_string()),
        ("joint_attention_dim", c.joint_attention_dim.to_string()),
        ("is_distilled", is_distilled.to_string()),
        (
            "checkpoint_format",
            if checkpoint.format == Format::Bfl {
                "bfl"
            } else {
                "diffusers"
            }
            .into(),
        ),
        ("max_steps", MAX_STEPS.to_string()),
        ("text_tokens", TEXT_TOKENS.to_string()),
        ("max_references", config.max_references.to_string()),
        (
            "attention_chunk_bytes",
            attention.max_score_bytes.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let info = pb::ServiceInfo {
        service: "denoiser".into(),
        model_id: model_id.clone(),
        dtype: tensor::dtype_to_wire(dtype)
            .map(|d| d as i32)
            .unwrap_or_default(),
        device: config.server.device.to_string(),
        quantization: "none".into(),
        memory_budget_bytes: budget_bytes,
        weight_bytes,
        max_batch: config.max_batch,
        max_image_side: config.max_image_side,
        max_image_pixels: config.max_image_pixels,
        details,
        ..Default::default()
    };
    let context = RequestContext {
        model_id,
        is_distilled,
        context_dim: c.joint_attention_dim,
        channels: c.in_channels,
        max_batch: config.max_batch as usize,
        max_image_side: config.max_image_side as usize,
        max_image_pixels: config.max_image_pixels,
        max_references: config.max_references as usize,
    };
    Ok(Denoiser {
        engine,
        budget,
        context,
        model: model_cfg,
        dtype,
        attention,
        info,
    })
}

/// One forward over a one-token image, so the first request does not pay for lazy
/// initialisation (kernels, allocator pools).
fn warm_up(
    model: &crate::model::Flux2Transformer2DModel,
    device: &candle_core::Device,
    dtype: DType,
) -> Result<(), DenoiseError> {
    let cfg = model.config();
    let x = Tensor::zeros((1, 1, cfg.in_channels), dtype, device)?;
    let ctx = Tensor::zeros((1, TEXT_TOKENS, cfg.joint_attention_dim), dtype, device)?;
    let mut ids = text_ids(TEXT_TOKENS);
    ids.extend(grid_ids(0, 1, 1));
    let rope = model.rope(&ids, device)?;
    model.forward(&x, &ctx, &[1000.0], &rope)?;
    Ok(())
}
