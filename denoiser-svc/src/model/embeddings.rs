//! Timestep features (spec §2.2) and 4-axis RoPE tables (§2.5), both computed on the host
//! exactly as diffusers rounds them.

use candle_core::{DType, Device, Result, Tensor};
use half::{bf16, f16};

/// Rounds `v` to the nearest value of `dtype` (f32 and wider: unchanged).
pub fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(v).to_f32(),
        DType::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// τ the sinusoid sees for the pipeline timestep `t = σ·1000` (f32): the pipeline casts `t` to
/// the model dtype and divides by 1000 there, the transformer multiplies by 1000 there again
/// (`τ = dtype(dtype(dtype(t) / 1000) · 1000)`; bf16 σ=0.967384 gives τ = 968).
pub fn tau(t: f32, dtype: DType) -> f32 {
    let t = round_to(dtype, t);
    let sigma = round_to(dtype, t / 1000.0);
    round_to(dtype, sigma * 1000.0)
}

/// `Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)` of τ(t) per batch item:
/// `[cos(τ f_k), sin(τ f_k)]`, `f_k = exp(-ln(10000)·k / (channels/2))`, computed in f32 and
/// cast to `dtype`. (B, channels)
pub fn timestep_features(
    timesteps: &[f32],
    channels: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let half = channels / 2;
    let ln_period = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|k| (ln_period * k as f32 / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(timesteps.len() * channels);
    for &t in timesteps {
        let tau = tau(t, dtype);
        out.extend(freqs.iter().map(|f| (tau * f).cos()));
        out.extend(freqs.iter().map(|f| (tau * f).sin()));
    }
    Tensor::from_vec(out, (timesteps.len(), channels), dev)?.to_dtype(dtype)
}

/// One token's position `(t, h, w, l)` (§2.5).
pub type PositionId = [u32; 4];

/// Text token positions `(0, 0, 0, i)`.
pub fn text_ids(len: usize) -> Vec<PositionId> {
    (0..len as u32).map(|i| [0, 0, 0, i]).collect()
}

/// Image token positions `(t, r, c, 0)`, row-major over an `h × w` grid.
pub fn grid_ids(t: u32, h: usize, w: usize) -> Vec<PositionId> {
    (0..h as u32)
        .flat_map(|r| (0..w as u32).map(move |c| [t, r, c, 0]))
        .collect()
}

/// RoPE tables for one token sequence: angle `j` of every token, interleaved pairs
/// (2j, 2j+1) of the head dim. `cos`, `sin`: (S, head_dim/2) f32.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// `Flux2PosEmbed`: axis `a` owns `axes_dims[a]` head dims; its frequency `j` is
/// `1 / theta^(2j / axes_dims[a])` and the angle `pos_a · ω_j` is computed in f64, then cos and
/// sin are cast to f32 (diffusers).
pub fn rope(ids: &[PositionId], axes_dims: &[usize], theta: f64, dev: &Device) -> Result<Rope> {
    let freqs: Vec<(usize, f64)> = axes_dims
        .iter()
        .enumerate()
        .flat_map(|(axis, &dim)| {
            (0..dim / 2).map(move |j| (axis, 1.0 / theta.powf((2 * j) as f64 / dim as f64)))
        })
        .collect();
    let half = freqs.len();
    let mut cos = Vec::with_capacity(ids.len() * half);
    let mut sin = Vec::with_capacity(ids.len() * half);
    for id in ids {
        for &(axis, omega) in &freqs {
            let angle = id[axis] as f32 as f64 * omega;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok(Rope {
        cos: Tensor::from_vec(cos, (ids.len(), half), dev)?,
        sin: Tensor::from_vec(sin, (ids.len(), half), dev)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tau_rounds_like_the_bf16_pipeline() {
        let sigmas = [1.0f32, 0.967_384, 0.908_144, 0.767_2];
        let taus: Vec<f32> = sigmas
            .iter()
            .map(|s| tau(s * 1000.0, DType::BF16))
            .collect();
        assert_eq!(taus, vec![1000.0, 968.0, 908.0, 768.0]);
        assert!((tau(967.384, DType::F32) - 967.384).abs() < 1e-3);
    }

    #[test]
    fn ids_are_text_first_style_tuples() {
        assert_eq!(text_ids(2), vec![[0, 0, 0, 0], [0, 0, 0, 1]]);
        assert_eq!(grid_ids(10, 2, 2)[3], [10, 1, 1, 0]);
    }

    #[test]
    fn rope_is_identity_at_the_origin() {
        let r = rope(
            &[[0, 0, 0, 0], [0, 1, 0, 0]],
            &[8, 8, 8, 8],
            2000.0,
            &Device::Cpu,
        )
        .unwrap();
        let cos = r.cos.to_vec2::<f32>().unwrap();
        assert!(cos[0].iter().all(|&c| c == 1.0));
        // axis 1 (h) freq 0 of token 1: angle 1 rad.
        assert!((cos[1][4] - 1f32.cos()).abs() < 1e-7);
        assert_eq!(cos[1][0], 1.0);
    }
}
