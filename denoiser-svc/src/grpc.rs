//! `klein.v1.DenoiserService`: thin handlers over validation, admission and the engine.

use std::{pin::Pin, sync::Arc, time::Instant};

use candle_core::DType;
use klein_proto::{
    pb::{self, denoise_response::Event as PbEvent, denoiser_service_server::DenoiserService},
    tensor,
};
use klein_runtime::{budget::MemoryBudget, models::RegistryStatus};
use tokio_stream::{Stream, StreamExt, wrappers::UnboundedReceiverStream};
use tonic::{Request, Response, Status, codegen::Bytes};

use crate::{
    admission,
    embeddings::EmbeddingsCache,
    engine::{DenoiseEngine, Event, Job},
    error::DenoiseError,
    model::AttentionConfig,
    served::ServedModel,
    validate::{self, ValidDenoiseRequest},
};

/// The service state shared by every call.
pub struct Denoiser {
    pub engine: DenoiseEngine,
    pub budget: MemoryBudget,
    /// Every configured model, the default first.
    pub models: Vec<ServedModel>,
    /// Which models are resident (the registry lives on the engine thread).
    pub status: RegistryStatus,
    pub dtype: DType,
    pub device: candle_core::Device,
    pub attention: AttentionConfig,
    /// The static part of Info; reservations, queue and models are filled per call.
    pub info: pb::ServiceInfo,
    /// Validated embeddings kept under handles for repeated prompts.
    pub embeddings: EmbeddingsCache,
}

/// The gRPC face of [`Denoiser`].
#[derive(Clone)]
pub struct DenoiserGrpc(pub Arc<Denoiser>);

type DenoiseStream = Pin<Box<dyn Stream<Item = Result<pb::DenoiseResponse, Status>> + Send>>;

impl Denoiser {
    /// The model a request names (empty = the default), or INVALID_ARGUMENT listing them.
    pub fn model(&self, id: &str) -> Result<&ServedModel, DenoiseError> {
        if id.is_empty() {
            return Ok(&self.models[0]);
        }
        self.models
            .iter()
            .find(|m| m.context.model_id == id)
            .ok_or_else(|| {
                let ids: Vec<&str> = self
                    .models
                    .iter()
                    .map(|m| m.context.model_id.as_str())
                    .collect();
                DenoiseError::invalid(
                    "model",
                    format!(
                        "unknown model {id:?}; this service serves: {}",
                        ids.join(", ")
                    ),
                )
            })
    }

    /// Info with live reservations, queue and model residency.
    pub fn info(&self) -> pb::ServiceInfo {
        let snapshot = self.budget.snapshot();
        let status = self.status.models();
        pb::ServiceInfo {
            reserved_bytes: snapshot.reserved,
            queue_depth: snapshot.queued as u32,
            max_queue_depth: snapshot.max_queue as u32,
            models: self
                .models
                .iter()
                .map(|m| m.info(status.iter().find(|s| s.id == m.context.model_id)))
                .collect(),
            ..self.info.clone()
        }
    }

    async fn denoise(&self, req: pb::DenoiseRequest) -> Result<DenoiseStream, DenoiseError> {
        let received = Instant::now();
        let model = self.model(&req.model)?;
        // A handle alone names embeddings an earlier request left (checked then); embeddings
        // sent with the request are checked and, once the whole request is valid, kept under a
        // new handle.
        let by_handle = req.prompt_embeds.is_none() && !req.embeddings_handle.is_empty();
        let (embeddings, mut handle) = if by_handle {
            let kept = self.embeddings.get(&req.embeddings_handle)?;
            (kept, req.embeddings_handle.clone())
        } else {
            (validate::embeddings(&req, &model.context)?, Bytes::new())
        };
        let valid = ValidDenoiseRequest::try_from((req, &model.context, embeddings.clone()))?;
        if !by_handle && let Some(h) = self.embeddings.keep(&embeddings) {
            handle = Bytes::copy_from_slice(&h);
        }
        let validate_seconds = received.elapsed().as_secs_f64();
        let lora_bytes = admission::lora_bytes(
            &model.config,
            self.dtype,
            valid.batch(),
            valid.sequence_len(),
            valid.loras.len(),
        );
        let bytes = lora_bytes
            + admission::activation_bytes(
                &model.config,
                self.dtype,
                valid.batch(),
                valid.sequence_len(),
                &self.attention,
                klein_kernels::flash_attention_applies(
                    &self.device,
                    self.dtype,
                    model.config.attention_head_dim,
                ),
            );
        let queued = Instant::now();
        let reservation = self.budget.reserve(bytes).await?;
        let queue_seconds = queued.elapsed().as_secs_f64();
        metrics::histogram!("klein_denoiser_queue_seconds").record(queue_seconds);
        tracing::info!(
            height = valid.grid.height,
            width = valid.grid.width,
            batch = valid.batch(),
            validate_seconds,
            queue_seconds,
            "denoise accepted"
        );
        let warnings = valid.warnings.clone();
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        self.engine.submit(Job {
            request: valid,
            events,
            reservation,
        })?;
        let stream = UnboundedReceiverStream::new(rx)
            .map(move |event| response(event, &warnings, queue_seconds, &handle));
        Ok(Box::pin(stream))
    }
}

/// One engine event as a stream item.
fn response(
    event: Event,
    warnings: &[String],
    queue_seconds: f64,
    embeddings_handle: &Bytes,
) -> Result<pb::DenoiseResponse, Status> {
    let encode =
        |t: &candle_core::Tensor| tensor::encode(t).map_err(|e| Status::internal(e.to_string()));
    let event = match event {
        Event::Progress {
            step,
            total,
            sigma,
            preview,
        } => PbEvent::Progress(pb::DenoiseProgress {
            step: step as u32,
            total_steps: total as u32,
            sigma,
            preview: preview.as_ref().map(encode).transpose()?,
        }),
        Event::Finished {
            latents,
            compute_seconds,
        } => {
            metrics::counter!("klein_denoiser_results_total", "outcome" => "ok").increment(1);
            PbEvent::Result(pb::DenoiseResult {
                latents: Some(encode(&latents)?),
                warnings: warnings.to_vec(),
                queue_seconds,
                compute_seconds,
                embeddings_handle: embeddings_handle.clone(),
            })
        }
        Event::Failed(e) => {
            metrics::counter!("klein_denoiser_results_total", "outcome" => e.kind()).increment(1);
            return Err(e.into());
        }
    };
    Ok(pb::DenoiseResponse { event: Some(event) })
}

#[tonic::async_trait]
impl DenoiserService for DenoiserGrpc {
    type DenoiseStream = DenoiseStream;

    async fn denoise(
        &self,
        request: Request<pb::DenoiseRequest>,
    ) -> Result<Response<Self::DenoiseStream>, Status> {
        metrics::counter!("klein_denoiser_requests_total").increment(1);
        match self.0.denoise(request.into_inner()).await {
            Ok(stream) => Ok(Response::new(stream)),
            Err(e) => {
                metrics::counter!("klein_denoiser_results_total", "outcome" => e.kind())
                    .increment(1);
                Err(e.into())
            }
        }
    }

    async fn info(
        &self,
        _: Request<pb::DenoiserServiceInfoRequest>,
    ) -> Result<Response<pb::DenoiserServiceInfoResponse>, Status> {
        Ok(Response::new(pb::DenoiserServiceInfoResponse {
            info: Some(self.0.info()),
        }))
    }
}
