//! `POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart): one JSON
//! response with every image as `b64_json`, or server-sent events with `stream=true`.

use std::time::Duration;

use axum::{
    Json,
    extract::{FromRequest, Multipart, Request, State},
    http::{HeaderMap, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};

use super::{
    AppState,
    error::ApiError,
    request::{self, ImageRequest, Options, Uploads},
    run,
    sse::{self, Family},
};

/// Reads the body of an image request: multipart when the content type says so, else JSON.
/// `need_image`: at least one `image` is required (edits).
pub async fn read_body(
    state: &AppState,
    req: Request,
    need_image: bool,
) -> Result<ImageRequest, ApiError> {
    let multipart = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let limits = &state.config.limits;
    let (opts, uploads) = if multipart {
        let form = Multipart::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid("body", e.body_text()))?;
        request::read_form(form, limits).await?
    } else if need_image {
        return Err(ApiError::invalid(
            "body",
            "this endpoint takes multipart/form-data",
        ));
    } else {
        let Json(opts) = Json::<Options>::from_request(req, state)
            .await
            .map_err(request::json_error)?;
        (opts, Uploads::default())
    };
    request::build(opts, uploads, limits, need_image)
}

async fn respond(
    state: AppState,
    headers: HeaderMap,
    req: ImageRequest,
    family: Family,
) -> Result<Response, ApiError> {
    let grpc = run::grpc_request(req.generate, &headers)?;
    let timeout = Duration::from_secs(state.config.default_timeout_secs);
    let events = run::start(state.api.clone(), grpc, timeout).await?;
    if req.stream {
        return Ok(sse::stream(events, family, req.partial_images).into_response());
    }
    Ok(Json(run::collect(events).await?).into_response())
}

/// `POST /v1/images/generations`.
pub async fn generations(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let image = read_body(&state, req, false).await?;
    respond(state, headers, image, Family::Generation).await
}

/// `POST /v1/images/edits`.
pub async fn edits(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let image = read_body(&state, req, true).await?;
    respond(state, headers, image, Family::Edit).await
}
