//! `klein.v1.TextEncoderService` handlers: count, validate, run on the service, convert.

use std::sync::Arc;

use klein_proto::{
    MAX_MESSAGE_BYTES, pb,
    pb::text_encoder_service_server::{TextEncoderService, TextEncoderServiceServer},
};
use tonic::{Request, Response, Status};

use crate::{error::EncoderError, request::ValidEncodeRequest, service::EncoderService};

/// The gRPC face of an [`EncoderService`].
pub struct TextEncoderGrpc {
    service: Arc<EncoderService>,
}

impl TextEncoderGrpc {
    /// The tonic service with the 64 MiB message limits applied.
    pub fn server(service: Arc<EncoderService>) -> TextEncoderServiceServer<Self> {
        TextEncoderServiceServer::new(Self { service })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn counted(rpc: &'static str, err: EncoderError) -> Status {
    metrics::counter!("klein_encoder_errors_total", "rpc" => rpc, "type" => err.error_type())
        .increment(1);
    err.into()
}

#[tonic::async_trait]
impl TextEncoderService for TextEncoderGrpc {
    async fn encode(
        &self,
        request: Request<pb::TextEncoderServiceEncodeRequest>,
    ) -> Result<Response<pb::TextEncoderServiceEncodeResponse>, Status> {
        metrics::counter!("klein_encoder_requests_total", "rpc" => "encode").increment(1);
        let valid = ValidEncodeRequest::validate(request.into_inner(), self.service.limits())
            .map_err(|e| counted("encode", e))?;
        let response = self
            .service
            .encode(valid)
            .await
            .map_err(|e| counted("encode", e))?;
        Ok(Response::new(response))
    }

    async fn info(
        &self,
        _: Request<pb::TextEncoderServiceInfoRequest>,
    ) -> Result<Response<pb::TextEncoderServiceInfoResponse>, Status> {
        metrics::counter!("klein_encoder_requests_total", "rpc" => "info").increment(1);
        Ok(Response::new(pb::TextEncoderServiceInfoResponse {
            info: Some(self.service.info()),
        }))
    }
}
