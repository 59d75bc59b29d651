//! Layered configuration: built-in defaults < TOML file < `KLEIN_*` environment < flags.
//!
//! A service describes its settings as one serde struct `C: Default` (usually embedding
//! [`ServerConfig`] with `#[serde(flatten)]`) and its flags as a struct whose fields are all
//! `Option`s with `#[serde(skip_serializing_if = "Option::is_none")]`, so that only flags the
//! user typed override the layers below. [`load`] merges them; the result is logged once at
//! startup with [`log_effective`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    bytesize::ByteSize,
    device::{DTypeSpec, DeviceSpec},
    telemetry::LogFormat,
};

/// Prefix of the environment variables every service reads (`KLEIN_LISTEN`, ...).
pub const ENV_PREFIX: &str = "KLEIN_";

/// A configuration that could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Rule(String),
}

/// Merges defaults < `file` (if given; it must exist) < `KLEIN_*` env < `flags`.
pub fn load<C, F>(file: Option<&Path>, flags: &F) -> Result<C, ConfigError>
where
    C: Default + Serialize + DeserializeOwned,
    F: Serialize,
{
    let fig = figment::<C, F>(file, flags)?;
    fig.extract().map_err(|err| {
        // serde's `flatten` drops the key path of a bad shared setting; extracting the shared
        // settings on their own recovers it for the message.
        let err = match fig.extract::<ServerConfig>() {
            Err(inner) if !inner.path.is_empty() => inner,
            _ => err,
        };
        ConfigError::Invalid(Box::new(err))
    })
}

/// The merged layers as a [`Figment`], for callers that extract more than one struct.
pub fn figment<C, F>(file: Option<&Path>, flags: &F) -> Result<Figment, ConfigError>
where
    C: Default + Serialize,
    F: Serialize,
{
    let mut fig = Figment::from(Serialized::defaults(C::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::MissingFile(path.display().to_string()));
        }
        fig = fig.merge(Toml::file(path));
    }
    Ok(fig
        .merge(Env::prefixed(ENV_PREFIX).split("__"))
        .merge(Serialized::defaults(flags)))
}

/// Logs the effective configuration once, at startup.
pub fn log_effective<C: std::fmt::Debug>(service: &str, config: &C) {
    tracing::info!(service, config = ?config, "effective configuration");
}

/// Settings every gRPC service shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; absent = no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Device the model runs on: `cpu`, `cuda` or `cuda:N`.
    pub device: DeviceSpec,
    /// Compute dtype of the model.
    pub dtype: DTypeSpec,
    /// Memory this service may use on its device: weights, activations and runtime overhead.
    pub gpu_memory_budget: ByteSize,
    /// Most requests that may wait for a memory reservation before new ones are refused.
    pub max_queue_depth: usize,
    /// Seconds in-flight requests get to finish after SIGTERM before the server exits.
    pub drain_timeout_secs: u64,
    /// Log format: `pretty` or `json`.
    pub log_format: LogFormat,
    /// PEM certificate chain the server presents; with `tls_key`, serves gRPC over TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle that client certificates must chain to; set = mutual TLS (a client
    /// without such a certificate cannot connect).
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            device: DeviceSpec::Cpu,
            dtype: DTypeSpec::F32,
            gpu_memory_budget: ByteSize(4 << 30),
            max_queue_depth: 32,
            drain_timeout_secs: 30,
            log_format: LogFormat::Pretty,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

impl ServerConfig {
    /// The drain deadline as a [`Duration`].
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

/// Flags every service binary accepts; each one overrides config file and environment.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ServerFlags {
    /// gRPC listen address, e.g. 0.0.0.0:50051.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Prometheus /metrics listen address, e.g. 0.0.0.0:9090.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceSpec>,
    /// Compute dtype: f32 or bf16.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DTypeSpec>,
    /// Device memory budget of this service, e.g. 8GiB (weights + activations + overhead).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory_budget: Option<ByteSize>,
    /// Most requests waiting for memory before new ones get RESOURCE_EXHAUSTED.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queue_depth: Option<usize>,
    /// Seconds in-flight requests get after SIGTERM.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout_secs: Option<u64>,
    /// Log format: pretty or json.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// PEM certificate chain; with --tls-key, serve over TLS.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle client certificates must chain to (mutual TLS).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
}
