//! Validation of `Encode` requests: every check that needs no model, each failure naming the
//! request field (INVALID_ARGUMENT).

use klein_proto::pb;

use crate::error::EncoderError;

/// Bounds a request must respect; fixed at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLimits {
    /// The served models' ids, the default first (requests name one or leave `model` empty).
    pub model_ids: Vec<String>,
    /// Most prompts per request.
    pub max_batch: usize,
    /// Longest prompt, UTF-8 bytes.
    pub max_prompt_bytes: usize,
    /// Most embeddings (prompts + negatives) one response can carry within the message limit.
    pub max_embeddings: usize,
}

/// An `Encode` request that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidEncodeRequest {
    /// Id of the model that encodes them.
    pub model: String,
    /// 1..=max_batch prompts.
    pub prompts: Vec<String>,
    /// Empty, or one per prompt.
    pub negative_prompts: Vec<String>,
}

impl ValidEncodeRequest {
    /// Checks `req` against `limits`.
    pub fn validate(
        req: pb::TextEncoderServiceEncodeRequest,
        limits: &RequestLimits,
    ) -> Result<Self, EncoderError> {
        let model = if req.model.is_empty() {
            limits.model_ids.first().cloned().unwrap_or_default()
        } else if limits.model_ids.contains(&req.model) {
            req.model
        } else {
            return Err(EncoderError::invalid(
                "model",
                format!(
                    "unknown model {:?}; this service serves: {} (or leave it empty for the first)",
                    req.model,
                    limits.model_ids.join(", ")
                ),
            ));
        };
        let n = req.prompts.len();
        if n == 0 {
            return Err(EncoderError::invalid(
                "prompts",
                "at least one prompt is required",
            ));
        }
        if n > limits.max_batch {
            return Err(EncoderError::invalid(
                "prompts",
                format!("{n} prompts; at most {} per request", limits.max_batch),
            ));
        }
        let negatives = req.negative_prompts.len();
        if negatives != 0 && negatives != n {
            return Err(EncoderError::invalid(
                "negative_prompts",
                format!(
                    "{negatives} negative prompts for {n} prompts; send none or one per prompt"
                ),
            ));
        }
        if n + negatives > limits.max_embeddings {
            return Err(EncoderError::invalid(
                "negative_prompts",
                format!(
                    "{} embeddings would exceed the response size limit; at most {} (prompts + negatives) per request",
                    n + negatives,
                    limits.max_embeddings
                ),
            ));
        }
        let fields = [
            ("prompts", &req.prompts),
            ("negative_prompts", &req.negative_prompts),
        ];
        for (field, list) in fields {
            if let Some((i, p)) = list
                .iter()
                .enumerate()
                .find(|(_, p)| p.len() > limits.max_prompt_bytes)
            {
                return Err(EncoderError::invalid(
                    format!("{field}[{i}]"),
                    format!(
                        "{} bytes; at most {} (longer text is cut at 512 tokens anyway)",
                        p.len(),
                        limits.max_prompt_bytes
                    ),
                ));
            }
        }
        Ok(Self {
            model,
            prompts: req.prompts,
            negative_prompts: req.negative_prompts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits {
            model_ids: vec!["klein".into(), "klein-9b".into()],
            max_batch: 2,
            max_prompt_bytes: 10,
            max_embeddings: 3,
        }
    }

    fn req(
        prompts: &[&str],
        negatives: &[&str],
        model: &str,
    ) -> pb::TextEncoderServiceEncodeRequest {
        pb::TextEncoderServiceEncodeRequest {
            prompts: prompts.iter().map(|s| s.to_string()).collect(),
            negative_prompts: negatives.iter().map(|s| s.to_string()).collect(),
            model: model.into(),
        }
    }

    #[test]
    fn accepts_good_requests() {
        for r in [
            req(&["a"], &[], ""),
            req(&[""], &[""], "klein"),
            req(&["a", "b"], &[], ""),
            req(&["a"], &[], "klein-9b"),
        ] {
            let want = if r.model.is_empty() {
                "klein"
            } else {
                &r.model
            };
            let valid = ValidEncodeRequest::validate(r.clone(), &limits());
            assert_eq!(valid.map(|v| v.model).ok().as_deref(), Some(want), "{r:?}");
        }
    }

    #[test]
    fn rejects_bad_requests_naming_the_field() {
        let cases = [
            (req(&[], &[], ""), "prompts"),
            (req(&["a", "b", "c"], &[], ""), "prompts"),
            (req(&["a", "b"], &["x"], ""), "negative_prompts"),
            (req(&["a", "b"], &["x", "y"], ""), "negative_prompts"),
            (req(&["a"], &[], "other"), "model"),
            (req(&["a", "01234567890"], &[], ""), "prompts[1]"),
            (req(&["a"], &["01234567890"], ""), "negative_prompts[0]"),
        ];
        for (r, field) in cases {
            match ValidEncodeRequest::validate(r.clone(), &limits()) {
                Err(EncoderError::Validation { field: f, .. }) => assert_eq!(f, field, "{r:?}"),
                other => panic!("{r:?}: {other:?}"),
            }
        }
    }
}
