//! Typed clients of the three stages: balanced over replica addresses, 64 MiB limits, the
//! remaining deadline and the trace context on every call, bounded retries with backoff for
//! idempotent calls on UNAVAILABLE. Downstream status codes are kept (see [`crate::error`]).

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use klein_proto::{
    MAX_MESSAGE_BYTES,
    pb::{
        denoiser_service_client::DenoiserServiceClient,
        text_encoder_service_client::TextEncoderServiceClient,
        vae_service_client::VaeServiceClient,
    },
};
use klein_runtime::server::{CONNECTION_WINDOW_BYTES, MAX_FRAME_BYTES, STREAM_WINDOW_BYTES};
use tonic::{
    Code, Request, Response, Status,
    metadata::MetadataValue,
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use crate::{
    embeddings::EmbeddingHandles,
    error::{GatewayError, Stage, connection_lost, downstream},
    routing::Router,
};

/// When a request must be finished.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    /// Time left, or `None` once passed.
    pub fn remaining(&self) -> Option<Duration> {
        self.0
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// The instant the deadline falls on.
    pub fn instant(&self) -> Instant {
        self.0
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        self.remaining().is_none()
    }
}

/// Identifies one request across services: `x-request-id` and a W3C `traceparent`.
#[derive(Debug, Clone)]
pub struct TraceContext {
    /// Gateway-assigned request id.
    pub request_id: String,
    /// 32 hex digits, from the caller's traceparent when it sent one.
    pub trace_id: String,
}

impl TraceContext {
    /// The `traceparent` of a downstream call (a fresh span id under our trace).
    fn traceparent(&self) -> String {
        let mut span = [0u8; 8];
        let _ = getrandom::fill(&mut span);
        let span: String = span.iter().map(|b| format!("{b:02x}")).collect();
        format!("00-{}-{span}-01", self.trace_id)
    }
}

/// A stage client error when an address is malformed.
#[derive(Debug, thiserror::Error)]
#[error("{stage} address {addr:?}: {reason}")]
pub struct AddressError {
    stage: &'static str,
    addr: String,
    reason: String,
}

/// A channel balanced over `addrs` (client-side, power of two choices over ready replicas;
/// replicas that fail their health probes are left out, see [`crate::replicas`]), over TLS
/// when `tls` is given.
pub fn balanced_channel(
    stage: Stage,
    addrs: &[String],
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel, AddressError> {
    Ok(crate::replicas::balance(
        stage,
        endpoints(stage, addrs, tls)?,
    ))
}

/// A [`Router`] over `addrs`: the balanced channel plus per-model subsets.
fn router(
    stage: Stage,
    addrs: &[String],
    tls: Option<&ClientTlsConfig>,
) -> Result<Router, AddressError> {
    let endpoints = endpoints(stage, addrs, tls)?;
    let all = crate::replicas::balance(stage, endpoints.clone());
    Ok(Router::new(stage, endpoints, all))
}

/// The endpoints of `addrs` with the stage-call settings (timeouts, windows, keep-alive, TLS).
fn endpoints(
    stage: Stage,
    addrs: &[String],
    tls: Option<&ClientTlsConfig>,
) -> Result<Vec<Endpoint>, AddressError> {
    let mut endpoints = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let bad = |e: tonic::transport::Error| AddressError {
            stage: stage.as_str(),
            addr: addr.clone(),
            reason: e.to_string(),
        };
        let mut endpoint = Endpoint::from_shared(addr.clone()).map_err(bad)?;
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(bad)?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(MAX_FRAME_BYTES)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        endpoints.push(endpoint);
    }
    if endpoints.is_empty() {
        return Err(AddressError {
            stage: stage.as_str(),
            addr: String::new(),
            reason: "no address configured".into(),
        });
    }
    Ok(endpoints)
}

/// Clients of the three stages.
#[derive(Clone)]
pub struct Stages {
    pub encoder: Arc<Router>,
    pub denoiser: Arc<Router>,
    pub vae: VaeServiceClient<Channel>,
    /// The denoisers' embeddings handles, per prompt.
    pub handles: Arc<EmbeddingHandles>,
    max_attempts: u32,
}

impl Stages {
    /// Clients over the given replica lists, over TLS when `tls` is given.
    pub fn new(
        encoder: &[String],
        denoiser: &[String],
        vae: &[String],
        max_attempts: u32,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, AddressError> {
        Ok(Self {
            encoder: Arc::new(router(Stage::Encoder, encoder, tls)?),
            denoiser: Arc::new(router(Stage::Denoiser, denoiser, tls)?),
            vae: VaeServiceClient::new(balanced_channel(Stage::Vae, vae, tls)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            handles: Arc::default(),
            max_attempts: max_attempts.max(1),
        })
    }

    /// Most attempts of an idempotent call.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// An encoder client reaching a replica that serves `model` (empty = any).
    pub fn encoder(&self, model: &str) -> TextEncoderServiceClient<Channel> {
        TextEncoderServiceClient::new(self.encoder.channel(model))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// A denoiser client reaching a replica that serves `model` (empty = any).
    pub fn denoiser(&self, model: &str) -> DenoiserServiceClient<Channel> {
        DenoiserServiceClient::new(self.denoiser.channel(model))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Wraps `msg` with the remaining deadline (`grpc-timeout`) and the trace context.
pub fn request<T>(
    msg: T,
    deadline: &Deadline,
    trace: &TraceContext,
    stage: Stage,
) -> Result<Request<T>, GatewayError> {
    let remaining = deadline
        .remaining()
        .ok_or(GatewayError::Deadline { stage })?;
    let mut req = Request::new(msg);
    req.set_timeout(remaining);
    if let Ok(v) = MetadataValue::try_from(trace.request_id.as_str()) {
        req.metadata_mut().insert("x-request-id", v);
    }
    if let Ok(v) = MetadataValue::try_from(trace.traceparent()) {
        req.metadata_mut().insert("traceparent", v);
    }
    Ok(req)
}

/// Runs an idempotent call, retrying on UNAVAILABLE (or a connection lost under the call)
/// with exponential backoff and jitter for at most `attempts` tries, never past the deadline.
pub async fn with_retry<T, F, Fut>(
    stage: Stage,
    attempts: u32,
    deadline: &Deadline,
    mut call: F,
) -> Result<T, GatewayError>
where
    F: FnMut() -> Result<Fut, GatewayError>,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=attempts {
        match call()?.await {
            Ok(resp) => return Ok(resp.into_inner()),
            Err(status)
                if (status.code() == Code::Unavailable
                    || connection_lost(&status, deadline.passed()))
                    && attempt < attempts =>
            {
                let mut jitter = [0u8; 1];
                let _ = getrandom::fill(&mut jitter);
                let pause = backoff + Duration::from_millis(u64::from(jitter[0]) % 50);
                match deadline.remaining() {
                    Some(left) if left > pause => {
                        tracing::warn!(stage = stage.as_str(), attempt, error = %status.message(), "retrying after UNAVAILABLE");
                        metrics::counter!("klein_gateway_retries_total", "stage" => stage.as_str())
                            .increment(1);
                        tokio::time::sleep(pause).await;
                        backoff *= 2;
                    }
                    _ => return Err(downstream(stage, status, deadline.passed())),
                }
            }
            Err(status) => return Err(downstream(stage, status, deadline.passed())),
        }
    }
    unreachable!("the last attempt always returns")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn retries_only_unavailable_and_only_within_attempts() {
        let deadline = Deadline::after(Duration::from_secs(10));
        for (code, attempts, want_calls, want_ok, want_code) in [
            (Code::Unavailable, 3, 3, false, Code::Unavailable),
            (Code::Unavailable, 1, 1, false, Code::Unavailable),
            (Code::Unknown, 3, 3, false, Code::Unavailable),
            (Code::Cancelled, 3, 3, false, Code::Unavailable),
            (
                Code::ResourceExhausted,
                3,
                1,
                false,
                Code::ResourceExhausted,
            ),
            (Code::InvalidArgument, 3, 1, false, Code::InvalidArgument),
            (Code::Ok, 3, 1, true, Code::Ok),
        ] {
            let calls = AtomicU32::new(0);
            let out = with_retry(Stage::Vae, attempts, &deadline, || {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(async move {
                    if code == Code::Ok {
                        Ok(Response::new(7u32))
                    } else {
                        Err(Status::new(code, "x"))
                    }
                })
            })
            .await;
            assert_eq!(calls.load(Ordering::SeqCst), want_calls, "{code:?}");
            assert_eq!(out.is_ok(), want_ok, "{code:?}");
            if let Err(e) = out {
                assert_eq!(Status::from(e).code(), want_code, "{code:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_retry_that_would_pass_the_deadline_is_not_made() {
        let deadline = Deadline::after(Duration::from_millis(20));
        let calls = AtomicU32::new(0);
        let out: Result<u32, _> = with_retry(Stage::Encoder, 5, &deadline, || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(async { Err(Status::unavailable("down")) })
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(Status::from(out.unwrap_err()).code(), Code::Unavailable);
    }
}
