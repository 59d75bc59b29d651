//! What the stack serves, learnt from the stages' Info RPCs.

use std::{collections::BTreeSet, future::Future, time::Duration};

use klein_proto::pb::{
    self, denoiser_service_client::DenoiserServiceClient,
    text_encoder_service_client::TextEncoderServiceClient,
};
use tonic::transport::Channel;

use crate::{clients::Stages, validate::ModelCaps};

/// Features the gateway offers, as listed by GetCapabilities.
pub const FEATURES: &[&str] = &[
    "text_to_image",
    "image_to_image",
    "inpaint",
    "inpaint_alpha",
    "multi_reference",
    "cfg",
    "previews",
    "initial_noise",
    "lora",
];

/// `ServiceInfo.details` key the denoiser sets to "true" for step-distilled models.
pub const DETAIL_DISTILLED: &str = "is_distilled";

/// Models the gateway can route to (the first is the default).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub models: Vec<ModelCaps>,
}

/// The encoder model a denoiser model takes its embeddings from: the one it names, else the
/// encoder model with its own id, else the encoder's default ("").
fn encoder_model(named: &str, id: &str, encoders: &BTreeSet<String>) -> String {
    [named, id]
        .into_iter()
        .find(|m| !m.is_empty() && encoders.contains(*m))
        .unwrap_or_default()
        .to_owned()
}

impl Catalog {
    /// The catalog the denoiser replicas' Infos describe (models in first-seen order), each
    /// paired with the encoder model among `encoders` that serves it.
    pub fn from_denoisers(infos: &[pb::ServiceInfo], encoders: &BTreeSet<String>) -> Self {
        let mut models: Vec<ModelCaps> = Vec::new();
        for info in infos {
            for caps in Self::models_of(info, encoders) {
                if !models.iter().any(|m| m.id == caps.id) {
                    models.push(caps);
                }
            }
        }
        Self { models }
    }

    /// One denoiser's models; a service without a model list describes its one model in
    /// `model_id` and `details` (spec §1.1 defaults).
    fn models_of(info: &pb::ServiceInfo, encoders: &BTreeSet<String>) -> Vec<ModelCaps> {
        if info.models.is_empty() {
            let distilled = info
                .details
                .get(DETAIL_DISTILLED)
                .is_some_and(|v| v == "true");
            return vec![ModelCaps {
                id: info.model_id.clone(),
                variant: String::new(),
                text_encoder: encoder_model("", &info.model_id, encoders),
                distilled,
                default_steps: if distilled { 4 } else { 50 },
                default_guidance: if distilled { 1.0 } else { 4.0 },
                adapters: Vec::new(),
            }];
        }
        info.models
            .iter()
            .map(|m| ModelCaps {
                id: m.id.clone(),
                variant: m.variant.clone(),
                text_encoder: encoder_model(&m.text_encoder, &m.id, encoders),
                distilled: m.distilled,
                default_steps: m.default_steps,
                default_guidance: m.default_guidance_scale,
                adapters: m.adapters.clone(),
            })
            .collect()
    }
}

const INFO_TIMEOUT: Duration = Duration::from_secs(5);

async fn denoiser_info_at(channel: Channel) -> Option<pb::ServiceInfo> {
    let mut client = DenoiserServiceClient::new(channel);
    let mut req = tonic::Request::new(pb::DenoiserServiceInfoRequest {});
    req.set_timeout(INFO_TIMEOUT);
    client
        .info(req)
        .await
        .ok()
        .and_then(|r| r.into_inner().info)
}

async fn encoder_info_at(channel: Channel) -> Option<pb::ServiceInfo> {
    let mut client = TextEncoderServiceClient::new(channel);
    let mut req = tonic::Request::new(pb::TextEncoderServiceInfoRequest {});
    req.set_timeout(INFO_TIMEOUT);
    client
        .info(req)
        .await
        .ok()
        .and_then(|r| r.into_inner().info)
}

/// The Info of each replica (in order), asked concurrently; `None` where none came back.
async fn each_replica<F, Fut>(channels: &[Channel], info: F) -> Vec<Option<pb::ServiceInfo>>
where
    F: Fn(Channel) -> Fut,
    Fut: Future<Output = Option<pb::ServiceInfo>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in channels.iter().enumerate() {
        let fut = info(c.clone());
        set.spawn(async move { (i, fut.await) });
    }
    let mut out = vec![None; channels.len()];
    while let Some(Ok((i, answer))) = set.join_next().await {
        out[i] = answer;
    }
    out
}

/// The ids an Info lists (its default alone for a service without a model list).
fn model_ids(info: &pb::ServiceInfo) -> Vec<String> {
    if info.models.is_empty() {
        vec![info.model_id.clone()]
    } else {
        info.models.iter().map(|m| m.id.clone()).collect()
    }
}

/// Asks every encoder and denoiser replica for its Info, updates the per-model routes, and
/// returns the catalog, or `None` while no denoiser answers.
pub async fn refresh(stages: &Stages) -> Option<Catalog> {
    let encoders = each_replica(stages.encoder.replicas(), encoder_info_at);
    let denoisers = each_replica(stages.denoiser.replicas(), denoiser_info_at);
    let (encoders, denoisers) = tokio::join!(encoders, denoisers);
    stages
        .encoder
        .update(encoders.iter().map(|i| i.as_ref().map(model_ids)).collect());
    stages.denoiser.update(
        denoisers
            .iter()
            .map(|i| i.as_ref().map(model_ids))
            .collect(),
    );
    let answered: Vec<pb::ServiceInfo> = denoisers.into_iter().flatten().collect();
    if answered.is_empty() {
        return None;
    }
    Some(Catalog::from_denoisers(&answered, &stages.encoder.models()))
}

/// Info of every stage that answers (encoder, denoiser, VAE order).
pub async fn gather_infos(stages: &Stages) -> Vec<pb::ServiceInfo> {
    let encoder = encoder_info_at(stages.encoder.channel(""));
    let denoiser = denoiser_info_at(stages.denoiser.channel(""));
    let vae = async {
        let mut client = stages.vae.clone();
        let mut req = tonic::Request::new(pb::VaeServiceInfoRequest {});
        req.set_timeout(INFO_TIMEOUT);
        client
            .info(req)
            .await
            .ok()
            .and_then(|r| r.into_inner().info)
    };
    let (e, d, v) = tokio::join!(encoder, denoiser, vae);
    [e, d, v].into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denoiser_models_pair_with_the_encoder_model_that_serves_them() {
        let model = |id: &str, text_encoder: &str, distilled| pb::ModelInfo {
            id: id.into(),
            variant: "custom".into(),
            distilled,
            default_steps: if distilled { 4 } else { 50 },
            default_guidance_scale: if distilled { 1.0 } else { 4.0 },
            text_encoder: text_encoder.into(),
            ..Default::default()
        };
        let a = pb::ServiceInfo {
            models: vec![model("4b", "", true), model("base-4b", "qwen-4b", false)],
            ..Default::default()
        };
        let b = pb::ServiceInfo {
            models: vec![model("9b", "", true), model("4b", "", true)],
            ..Default::default()
        };
        let encoders: BTreeSet<String> = ["qwen-4b", "9b"].map(String::from).into();
        let c = Catalog::from_denoisers(&[a, b], &encoders);
        let got: Vec<(&str, &str, u32)> = c
            .models
            .iter()
            .map(|m| (m.id.as_str(), m.text_encoder.as_str(), m.default_steps))
            .collect();
        assert_eq!(
            got,
            [("4b", "", 4), ("base-4b", "qwen-4b", 50), ("9b", "9b", 4)]
        );
    }
}
