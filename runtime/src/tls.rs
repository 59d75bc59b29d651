//! Optional TLS (rustls with ring) for every gRPC server and for the gateway's stage clients.
//!
//! Servers: `tls_cert` + `tls_key` (PEM files) turn TLS on; `tls_client_ca` (a PEM CA bundle)
//! also asks each client for a certificate that chains to that CA (mutual TLS) and refuses
//! the handshake of a client without one. Clients: [`ClientTlsFiles`] names the CA that
//! verifies the servers and, for mutual TLS, the client's own certificate and key.
//!
//! Files are read once, at startup; a missing file or a half-configured pair stops the
//! service with a message that names the setting. Malformed PEM is reported when the server
//! or channel is built, also at startup.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::ServerConfig;

/// Longest TLS handshake a server or client waits for: a peer that connects and stays
/// silent cannot hold a connection slot for longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{setting} = {path}: {source}")]
    Read {
        setting: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Incomplete(&'static str),
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.display().to_string(),
        source,
    })
}

/// The server TLS of `config`, or `None` when TLS is off (no certificate configured).
pub fn server_tls(config: &ServerConfig) -> Result<Option<ServerTlsConfig>, TlsError> {
    match (&config.tls_cert, &config.tls_key) {
        (None, None) if config.tls_client_ca.is_some() => Err(TlsError::Incomplete(
            "tls_client_ca needs tls_cert and tls_key (mutual TLS runs over TLS)",
        )),
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let identity = Identity::from_pem(read("tls_cert", cert)?, read("tls_key", key)?);
            let mut tls = ServerTlsConfig::new()
                .identity(identity)
                .timeout(HANDSHAKE_TIMEOUT);
            if let Some(ca) = &config.tls_client_ca {
                tls = tls.client_ca_root(Certificate::from_pem(read("tls_client_ca", ca)?));
            }
            Ok(Some(tls))
        }
        _ => Err(TlsError::Incomplete(
            "tls_cert and tls_key must be set together",
        )),
    }
}

/// TLS of a client's connections (the gateway to the encoder, denoiser and VAE).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientTlsFiles {
    /// PEM CA bundle that verifies the servers; set = connect over TLS (`https://` addresses).
    pub ca: Option<PathBuf>,
    /// PEM certificate chain this client presents (mutual TLS); set together with `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Server name to verify the certificates against; default: each address's host.
    pub domain: Option<String>,
}

impl ClientTlsFiles {
    /// The client TLS, or `None` when TLS is off (no CA configured).
    pub fn load(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        let Some(ca) = &self.ca else {
            return if self.cert.is_some() || self.key.is_some() || self.domain.is_some() {
                Err(TlsError::Incomplete(
                    "a client certificate, key or domain needs the CA (ca) that verifies the servers",
                ))
            } else {
                Ok(None)
            };
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca", ca)?))
            .timeout(HANDSHAKE_TIMEOUT);
        match (&self.cert, &self.key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
            }
            _ => {
                return Err(TlsError::Incomplete(
                    "the client cert and key must be set together",
                ));
            }
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        Ok(Some(tls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_configured_tls_is_refused_and_no_tls_is_off() {
        let base = ServerConfig::default();
        assert!(server_tls(&base).unwrap().is_none());
        for (cert, key, ca) in [
            (Some("c.pem"), None, None),
            (None, Some("k.pem"), None),
            (None, None, Some("ca.pem")),
        ] {
            let cfg = ServerConfig {
                tls_cert: cert.map(PathBuf::from),
                tls_key: key.map(PathBuf::from),
                tls_client_ca: ca.map(PathBuf::from),
                ..base.clone()
            };
            assert!(
                matches!(server_tls(&cfg), Err(TlsError::Incomplete(_))),
                "{cert:?} {key:?} {ca:?}"
            );
        }
        assert!(ClientTlsFiles::default().load().unwrap().is_none());
        let no_ca = ClientTlsFiles {
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..ClientTlsFiles::default()
        };
        assert!(matches!(no_ca.load(), Err(TlsError::Incomplete(_))));
    }

    #[test]
    fn a_missing_file_names_its_setting() {
        let cfg = ServerConfig {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            ..ServerConfig::default()
        };
        let err = server_tls(&cfg).unwrap_err().to_string();
        assert!(err.starts_with("tls_cert = /nonexistent/cert.pem"), "{err}");
    }
}
