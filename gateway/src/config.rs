//! Gateway configuration: where the stages are, request limits and timeouts.

use std::{net::SocketAddr, path::PathBuf};

use klein_runtime::{
    bytesize::ByteSize,
    config::{ServerConfig, ServerFlags},
    tls::ClientTlsFiles,
};
use serde::{Deserialize, Serialize};

use crate::auth::ApiKey;

/// Request limits the gateway enforces before any downstream work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Smallest image side, pixels.
    pub min_image_side: u32,
    /// Largest image side, pixels.
    pub max_image_side: u32,
    /// Largest output area, pixels.
    pub max_image_pixels: u64,
    /// Largest step count.
    pub max_steps: u32,
    /// Largest num_images.
    pub max_num_images: u32,
    /// Most reference images.
    pub max_reference_images: u32,
    /// Largest encoded input image.
    pub max_input_image_bytes: ByteSize,
    /// Largest prompt, bytes.
    pub max_prompt_bytes: usize,
    /// Largest encoded GenerateRequest, bytes; a larger one is refused (OUT_OF_RANGE) while
    /// its length prefix is read, before the body is buffered.
    pub max_request_bytes: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            min_image_side: 64,
            max_image_side: 2048,
            max_image_pixels: 2048 * 2048,
            max_steps: 200,
            max_num_images: 4,
            max_reference_images: 4,
            max_input_image_bytes: ByteSize(32 << 20),
            max_prompt_bytes: 16 * 1024,
            max_request_bytes: ByteSize(klein_proto::MAX_MESSAGE_BYTES as u64),
        }
    }
}

/// The gateway's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Listen address, metrics, log format (device, dtype and budget are unused here).
    #[serde(flatten)]
    pub server: ServerConfig,
    /// Text-encoder replicas, e.g. `["http://127.0.0.1:50052"]`; requests are balanced.
    pub encoder_addrs: Vec<String>,
    /// Denoiser replicas.
    pub denoiser_addrs: Vec<String>,
    /// VAE replicas.
    pub vae_addrs: Vec<String>,
    /// Requests processed at once; further ones wait in the queue.
    pub max_concurrent_requests: u64,
    /// Deadline for a request whose client sent none, seconds.
    pub default_timeout_secs: u64,
    /// Attempts per idempotent stage call on UNAVAILABLE (1 = no retry).
    pub max_attempts: u32,
    /// Request limits.
    pub limits: Limits,
    /// API key every ImageService call must carry (`authorization: Bearer <key>` or
    /// `x-api-key`); absent = no key. Set it in the file or `KLEIN_API_KEY`, not on a
    /// command line. Health and reflection never need it.
    pub api_key: Option<ApiKey>,
    /// TLS of the connections to the stages (use `https://` addresses): the CA that verifies
    /// them and, for mutual TLS, this gateway's client certificate and key.
    pub stage_tls: ClientTlsFiles,
    /// HTTP API and web page listen address (e.g. `127.0.0.1:8080`); absent = no HTTP.
    pub http_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig {
                listen: ([127, 0, 0, 1], 50050).into(),
                ..ServerConfig::default()
            },
            encoder_addrs: vec!["http://127.0.0.1:50052".into()],
            denoiser_addrs: vec!["http://127.0.0.1:50053".into()],
            vae_addrs: vec!["http://127.0.0.1:50054".into()],
            max_concurrent_requests: 4,
            default_timeout_secs: 600,
            max_attempts: 3,
            limits: Limits::default(),
            api_key: None,
            stage_tls: ClientTlsFiles::default(),
            http_listen: None,
        }
    }
}

/// Flags of the `gateway` binary.
#[derive(Debug, Clone, Default, clap::Parser, Serialize)]
#[command(
    name = "gateway",
    about = "klein-serve gateway: the public ImageService"
)]
pub struct Flags {
    /// TOML config file (layered: defaults < file < KLEIN_* env < flags).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Shared server flags.
    #[command(flatten)]
    #[serde(flatten)]
    pub server: ServerFlags,
    /// Text-encoder address(es), comma-separated.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_addrs: Option<Vec<String>>,
    /// Denoiser address(es), comma-separated.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denoiser_addrs: Option<Vec<String>>,
    /// VAE address(es), comma-separated.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae_addrs: Option<Vec<String>>,
    /// Requests processed at once.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u64>,
    /// HTTP API and web page listen address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
}
