//! The public `ImageService`: thin handlers over validation, admission and the pipeline.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use klein_proto::pb::{self, image_service_server::ImageService};
use klein_runtime::budget::{BudgetSnapshot, MemoryBudget};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    catalog::Catalog,
    clients::{Deadline, Stages, TraceContext},
    config::Config,
    pipeline,
    validate::validate,
};

/// The ImageService implementation.
pub struct ImageApi {
    stages: Stages,
    config: Arc<Config>,
    /// Request slots: capacity = max concurrent requests, queue = the server's queue depth.
    slots: MemoryBudget,
    catalog: Arc<RwLock<Catalog>>,
}

impl ImageApi {
    /// An API over `stages` with the given catalog.
    pub fn new(stages: Stages, config: Arc<Config>, catalog: Arc<RwLock<Catalog>>) -> Self {
        let slots = MemoryBudget::new(
            "gateway_requests",
            config.max_concurrent_requests,
            config.server.max_queue_depth,
        );
        Self {
            stages,
            config,
            slots,
            catalog,
        }
    }

    /// The request admission queue right now (the HTTP jobs' queue positions).
    pub fn admission(&self) -> BudgetSnapshot {
        self.slots.snapshot()
    }
}

/// Parses a `grpc-timeout` header ("<digits><unit>", unit one of H M S m u n).
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn trace_context(metadata: &MetadataMap) -> TraceContext {
    let mut id = [0u8; 16];
    let _ = getrandom::fill(&mut id);
    let incoming = metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned);
    TraceContext {
        request_id: hex(&id[..8]),
        trace_id: incoming.unwrap_or_else(|| hex(&id)),
    }
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    type GenerateStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let received = Instant::now();
        let timeout = grpc_timeout(request.metadata())
            .unwrap_or(Duration::from_secs(self.config.default_timeout_secs));
        let deadline = Deadline::after(timeout);
        let trace = trace_context(request.metadata());
        let models = self
            .catalog
            .read()
            .map(|c| c.models.clone())
            .unwrap_or_default();
        if models.is_empty() {
            metrics::counter!("klein_gateway_requests_total", "outcome" => "unavailable")
                .increment(1);
            return Err(Status::unavailable(
                "no model is being served yet: the denoiser has not answered",
            ));
        }
        let valid = validate(request.into_inner(), &self.config.limits, &models).map_err(|e| {
            metrics::counter!("klein_gateway_requests_total", "outcome" => e.error_type())
                .increment(1);
            Status::from(e)
        })?;
        let slot = self.slots.reserve(1).await.map_err(|e| {
            metrics::counter!("klein_gateway_requests_total", "outcome" => "overloaded")
                .increment(1);
            Status::from(e)
        })?;
        let queue_seconds = received.elapsed().as_secs_f64();
        let (tx, rx) = mpsc::channel(16);
        let stages = self.stages.clone();
        tracing::info!(request_id = %trace.request_id, trace_id = %trace.trace_id, width = valid.width, height = valid.height, steps = valid.steps, "generate accepted");
        tokio::spawn(async move {
            let _slot = slot;
            let work = pipeline::run(&stages, valid, &trace, deadline, queue_seconds, &tx);
            let outcome = tokio::select! {
                res = work => match res {
                    Ok(()) => "ok",
                    Err(e) => {
                        let label = e.error_type();
                        tracing::warn!(request_id = %trace.request_id, error = %e, "generate failed");
                        let _ = tx.send(Err(Status::from(e))).await;
                        label
                    }
                },
                () = tx.closed() => {
                    tracing::info!(request_id = %trace.request_id, "client went away; downstream calls cancelled");
                    "cancelled"
                }
                // A streamed response outlives tonic's own grpc-timeout (it bounds only the
                // handler): end it here, which also drops and so cancels the downstream calls.
                () = tokio::time::sleep_until(deadline.instant().into()) => {
                    tracing::warn!(request_id = %trace.request_id, "deadline passed; downstream calls cancelled");
                    let _ = tx.send(Err(Status::deadline_exceeded("the request deadline passed"))).await;
                    "deadline"
                }
            };
            metrics::counter!("klein_gateway_requests_total", "outcome" => outcome).increment(1);
            metrics::histogram!("klein_gateway_request_seconds")
                .record(received.elapsed().as_secs_f64());
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_capabilities(
        &self,
        _request: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::GetCapabilitiesResponse>, Status> {
        let services = crate::catalog::gather_infos(&self.stages).await;
        let catalog = self.catalog.read().map(|c| c.clone()).unwrap_or_default();
        let l = &self.config.limits;
        Ok(Response::new(pb::GetCapabilitiesResponse {
            models: catalog
                .models
                .iter()
                .map(|m| pb::ModelCapabilities {
                    id: m.id.clone(),
                    distilled: m.distilled,
                    default_steps: m.default_steps,
                    default_guidance_scale: m.default_guidance,
                    variant: m.variant.clone(),
                    adapters: m.adapters.clone(),
                })
                .collect(),
            limits: Some(pb::Limits {
                min_image_side: l.min_image_side,
                max_image_side: l.max_image_side,
                max_image_pixels: l.max_image_pixels,
                max_steps: l.max_steps,
                max_num_images: l.max_num_images,
                max_reference_images: l.max_reference_images,
                max_input_image_bytes: l.max_input_image_bytes.0,
            }),
            features: crate::catalog::FEATURES
                .iter()
                .map(|f| f.to_string())
                .collect(),
            services,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let mut md = MetadataMap::new();
        for (v, want) in [
            ("5S", Some(Duration::from_secs(5))),
            ("250m", Some(Duration::from_millis(250))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("7n", Some(Duration::from_nanos(7))),
            ("5x", None),
            ("S", None),
        ] {
            md.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&md), want, "{v}");
        }
    }

    #[test]
    fn trace_ids_come_from_the_callers_traceparent() {
        let mut md = MetadataMap::new();
        md.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            trace_context(&md).trace_id,
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(trace_context(&MetadataMap::new()).trace_id.len(), 32);
    }
}
