//! `GET /healthz`, `GET /v1/capabilities`, the OpenAPI document and the embedded web page.

use axum::{
    Json,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use klein_proto::pb::{self, image_service_server::ImageService};
use serde_json::{Value, json};

use super::{
    AppState, body_limit,
    error::{ApiError, Kind},
    request::MAX_PARTIAL_IMAGES,
};

/// The OpenAPI 3.1 document of the HTTP API.
pub const OPENAPI_JSON: &str = include_str!("../../web/openapi.json");

/// The web app's files: name, content type, contents.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../web/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/app.js"),
    ),
    (
        "paint.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/paint.js"),
    ),
    (
        "history.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/history.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../web/style.css"),
    ),
    ("openapi.json", "application/json", OPENAPI_JSON),
];

/// `GET /` and `GET /{file}`: the embedded web app and the OpenAPI document.
pub async fn asset(file: Option<Path<String>>) -> Response {
    let name = file
        .map(|Path(f)| f)
        .unwrap_or_else(|| "index.html".to_owned());
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => ApiError::new(Kind::NotFound, format!("no route for /{name}")).into_response(),
    }
}

/// `GET /healthz`: 200 once the denoiser described its model, else 503.
pub async fn healthz(State(state): State<AppState>) -> Response {
    let models: Vec<String> = state
        .catalog
        .read()
        .map(|c| c.models.iter().map(|m| m.id.clone()).collect())
        .unwrap_or_default();
    if models.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "models": models})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok", "models": models})).into_response()
    }
}

fn service(info: &pb::ServiceInfo) -> Value {
    json!({
        "service": info.service, "model_id": info.model_id, "device": info.device,
        "dtype": pb::Dtype::try_from(info.dtype).map(|d| d.as_str_name()).unwrap_or("UNSPECIFIED"),
        "quantization": info.quantization, "memory_budget_bytes": info.memory_budget_bytes,
        "weight_bytes": info.weight_bytes, "reserved_bytes": info.reserved_bytes,
        "queue_depth": info.queue_depth, "max_queue_depth": info.max_queue_depth,
    })
}

/// `GET /v1/capabilities`: models, limits, features, queue and services (the gRPC
/// GetCapabilities, plus what only the HTTP API has).
pub async fn capabilities(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let caps = state
        .api
        .get_capabilities(tonic::Request::new(pb::GetCapabilitiesRequest {}))
        .await?
        .into_inner();
    let l = caps.limits.unwrap_or_default();
    let admission = state.api.admission();
    let jobs = state.jobs.limits();
    Ok(Json(json!({
        "models": caps.models.iter().map(|m| json!({
            "id": m.id, "variant": m.variant, "distilled": m.distilled,
            "default_steps": m.default_steps, "default_guidance": m.default_guidance_scale,
            "adapters": m.adapters,
        })).collect::<Vec<_>>(),
        "limits": {
            "min_image_side": l.min_image_side, "max_image_side": l.max_image_side,
            "max_image_pixels": l.max_image_pixels, "max_steps": l.max_steps,
            "max_n": l.max_num_images, "max_reference_images": l.max_reference_images,
            "max_input_image_bytes": l.max_input_image_bytes,
            "max_prompt_bytes": state.config.limits.max_prompt_bytes,
            "max_partial_images": MAX_PARTIAL_IMAGES, "max_body_bytes": body_limit(&state.config),
        },
        "features": caps.features,
        "modes": ["text_to_image", "edit", "image_to_image", "inpaint"],
        "response_formats": ["b64_json"],
        "queue": {
            "max_concurrent_requests": state.config.max_concurrent_requests,
            "max_queue_depth": admission.max_queue, "queued": admission.queued,
        },
        "jobs": {"max_jobs": jobs.max_jobs, "ttl_secs": jobs.ttl.as_secs()},
        "services": caps.services.iter().map(service).collect::<Vec<_>>(),
    })))
}
