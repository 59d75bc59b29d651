//! The gateway's one error type and its one mapping to a gRPC status.
//!
//! Downstream failures keep their status code (RESOURCE_EXHAUSTED stays RESOURCE_EXHAUSTED,
//! INVALID_ARGUMENT from a service stays INVALID_ARGUMENT); only the message gains the stage
//! name. A downstream CANCELLED caused by the deadline is reported as DEADLINE_EXCEEDED.
//! A downstream UNKNOWN, or CANCELLED before the deadline, is a broken connection (tonic's
//! codes for a stage process that died mid-call or a connection that closed under a call; no
//! stage answers them itself, and the gateway cancels a call only by dropping it) and is
//! reported as UNAVAILABLE, the code clients retry on.

use klein_runtime::budget::AdmissionError;
use tonic::{Code, Status};

/// Pipeline stage, for messages and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// TextEncoderService.
    Encoder,
    /// DenoiserService.
    Denoiser,
    /// VaeService.
    Vae,
}

impl Stage {
    /// Stable lowercase label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Encoder => "encoder",
            Self::Denoiser => "denoiser",
            Self::Vae => "vae",
        }
    }
}

/// Everything that can end a gateway request early.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A request field is invalid.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The gateway's own request queue is full.
    #[error(transparent)]
    Overloaded(#[from] AdmissionError),
    /// A downstream service answered with an error status.
    #[error("{}: {}", stage.as_str(), status.message())]
    Downstream { stage: Stage, status: Status },
    /// The request deadline passed.
    #[error("deadline exceeded during {}", stage.as_str())]
    Deadline { stage: Stage },
    /// A downstream service broke the contract (our bug or a version mismatch).
    #[error("{}: {reason}", stage.as_str())]
    Contract { stage: Stage, reason: String },
}

impl GatewayError {
    /// An invalid request field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Stable label for metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_argument",
            Self::Overloaded(_) => "overloaded",
            Self::Downstream { .. } => "downstream",
            Self::Deadline { .. } => "deadline",
            Self::Contract { .. } => "contract",
        }
    }
}

impl From<GatewayError> for Status {
    fn from(err: GatewayError) -> Self {
        let message = err.to_string();
        match err {
            GatewayError::Invalid { .. } => Status::invalid_argument(message),
            GatewayError::Overloaded(_) => Status::resource_exhausted(message),
            GatewayError::Downstream { status, .. } => Status::new(status.code(), message),
            GatewayError::Deadline { .. } => Status::deadline_exceeded(message),
            GatewayError::Contract { .. } => Status::internal(message),
        }
    }
}

/// Whether a downstream status means the connection broke under the call (see the module
/// docs); such an idempotent call may be retried.
pub fn connection_lost(status: &Status, deadline_passed: bool) -> bool {
    match status.code() {
        Code::Unknown => true,
        Code::Cancelled => !deadline_passed,
        _ => false,
    }
}

/// Maps a downstream status, turning a deadline-caused cancel into [`GatewayError::Deadline`].
pub fn downstream(stage: Stage, status: Status, deadline_passed: bool) -> GatewayError {
    match status.code() {
        Code::DeadlineExceeded => GatewayError::Deadline { stage },
        Code::Cancelled if deadline_passed => GatewayError::Deadline { stage },
        _ if connection_lost(&status, deadline_passed) => GatewayError::Downstream {
            stage,
            status: Status::unavailable(format!("connection lost: {}", status.message())),
        },
        _ => GatewayError::Downstream { stage, status },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downstream_codes_are_preserved() {
        for code in [
            Code::ResourceExhausted,
            Code::InvalidArgument,
            Code::Unavailable,
            Code::FailedPrecondition,
        ] {
            let s: Status = downstream(Stage::Denoiser, Status::new(code, "boom"), false).into();
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), "denoiser: boom");
        }
        let s: Status = downstream(Stage::Vae, Status::cancelled("Timeout expired"), true).into();
        assert_eq!(s.code(), Code::DeadlineExceeded);
        let s: Status = downstream(Stage::Vae, Status::cancelled("dispatch gone"), false).into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "vae: connection lost: dispatch gone");
        let s: Status = downstream(Stage::Denoiser, Status::unknown("h2 error"), false).into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "denoiser: connection lost: h2 error");
    }

    #[test]
    fn invalid_fields_are_named() {
        let s: Status = GatewayError::invalid("width", "must be a multiple of 16, got 100").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "width: must be a multiple of 16, got 100");
    }
}
