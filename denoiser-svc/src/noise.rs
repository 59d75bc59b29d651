//! Initial noise from a seed, drawn on the CPU so that one seed gives the same noise on every
//! device, replica and build.
//!
//! The generator is fully specified here (no third-party distribution whose algorithm could
//! change between versions):
//! - batch item `b` uses the seed `seed + b` (wrapping), expanded into a 256-bit state with
//!   SplitMix64 (four outputs, in order);
//! - uniform 64-bit words come from xoshiro256++ (Blackman & Vigna, 2019);
//! - each word becomes a uniform `u = (w >> 11 + 0.5) · 2⁻⁵³` in (0, 1);
//! - normal pairs come from Box–Muller in f64 on consecutive uniforms `(u1, u2)`:
//!   `r = sqrt(-2 ln u1)`, `z0 = r cos(2π u2)`, `z1 = r sin(2π u2)`, rounded to f32;
//! - values fill the item's `[128, h, w]` block in row-major order.
//!
//! torch's generator cannot be reproduced here; parity tests pass explicit noise instead.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

/// SplitMix64, used only to expand a seed into a xoshiro state.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256++.
struct Xoshiro256pp([u64; 4]);

impl Xoshiro256pp {
    fn seeded(seed: u64) -> Self {
        let mut sm = seed;
        Self([
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in the open interval (0, 1).
    fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }
}

/// `count` standard normal values for one seed. The uniforms come from the one sequential
/// stream, a chunk at a time; each chunk's Box–Muller transforms (a logarithm, a square root
/// and a sine / cosine pair in f64 per pair, ~6 ms of one core at 1024²) run on the thread pool
/// while the stream goes on, which changes no value.
pub fn normal(seed: u64, count: usize) -> Vec<f32> {
    let mut rng = Xoshiro256pp::seeded(seed);
    let mut out = vec![0f32; 2 * count.div_ceil(2)];
    rayon::scope(|s| {
        for o in out.chunks_mut(2 * PAIRS_PER_TASK) {
            let uniforms: Vec<(f64, f64)> = (0..o.len() / 2)
                .map(|_| (rng.next_open01(), rng.next_open01()))
                .collect();
            s.spawn(move |_| box_muller(&uniforms, o));
        }
    });
    out.truncate(count);
    out
}

/// Normal pairs a pool task transforms (its uniforms: 128 KiB).
const PAIRS_PER_TASK: usize = 8192;

/// Normal pairs from uniform pairs: `r = sqrt(-2 ln u1)`, `(r cos 2πu2, r sin 2πu2)`.
fn box_muller(uniforms: &[(f64, f64)], out: &mut [f32]) {
    for (&(u1, u2), o) in uniforms.iter().zip(out.chunks_exact_mut(2)) {
        let r = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        o[0] = (r * angle.cos()) as f32;
        o[1] = (r * angle.sin()) as f32;
    }
}

/// Noise `[batch, channels, h, w]` f32 on the CPU; item `b` from seed `seed + b`.
pub fn seeded_noise(
    seed: u64,
    batch: usize,
    channels: usize,
    h: usize,
    w: usize,
) -> Result<Tensor> {
    let per_item = channels * h * w;
    let data: Vec<f32> = (0..batch as u64)
        .flat_map(|b| normal(seed.wrapping_add(b), per_item))
        .collect();
    Tensor::from_vec(data, (batch, channels, h, w), &Device::Cpu)
}

/// [`seeded_noise`] laid out as the sampler's tokens, `[batch, h·w, channels]` (what
/// `sampler::pack` makes of it): the planes are transposed on the thread pool, not through a
/// strided copy on one core (1.6–2.7 ms of a 1024² request's preparation on an H200 host).
pub fn seeded_tokens(
    seed: u64,
    batch: usize,
    channels: usize,
    h: usize,
    w: usize,
) -> Result<Tensor> {
    let hw = h * w;
    let mut data = vec![0f32; batch * hw * channels];
    if !data.is_empty() {
        for (b, item) in data.chunks_mut(hw * channels).enumerate() {
            let planes = normal(seed.wrapping_add(b as u64), channels * hw);
            planes_to_tokens(&planes, item, channels, hw);
        }
    }
    Tensor::from_vec(data, (batch, hw, channels), &Device::Cpu)
}

/// Tokens a pool task transposes.
const TOKENS_PER_TASK: usize = 256;

/// `tokens[p · channels + k] = planes[k · hw + p]`, runs of tokens on the thread pool.
fn planes_to_tokens(planes: &[f32], tokens: &mut [f32], channels: usize, hw: usize) {
    tokens
        .par_chunks_mut(TOKENS_PER_TASK * channels)
        .enumerate()
        .for_each(|(i, run)| {
            for (j, token) in run.chunks_mut(channels).enumerate() {
                let p = i * TOKENS_PER_TASK + j;
                for (k, v) in token.iter_mut().enumerate() {
                    *v = planes[k * hw + p];
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoshiro_matches_the_reference_sequence() {
        // xoshiro256++ from state [1, 2, 3, 4] (reference implementation output).
        let mut rng = Xoshiro256pp([1, 2, 3, 4]);
        let got: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(got, vec![41943041, 58720359, 3588806011781223]);
    }

    #[test]
    fn chunked_transforms_equal_one_sequential_pass() {
        let count = 5 * PAIRS_PER_TASK + 3;
        let mut rng = Xoshiro256pp::seeded(11);
        let uniforms: Vec<(f64, f64)> = (0..count.div_ceil(2))
            .map(|_| (rng.next_open01(), rng.next_open01()))
            .collect();
        let mut want = vec![0f32; 2 * uniforms.len()];
        box_muller(&uniforms, &mut want);
        want.truncate(count);
        assert_eq!(normal(11, count), want);
    }

    #[test]
    fn noise_is_deterministic_per_item_and_roughly_standard() {
        let a = normal(7, 10_001);
        assert_eq!(a, normal(7, 10_001));
        assert_ne!(a[..8], normal(8, 8)[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        let t = seeded_noise(7, 2, 2, 3, 3).unwrap();
        let items = t.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(items[0], normal(7, 18));
        assert_eq!(items[1], normal(8, 18));
    }

    #[test]
    fn tokens_are_the_packed_noise() {
        // 700 tokens: runs of at least 256 tokens, the last one shorter.
        for (batch, channels, h, w) in [(2, 3, 5, 7), (1, 128, 20, 35), (1, 4, 1, 1)] {
            let tokens = seeded_tokens(9, batch, channels, h, w).unwrap();
            let packed =
                crate::sampler::pack(&seeded_noise(9, batch, channels, h, w).unwrap()).unwrap();
            assert_eq!(tokens.dims(), packed.dims());
            assert_eq!(
                tokens.to_vec3::<f32>().unwrap(),
                packed.to_vec3::<f32>().unwrap(),
                "{batch}×{channels}×{h}×{w}"
            );
        }
    }
}
