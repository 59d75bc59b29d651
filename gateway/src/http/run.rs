//! Driving the shared `ImageApi` from HTTP: a request becomes a `tonic::Request` (deadline and
//! trace context from the headers) and its event stream is consumed here, so validation,
//! admission, deadlines and the pipeline are the gRPC code path itself.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::http::HeaderMap;
use base64::{Engine as _, engine::general_purpose::STANDARD};
use klein_proto::pb::{self, generate_response::Event, image_service_server::ImageService};
use serde::Serialize;
use tokio_stream::StreamExt;
use tonic::{Code, Request, metadata::MetadataValue};

use super::error::{ApiError, Kind};
use crate::grpc::{ImageApi, grpc_timeout};

/// The event stream of one Generate call.
pub type Events = <ImageApi as ImageService>::GenerateStream;

/// Header carrying the request deadline in seconds (e.g. `30` or `0.5`).
pub const TIMEOUT_HEADER: &str = "x-request-timeout";

/// The gRPC request for `generate`, with `X-Request-Timeout` as its `grpc-timeout` and the
/// caller's `traceparent` passed on.
pub fn grpc_request(
    generate: pb::GenerateRequest,
    headers: &HeaderMap,
) -> Result<Request<pb::GenerateRequest>, ApiError> {
    let mut req = Request::new(generate);
    if let Some(v) = headers.get(TIMEOUT_HEADER) {
        let bad = || {
            ApiError::invalid(
                TIMEOUT_HEADER,
                format!("{TIMEOUT_HEADER}: expected seconds > 0, got {v:?}"),
            )
        };
        let secs: f64 = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|s: &f64| s.is_finite() && *s > 0.0)
            .ok_or_else(bad)?;
        // grpc-timeout takes at most 8 digits: milliseconds cover 27 hours.
        let millis = (secs * 1000.0).ceil().clamp(1.0, 99_999_999.0) as u64;
        let value = MetadataValue::try_from(format!("{millis}m")).map_err(|_| bad())?;
        req.metadata_mut().insert("grpc-timeout", value);
    }
    if let Some(value) = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| MetadataValue::try_from(v).ok())
    {
        req.metadata_mut().insert("traceparent", value);
    }
    Ok(req)
}

/// Runs `req` through the API up to admission; the stream carries the rest. The wait for
/// admission ends at the request's deadline (its `grpc-timeout`, else `default_timeout`),
/// as tonic's server enforces it for gRPC callers.
pub async fn start(
    api: Arc<ImageApi>,
    req: Request<pb::GenerateRequest>,
    default_timeout: Duration,
) -> Result<Events, ApiError> {
    let timeout = grpc_timeout(req.metadata()).unwrap_or(default_timeout);
    let admitted = tokio::time::timeout(timeout, api.generate(req))
        .await
        .map_err(|_| {
            ApiError::new(
                Kind::Grpc(Code::DeadlineExceeded),
                "deadline exceeded while waiting in the queue",
            )
        })?;
    Ok(admitted?.into_inner())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Stage timings in seconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimingsJson {
    pub queue: f64,
    pub encode: f64,
    pub denoise: f64,
    pub decode: f64,
    pub total: f64,
}

impl From<&pb::Timings> for TimingsJson {
    fn from(t: &pb::Timings) -> Self {
        Self {
            queue: t.queue_seconds,
            encode: t.encode_seconds,
            denoise: t.denoise_seconds,
            decode: t.decode_seconds,
            total: t.total_seconds,
        }
    }
}

/// One image of a response (OpenAI's `data[]` item plus extensions).
#[derive(Debug, Clone, Serialize)]
pub struct ImageData {
    pub b64_json: String,
    pub index: u32,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
}

impl From<&pb::Image> for ImageData {
    fn from(img: &pb::Image) -> Self {
        Self {
            b64_json: STANDARD.encode(&img.png),
            index: img.index,
            seed: img.seed,
            width: img.width,
            height: img.height,
        }
    }
}

/// The response of the image endpoints (OpenAI's `ImagesResponse` plus extensions).
#[derive(Debug, Clone, Serialize)]
pub struct ImagesResponse {
    pub created: u64,
    pub data: Vec<ImageData>,
    pub output_format: &'static str,
    pub size: String,
    pub request_id: String,
    pub seed: u64,
    pub timings: Option<TimingsJson>,
    pub warnings: Vec<String>,
}

impl ImagesResponse {
    /// The response for a finished request.
    pub fn new(accepted: Option<&pb::Accepted>, images: &[pb::Image]) -> Self {
        let first = images.first();
        Self {
            created: unix_now(),
            data: images.iter().map(ImageData::from).collect(),
            output_format: "png",
            size: first
                .map(|i| format!("{}x{}", i.width, i.height))
                .unwrap_or_default(),
            request_id: accepted.map(|a| a.request_id.clone()).unwrap_or_default(),
            seed: accepted.map(|a| a.seed).unwrap_or_default(),
            timings: first
                .and_then(|i| i.timings.as_ref())
                .map(TimingsJson::from),
            warnings: first.map(|i| i.warnings.clone()).unwrap_or_default(),
        }
    }
}

/// Consumes `events` to the end: every image, or the first error.
pub async fn collect(mut events: Events) -> Result<ImagesResponse, ApiError> {
    let mut accepted = None;
    let mut images = Vec::new();
    while let Some(msg) = events.next().await {
        match msg?.event {
            Some(Event::Accepted(a)) => accepted = Some(a),
            Some(Event::Image(i)) => images.push(i),
            Some(Event::Stage(_) | Event::Step(_)) | None => {}
        }
    }
    Ok(ImagesResponse::new(accepted.as_ref(), &images))
}

/// Lowercase name of a pipeline stage.
pub fn stage_name(stage: i32) -> &'static str {
    match pb::Stage::try_from(stage) {
        Ok(pb::Stage::Encoding) => "encoding",
        Ok(pb::Stage::Denoising) => "denoising",
        Ok(pb::Stage::Decoding) => "decoding",
        _ => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_header_becomes_grpc_timeout() {
        let mut h = HeaderMap::new();
        h.insert(TIMEOUT_HEADER, "0.25".parse().unwrap());
        h.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let r = grpc_request(pb::GenerateRequest::default(), &h).unwrap();
        assert_eq!(r.metadata().get("grpc-timeout").unwrap(), "250m");
        assert!(r.metadata().get("traceparent").is_some());
        h.insert(TIMEOUT_HEADER, "-1".parse().unwrap());
        let e = grpc_request(pb::GenerateRequest::default(), &h).unwrap_err();
        assert_eq!(e.status().as_u16(), 400);
    }
}
