//! One transformer forward on a forward golden's inputs (`goldens/transformer_forward*`), as
//! the transformer tests compare models with. Each test crate uses what it needs of it.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use denoiser_svc::model::{Flux2Transformer2DModel, PositionId};
use klein_test_support::{golden, take, test_device};

/// A model's outputs on the golden's inputs, in f32 on the host: without references, with
/// references (every token), and with references for the noisy tokens alone as the sampler
/// asks ([`Flux2Transformer2DModel::forward_first`]).
pub struct Outputs {
    pub plain: Tensor,
    pub refs: Tensor,
    pub noisy: Tensor,
}

/// Position ids (1, S, 4) as the model takes them.
pub fn ids(t: &Tensor) -> Vec<PositionId> {
    t.squeeze(0)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| [r[0] as u32, r[1] as u32, r[2] as u32, r[3] as u32])
        .collect()
}

/// `m`'s [`Outputs`] on golden `name`'s inputs, computed in `dtype` at t = 730.
pub fn run(name: &str, m: &Flux2Transformer2DModel, dtype: DType) -> Outputs {
    let g = golden(name);
    let dev = test_device();
    let input = |name: &str| {
        take(&g, name)
            .to_device(&dev)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap()
    };
    let ehs = input("encoder_hidden_states");
    let rope = |prefix: &str| {
        let mut all = ids(take(&g, "txt_ids"));
        all.extend(ids(take(&g, &format!("{prefix}img_ids"))));
        m.rope(&all, &dev).unwrap()
    };
    let host = |y: Tensor| {
        y.to_dtype(DType::F32)
            .and_then(|y| y.to_device(&Device::Cpu))
            .unwrap()
    };
    let (hs, hs_ref) = (input("hidden_states"), input("ref.hidden_states"));
    let (plain_rope, ref_rope) = (rope(""), rope("ref."));
    let noisy = hs.dim(1).unwrap();
    Outputs {
        plain: host(m.forward(&hs, &ehs, &[730.0], &plain_rope).unwrap()),
        refs: host(m.forward(&hs_ref, &ehs, &[730.0], &ref_rope).unwrap()),
        noisy: host(
            m.forward_first(&hs_ref, &ehs, &[730.0], &ref_rope, noisy)
                .unwrap(),
        ),
    }
}
