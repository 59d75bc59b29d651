//! The gateway's HTTP face, on the gateway's runtime: the OpenAI Images API
//! (`/v1/images/generations`, `/v1/images/edits`, with server-sent events when `stream=true`),
//! a job resource (`/v1/jobs`), `/healthz`, `/v1/capabilities`, the OpenAPI document
//! (`/openapi.json`) and the single-page web app (`/`), whose assets are embedded.
//!
//! Every image request becomes a `pb::GenerateRequest` and runs through the same `ImageApi`
//! as gRPC, so validation, admission, deadlines and the pipeline are one code path. Errors use
//! the OpenAI error shape; [`error::http_status`] is the one place that picks their status.
//! With `api_key` configured, every `/v1/...` request must carry it, as on gRPC
//! (`Authorization: Bearer <key>` or `X-Api-Key`); `/healthz`, the page and the OpenAPI
//! document stay open. The request body is limited to `limits.max_request_bytes` (413).
//!
//! # Layout
//! - [`error`]: `ApiError`, the status mapping, gRPC field names -> HTTP params.
//! - [`request`]: JSON and multipart bodies -> `pb::GenerateRequest`.
//! - [`run`]: driving `ImageApi` (deadline and trace headers), collecting the events.
//! - [`sse`]: event streams as server-sent events.
//! - [`openai`]: the two OpenAI endpoints.
//! - [`jobs`], [`job_routes`]: the bounded job store and its endpoints.
//! - [`info`]: health, capabilities, OpenAPI, the web page.

pub mod error;
pub mod info;
pub mod job_routes;
pub mod jobs;
pub mod openai;
pub mod request;
pub mod run;
pub mod sse;

use std::{
    future::IntoFuture,
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, Request, State},
    http::Uri,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{catalog::Catalog, config::Config, grpc::ImageApi};
use error::{ApiError, Kind};
use jobs::JobStore;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The ImageService that gRPC serves too.
    pub api: Arc<ImageApi>,
    pub config: Arc<Config>,
    pub catalog: Arc<RwLock<Catalog>>,
    pub jobs: JobStore,
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(Kind::NotFound, format!("no route for {}", uri.path()))
}

/// Lets a request through when no API key is configured or it carries the key.
async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let text = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let presented = text("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| text("x-api-key"));
        if !presented.is_some_and(|p| key.matches(p)) {
            metrics::counter!("klein_gateway_requests_total", "outcome" => "unauthenticated")
                .increment(1);
            return ApiError::new(
                Kind::Grpc(tonic::Code::Unauthenticated),
                "missing or wrong API key: send `Authorization: Bearer <key>` or `X-Api-Key: <key>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// The largest request body: the gRPC request limit.
pub fn body_limit(config: &Config) -> usize {
    usize::try_from(config.limits.max_request_bytes.0).unwrap_or(usize::MAX)
}

/// Every route of the HTTP API and the web page.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/capabilities", get(info::capabilities))
        .route("/v1/images/generations", post(openai::generations))
        .route("/v1/images/edits", post(openai::edits))
        .route("/v1/jobs", post(job_routes::create))
        .route(
            "/v1/jobs/{id}",
            get(job_routes::get).delete(job_routes::cancel),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/", get(info::asset))
        .route("/{file}", get(info::asset))
        .route("/healthz", get(info::healthz))
        .merge(api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit(&state.config)))
        .with_state(state)
}

/// Serves the HTTP API on `listener` until `stop` is cancelled, then lets open requests
/// finish for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    stop: CancellationToken,
    drain: Duration,
) -> std::io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "HTTP server listening");
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .into_future();
    tokio::select! {
        res = server => res,
        () = async { stop.cancelled().await; tokio::time::sleep(drain).await } => {
            tracing::warn!("HTTP drain deadline passed; dropping remaining connections");
            Ok(())
        }
    }
}
