//! `klein.v1.VaeService` over gRPC: thin handlers (count, validate, run, convert).

use std::{future::Future, sync::Arc, time::Instant};

use klein_proto::{
    MAX_MESSAGE_BYTES,
    pb::{self, vae_service_server::VaeServiceServer},
    tensor,
};
use tonic::{Request, Response, Status, service::Routes};

use crate::{
    error::VaeError,
    service::{Decoded, Encoded, Vae},
    tiling::TilePlan,
    validate::{ValidDecodeRequest, ValidEncodeRequest},
};

/// Full gRPC name of the service (health and reflection).
pub const SERVICE_NAME: &str = "klein.v1.VaeService";

/// The routes of the VAE service, with the 64 MiB message limits.
pub fn routes(vae: Arc<Vae>) -> Routes {
    Routes::new(
        VaeServiceServer::new(GrpcVae { vae })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

struct GrpcVae {
    vae: Arc<Vae>,
}

/// Counts, times and maps the outcome of one RPC.
async fn observe<T>(
    rpc: &'static str,
    work: impl Future<Output = Result<T, VaeError>>,
) -> Result<Response<T>, Status> {
    metrics::counter!("klein_vae_requests_total", "rpc" => rpc).increment(1);
    let started = Instant::now();
    let result = work.await;
    metrics::histogram!("klein_vae_request_seconds", "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
    result.map(Response::new).map_err(|err| {
        metrics::counter!("klein_vae_request_errors_total", "rpc" => rpc, "error" => err.error_type()).increment(1);
        tracing::info!(rpc, error = %err, "request failed");
        Status::from(err)
    })
}

impl From<TilePlan> for pb::TilePlan {
    fn from(p: TilePlan) -> Self {
        let narrow = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Self {
            tiled: p.tiled,
            tile_tokens: narrow(p.tile_tokens.0),
            tile_width_tokens: narrow(p.tile_tokens.1),
            overlap_tokens: narrow(p.overlap_tokens),
            tile_count: narrow(p.tile_count),
        }
    }
}

fn grid(h: usize, w: usize) -> pb::LatentGrid {
    pb::LatentGrid {
        height: h as u32,
        width: w as u32,
    }
}

impl TryFrom<Encoded> for pb::VaeServiceEncodeResponse {
    type Error = VaeError;

    fn try_from(out: Encoded) -> Result<Self, VaeError> {
        Ok(Self {
            latents: Some(tensor::encode(&out.latents)?),
            grid: Some(grid(out.grid.0, out.grid.1)),
        })
    }
}

impl TryFrom<Decoded> for pb::DecodeResponse {
    type Error = VaeError;

    fn try_from(out: Decoded) -> Result<Self, VaeError> {
        Ok(Self {
            images: Some(tensor::encode(&out.images)?),
            tile_plan: Some(out.plan.into()),
        })
    }
}

#[tonic::async_trait]
impl pb::vae_service_server::VaeService for GrpcVae {
    async fn encode(
        &self,
        request: Request<pb::VaeServiceEncodeRequest>,
    ) -> Result<Response<pb::VaeServiceEncodeResponse>, Status> {
        observe("encode", async {
            let req = ValidEncodeRequest::try_from(request.into_inner())?;
            self.vae.encode(req).await?.try_into()
        })
        .await
    }

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        observe("decode", async {
            let req = ValidDecodeRequest::try_from(request.into_inner())?;
            self.vae.decode(req).await?.try_into()
        })
        .await
    }

    async fn info(
        &self,
        _: Request<pb::VaeServiceInfoRequest>,
    ) -> Result<Response<pb::VaeServiceInfoResponse>, Status> {
        observe("info", async {
            Ok(pb::VaeServiceInfoResponse {
                info: Some(self.vae.info()),
            })
        })
        .await
    }
}
