//! The service's one error type and its gRPC status mapping.

use klein_proto::tensor::FieldError;
use klein_runtime::{
    budget::AdmissionError, device::DeviceError, engine::EngineError, gpu_memory,
    models::RegistryError, server::ServeError,
};

use crate::weights::LoadError;

/// Everything that can go wrong in denoiser-svc.
#[derive(Debug, thiserror::Error)]
pub enum DenoiseError {
    /// Bad input, naming the request field.
    #[error("{field}: {reason}")]
    Validation { field: String, reason: String },
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("sampling failed: {0}")]
    Compute(#[from] candle_core::Error),
    #[error("loading the model: {0}")]
    Load(#[from] LoadError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A configuration the service cannot start with.
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The model cannot become resident while other models' runs hold the memory.
    #[error("{0}")]
    ModelBusy(RegistryError),
    /// `embeddings_handle` names embeddings this replica does not hold (any more): the caller
    /// sends them again.
    #[error("embeddings handle unknown: {0}; send prompt_embeds")]
    EmbeddingsUnknown(String),
}

impl From<RegistryError> for DenoiseError {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::Unknown { .. } => Self::invalid("model", err.to_string()),
            RegistryError::NoRoom { .. } => Self::ModelBusy(err),
            _ => Self::Config(err.to_string()),
        }
    }
}

impl DenoiseError {
    /// A validation error at `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Validation { .. } => "invalid_argument",
            Self::Admission(_) | Self::ModelBusy(_) => "resource_exhausted",
            Self::EmbeddingsUnknown(_) => "failed_precondition",
            Self::Engine(EngineError::Stopped) => "unavailable",
            _ => "internal",
        }
    }
}

impl From<FieldError> for DenoiseError {
    fn from(err: FieldError) -> Self {
        Self::invalid(err.field, err.source.to_string())
    }
}

impl From<DenoiseError> for tonic::Status {
    fn from(err: DenoiseError) -> Self {
        let msg = err.to_string();
        match err {
            DenoiseError::Validation { .. } => tonic::Status::invalid_argument(msg),
            DenoiseError::Admission(_) | DenoiseError::ModelBusy(_) => {
                tonic::Status::resource_exhausted(msg)
            }
            DenoiseError::Engine(EngineError::Stopped) => tonic::Status::unavailable(msg),
            DenoiseError::EmbeddingsUnknown(_) => tonic::Status::failed_precondition(msg),
            _ if gpu_memory::is_out_of_memory(&msg) => tonic::Status::resource_exhausted(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_out_of_memory_is_resource_exhausted_other_compute_errors_internal() {
        let oom = DenoiseError::Compute(candle_core::Error::msg(
            r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#,
        ));
        assert_eq!(
            tonic::Status::from(oom).code(),
            tonic::Code::ResourceExhausted
        );
        let lt = DenoiseError::Compute(candle_core::Error::msg(
            "linear: cuBLASLt: CublasError(CUBLAS_STATUS_ALLOC_FAILED)",
        ));
        assert_eq!(
            tonic::Status::from(lt).code(),
            tonic::Code::ResourceExhausted
        );
        let other = DenoiseError::Compute(candle_core::Error::msg("shape mismatch"));
        assert_eq!(tonic::Status::from(other).code(), tonic::Code::Internal);
    }

    #[test]
    fn registry_refusals_name_the_model_field_or_are_resource_exhausted() {
        let unknown = DenoiseError::from(RegistryError::Unknown {
            id: "x".into(),
            available: vec!["a".into(), "b".into()],
        });
        let status = tonic::Status::from(unknown);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "model: unknown model \"x\"; this service serves: a, b"
        );
        let busy = DenoiseError::from(RegistryError::NoRoom {
            id: "b".into(),
            tier: klein_runtime::models::Tier::Device,
        });
        assert_eq!(busy.kind(), "resource_exhausted");
        assert_eq!(
            tonic::Status::from(busy).code(),
            tonic::Code::ResourceExhausted
        );
    }
}
