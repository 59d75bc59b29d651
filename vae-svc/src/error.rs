//! The service's one error type and its one mapping to a gRPC status.

use klein_proto::tensor::{FieldError, TensorCodecError};
use klein_runtime::{
    budget::AdmissionError, device::DeviceError, engine::EngineError, gpu_memory,
    server::ServeError, tls::TlsError, weights::WeightsError,
};
use tonic::Status;

/// A request field that failed validation; becomes `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The request field, e.g. `images` or `grid.height`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<FieldError> for ValidationError {
    fn from(err: FieldError) -> Self {
        Self::new(err.field, err.source.to_string())
    }
}

/// Everything that can fail in vae-svc, at startup or per request.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// Bad input.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The memory budget refused the request (queue full, or it can never fit).
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// The engine thread is gone or a job panicked.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The client went away before the work finished.
    #[error("the request was cancelled")]
    Cancelled,
    /// A tensor operation failed.
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    /// The weights folder or file cannot be used.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The device cannot be opened.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The configuration cannot work (bad dtype, weights over budget, unsupported model).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The TLS settings are incomplete or a certificate cannot be read.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A response tensor could not be encoded (our bug).
    #[error("response encoding: {0}")]
    Encoding(#[from] TensorCodecError),
    /// Binding a listener failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl VaeError {
    /// Stable label for metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Validation(_) => "invalid_argument",
            Self::Admission(_) => "resource_exhausted",
            Self::Engine(EngineError::Stopped) => "unavailable",
            Self::Cancelled => "cancelled",
            _ => "internal",
        }
    }
}

impl From<VaeError> for Status {
    fn from(err: VaeError) -> Self {
        let message = err.to_string();
        match err {
            VaeError::Validation(_) => Status::invalid_argument(message),
            VaeError::Admission(_) => Status::resource_exhausted(message),
            VaeError::Engine(EngineError::Stopped) => Status::unavailable(message),
            VaeError::Cancelled => Status::cancelled(message),
            _ if gpu_memory::is_out_of_memory(&message) => Status::resource_exhausted(message),
            _ => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_out_of_memory_is_resource_exhausted_other_model_errors_internal() {
        let oom = VaeError::Model(candle_core::Error::msg(
            r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#,
        ));
        assert_eq!(Status::from(oom).code(), tonic::Code::ResourceExhausted);
        let other = VaeError::Model(candle_core::Error::msg("shape mismatch"));
        assert_eq!(Status::from(other).code(), tonic::Code::Internal);
    }
}
