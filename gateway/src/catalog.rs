//! What the stack serves, learnt from the stages' Info RPCs.

use std::time::Duration;

use klein_proto::pb;

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
];

/// `ServiceInfo.details` key the denoiser sets to "true" for step-distilled models.
pub const DETAIL_DISTILLED: &str = "is_distilled";

/// Models the gateway can route to (the first is the default).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub models: Vec<ModelCaps>,
}

impl Catalog {
    /// The catalog a denoiser's Info describes: distilled models default to 4 steps and no
    /// guidance, base models to 50 steps and guidance 4.0 (spec §1.1).
    pub fn from_denoiser(info: &pb::ServiceInfo) -> Self {
        let distilled = info
            .details
            .get(DETAIL_DISTILLED)
            .is_some_and(|v| v == "true");
        Self {
            models: vec![ModelCaps {
                id: info.model_id.clone(),
                distilled,
                default_steps: if distilled { 4 } else { 50 },
                default_guidance: if distilled { 1.0 } else { 4.0 },
            }],
        }
    }
}

const INFO_TIMEOUT: Duration = Duration::from_secs(5);

/// The denoiser's Info, if it answers within a few seconds.
pub async fn denoiser_info(stages: &Stages) -> Option<pb::ServiceInfo> {
    let mut client = stages.denoiser.clone();
    let mut req = tonic::Request::new(pb::DenoiserServiceInfoRequest {});
    req.set_timeout(INFO_TIMEOUT);
    client
        .info(req)
        .await
        .ok()
        .and_then(|r| r.into_inner().info)
}

/// Info of every stage that answers (encoder, denoiser, VAE order).
pub async fn gather_infos(stages: &Stages) -> Vec<pb::ServiceInfo> {
    let encoder = async {
        let mut client = stages.encoder.clone();
        let mut req = tonic::Request::new(pb::TextEncoderServiceInfoRequest {});
        req.set_timeout(INFO_TIMEOUT);
        client
            .info(req)
            .await
            .ok()
            .and_then(|r| r.into_inner().info)
    };
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
    let (e, d, v) = tokio::join!(encoder, denoiser_info(stages), vae);
    [e, d, v].into_iter().flatten().collect()
}
