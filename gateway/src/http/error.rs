//! HTTP errors in the OpenAI error shape, and the one mapping from failure kinds (gRPC codes
//! first) to HTTP statuses.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tonic::{Code, Status};

/// What went wrong, as far as the HTTP status is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A failure of the shared gRPC code path, by its code.
    Grpc(Code),
    /// The body, or one uploaded file, is larger than allowed.
    PayloadTooLarge,
    /// No such resource (route or job).
    NotFound,
    /// The resource is in a state that forbids the request (e.g. cancelling a finished job).
    Conflict,
}

/// The HTTP status of a failure kind: the one place that decides it.
pub fn http_status(kind: Kind) -> StatusCode {
    match kind {
        Kind::Grpc(code) => match code {
            Code::Ok => StatusCode::OK,
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                StatusCode::BAD_REQUEST
            }
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        },
        Kind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Kind::NotFound => StatusCode::NOT_FOUND,
        Kind::Conflict => StatusCode::CONFLICT,
    }
}

/// An HTTP API error: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub kind: Kind,
    pub message: String,
    /// The request parameter at fault, in HTTP names (`size`, `n`, `mask`, ...).
    pub param: Option<String>,
}

/// The error object of the OpenAI error shape.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub error_type: &'static str,
    pub param: Option<String>,
    pub code: &'static str,
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            kind: Kind::Grpc(Code::InvalidArgument),
            message: message.into(),
            param: Some(param.to_owned()),
        }
    }

    /// A 413 naming `param`.
    pub fn too_large(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            kind: Kind::PayloadTooLarge,
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }

    /// A failure of `kind` without a parameter.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        http_status(self.kind)
    }

    /// The error object, also sent as an SSE `error` event and kept by failed jobs.
    pub fn body(&self) -> ErrorBody {
        let status = self.status();
        let (error_type, code) = match status {
            StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", "payload_too_large"),
            StatusCode::UNAUTHORIZED => ("invalid_request_error", "invalid_api_key"),
            StatusCode::NOT_FOUND => ("invalid_request_error", "not_found"),
            StatusCode::CONFLICT => ("invalid_request_error", "conflict"),
            StatusCode::TOO_MANY_REQUESTS => ("rate_limit_error", "queue_full"),
            StatusCode::SERVICE_UNAVAILABLE => ("server_error", "unavailable"),
            StatusCode::GATEWAY_TIMEOUT => ("server_error", "timeout"),
            s if s.is_client_error() => ("invalid_request_error", "invalid_value"),
            _ => ("server_error", "internal_error"),
        };
        ErrorBody {
            message: self.message.clone(),
            error_type,
            param: self.param.clone(),
            code,
        }
    }
}

/// Request fields named in gateway messages ("field: reason") and their HTTP names.
const PARAMS: &[(&str, &str)] = &[
    ("prompt", "prompt"),
    ("negative_prompt", "negative_prompt"),
    ("model", "model"),
    ("width", "size"),
    ("height", "size"),
    ("num_images", "n"),
    ("num_steps", "steps"),
    ("guidance_scale", "guidance"),
    ("image_to_image.image", "image"),
    ("image_to_image.strength", "strength"),
    ("inpaint.image", "image"),
    ("inpaint.mask", "mask"),
    ("inpaint.strength", "strength"),
    ("reference_images", "reference_image"),
    ("initial_noise", "initial_noise"),
];

fn param_of(message: &str) -> Option<String> {
    let field = message.split_once(':')?.0;
    let base = field.split('[').next().unwrap_or(field);
    PARAMS
        .iter()
        .find(|(grpc, _)| *grpc == base)
        .map(|(_, http)| (*http).to_owned())
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        let param = (status.code() == Code::InvalidArgument)
            .then(|| param_of(status.message()))
            .flatten();
        Self {
            kind: Kind::Grpc(status.code()),
            message: status.message().to_owned(),
            param,
        }
    }
}

#[derive(Serialize)]
struct Envelope {
    error: ErrorBody,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(Envelope { error: self.body() })).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_the_documented_statuses() {
        for (code, want) in [
            (Code::InvalidArgument, 400),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
        ] {
            assert_eq!(http_status(Kind::Grpc(code)).as_u16(), want, "{code:?}");
        }
        assert_eq!(http_status(Kind::PayloadTooLarge).as_u16(), 413);
    }

    #[test]
    fn gateway_field_names_become_http_params() {
        let e = ApiError::from(Status::invalid_argument("width: must be a multiple of 16"));
        assert_eq!(e.param.as_deref(), Some("size"));
        let e = ApiError::from(Status::invalid_argument(
            "reference_images[1]: cannot decode image",
        ));
        assert_eq!(e.param.as_deref(), Some("reference_image"));
        let e = ApiError::from(Status::invalid_argument("denoiser: bad grid"));
        assert_eq!(e.param, None);
        assert_eq!(e.body().error_type, "invalid_request_error");
    }
}
