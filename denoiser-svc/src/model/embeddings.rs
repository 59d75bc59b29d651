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
    // Rounded to dtype on the host (the same round-to-nearest-even as a device cast), so the
    // upload is the step's only operation before its first product.
    Tensor::from_vec(out, (timesteps.len(), channels), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
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
/// sin are cast to f32 (diffusers). Each axis takes few distinct positions (a 1024² request's
/// 4608 tokens: at most 512 per axis), so every (axis, position) row is computed once and a
/// token's row is its axes' rows side by side: the same values as one angle per token and
/// frequency, without the repeats (295 k f64 cos / sin pairs at 1024²: 5–6 ms on a 2-core machine).
pub fn rope(ids: &[PositionId], axes_dims: &[usize], theta: f64, dev: &Device) -> Result<Rope> {
    let axes: Vec<AxisTable> = axes_dims
        .iter()
        .enumerate()
        .map(|(axis, &dim)| AxisTable::new(ids.iter().map(|id| id[axis]), dim, theta))
        .collect();
    let half: usize = axes.iter().map(|a| a.half).sum();
    let mut cos = Vec::with_capacity(ids.len() * half);
    let mut sin = Vec::with_capacity(ids.len() * half);
    for id in ids {
        for (table, &pos) in axes.iter().zip(id) {
            let (c, s) = table.row(pos);
            cos.extend_from_slice(c);
            sin.extend_from_slice(s);
        }
    }
    Ok(Rope {
        cos: Tensor::from_vec(cos, (ids.len(), half), dev)?,
        sin: Tensor::from_vec(sin, (ids.len(), half), dev)?,
    })
}

/// One axis's cos and sin rows (`half` frequencies each) for the distinct positions it takes.
struct AxisTable {
    half: usize,
    positions: Vec<u32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl AxisTable {
    fn new(positions: impl Iterator<Item = u32>, dim: usize, theta: f64) -> Self {
        let half = dim / 2;
        let mut positions: Vec<u32> = positions.collect();
        positions.sort_unstable();
        positions.dedup();
        let omegas: Vec<f64> = (0..half)
            .map(|j| 1.0 / theta.powf((2 * j) as f64 / dim as f64))
            .collect();
        let angles = || {
            positions
                .iter()
                .flat_map(|&p| omegas.iter().map(move |&w| p as f32 as f64 * w))
        };
        let cos = angles().map(|a| a.cos() as f32).collect();
        let sin = angles().map(|a| a.sin() as f32).collect();
        Self {
            half,
            positions,
            cos,
            sin,
        }
    }

    fn row(&self, pos: u32) -> (&[f32], &[f32]) {
        let i = self
            .positions
            .binary_search(&pos)
            .expect("the table holds every position of its ids");
        let cols = i * self.half..(i + 1) * self.half;
        (&self.cos[cols.clone()], &self.sin[cols])
    }
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

    /// The per-axis tables give exactly the angle-per-token-and-frequency values.
    #[test]
    fn rope_rows_equal_one_angle_per_token_and_frequency() {
        let mut ids = text_ids(7);
        ids.extend(grid_ids(0, 3, 5));
        ids.extend(grid_ids(20, 2, 4));
        let (axes, theta) = ([6, 10, 10, 6], 2000.0);
        let r = rope(&ids, &axes, theta, &Device::Cpu).unwrap();
        let (cos, sin) = (
            r.cos.to_vec2::<f32>().unwrap(),
            r.sin.to_vec2::<f32>().unwrap(),
        );
        for (t, id) in ids.iter().enumerate() {
            let angles: Vec<f64> = axes
                .iter()
                .enumerate()
                .flat_map(|(a, &dim)| {
                    (0..dim / 2).map(move |j| {
                        id[a] as f32 as f64 * (1.0 / theta.powf((2 * j) as f64 / dim as f64))
                    })
                })
                .collect();
            let want_cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
            let want_sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
            assert_eq!(cos[t], want_cos, "cos of token {t}");
            assert_eq!(sin[t], want_sin, "sin of token {t}");
        }
    }
}
