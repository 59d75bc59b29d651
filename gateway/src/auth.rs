//! The optional API key of the public ImageService.
//!
//! With `api_key` configured, every ImageService call must carry the key as
//! `authorization: Bearer <key>` or `x-api-key: <key>`; others get UNAUTHENTICATED before
//! any validation or queueing. Keys are compared in constant time (`subtle`): the time
//! taken depends on the key's length only, not on how many leading bytes match. Health and
//! reflection stay open, so probes and tooling need no key. The key is never logged.

use std::fmt;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tonic::{Request, Status, metadata::MetadataMap};

/// A secret API key. `Debug` prints `<redacted>`, so the effective-config log stays clean.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// A key; an empty one is refused at startup (see [`ApiKey::check`]).
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// Refuses a key that would protect nothing.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.0.trim().is_empty() {
            return Err("api_key is empty; unset it to run without a key");
        }
        Ok(())
    }

    /// Whether `presented` is this key (constant time in the key's content).
    pub fn matches(&self, presented: &str) -> bool {
        bool::from(presented.as_bytes().ct_eq(self.0.as_bytes()))
    }

    /// Whether the call's metadata carries this key (`authorization: Bearer` or `x-api-key`).
    pub fn admits(&self, metadata: &MetadataMap) -> bool {
        let text = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
        let bearer = text("authorization").and_then(|v| v.strip_prefix("Bearer "));
        bearer
            .or_else(|| text("x-api-key"))
            .is_some_and(|p| self.matches(p))
    }
}

/// The interceptor of the ImageService: lets every call through without a key, else only
/// calls that carry it.
pub fn interceptor(
    key: Option<ApiKey>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |req: Request<()>| match &key {
        Some(key) if !key.admits(req.metadata()) => {
            metrics::counter!("klein_gateway_requests_total", "outcome" => "unauthenticated")
                .increment(1);
            Err(Status::unauthenticated(
                "missing or wrong API key: send `authorization: Bearer <key>` or `x-api-key: <key>`",
            ))
        }
        _ => Ok(req),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn only_the_exact_key_in_either_header_is_admitted() {
        let key = ApiKey::new("s3cret-key");
        for (metadata, want) in [
            (md(&[("authorization", "Bearer s3cret-key")]), true),
            (md(&[("x-api-key", "s3cret-key")]), true),
            (md(&[]), false),
            (md(&[("authorization", "s3cret-key")]), false),
            (md(&[("authorization", "Bearer s3cret-ke")]), false),
            (md(&[("authorization", "Bearer s3cret-key2")]), false),
            (md(&[("authorization", "Bearer S3CRET-KEY")]), false),
            (md(&[("x-api-key", "")]), false),
        ] {
            assert_eq!(key.admits(&metadata), want, "{metadata:?}");
        }
    }

    #[test]
    fn the_key_is_never_printed_and_empty_keys_are_refused() {
        assert_eq!(
            format!("{:?}", ApiKey::new("hunter2")),
            "ApiKey(<redacted>)"
        );
        assert!(ApiKey::new("  ").check().is_err());
        assert!(ApiKey::new("k").check().is_ok());
    }

    #[test]
    fn the_interceptor_answers_unauthenticated() {
        let mut open = interceptor(None);
        assert!(open(Request::new(())).is_ok());
        let mut closed = interceptor(Some(ApiKey::new("k")));
        let err = closed(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut req = Request::new(());
        req.metadata_mut().insert("x-api-key", "k".parse().unwrap());
        assert!(closed(req).is_ok());
    }
}
