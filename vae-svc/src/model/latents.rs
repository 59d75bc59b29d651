//! The latent layout the transformer works on (spec §4.5, pitfall 17):
//! - 2x2 patchify `[B, 32, 2h, 2w] -> [B, 128, h, w]`, packed channel `c * 4 + 2 * pi + pj`;
//! - BatchNorm statistics `bn.running_mean` / `bn.running_var` over the patchified channels
//!   (`(z - mean) / sqrt(var + eps)`; no FLUX.1 scale/shift), computed in the model dtype;
//! - token packing `[B, 128, h, w] <-> [B, h * w, 128]`, token index `r * w + c`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::Config;

/// (B, C, ph * h, pw * w) -> (B, C * ph * pw, h, w)
pub fn patchify(z: &Tensor, [ph, pw]: [usize; 2]) -> Result<Tensor> {
    let (b, c, hh, ww) = z.dims4()?;
    let (h, w) = (hh / ph, ww / pw);
    z.reshape(vec![b, c, h, ph, w, pw])?
        .permute(vec![0, 1, 3, 5, 2, 4])?
        .reshape((b, c * ph * pw, h, w))
}

/// (B, C * ph * pw, h, w) -> (B, C, ph * h, pw * w)
pub fn unpatchify(z: &Tensor, [ph, pw]: [usize; 2]) -> Result<Tensor> {
    let (b, cp, h, w) = z.dims4()?;
    let c = cp / (ph * pw);
    z.reshape(vec![b, c, ph, pw, h, w])?
        .permute(vec![0, 1, 4, 2, 5, 3])?
        .reshape((b, c, h * ph, w * pw))
}

/// (B, C, h, w) -> (B, h * w, C)
pub fn pack(z: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = z.dims4()?;
    z.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// (B, h * w, C) -> (B, C, h, w)
pub fn unpack(tokens: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (b, n, c) = tokens.dims3()?;
    if n != h * w {
        candle_core::bail!("unpack: {n} tokens do not fill a {h}x{w} grid");
    }
    tokens.transpose(1, 2)?.reshape((b, c, h, w))
}

/// The latent BatchNorm2d (affine=False): only its running statistics are used.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    running_mean: Tensor,
    /// `sqrt(running_var + eps)`, computed in the model dtype as diffusers does.
    std: Tensor,
}

impl BatchNorm {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let c = cfg.packed_channels();
        let running_mean = vb.get(c, "running_mean")?.reshape((1, c, 1, 1))?;
        let running_var = vb.get(c, "running_var")?.reshape((1, c, 1, 1))?;
        let std = (running_var + cfg.batch_norm_eps)?.sqrt()?;
        Ok(Self { running_mean, std })
    }

    /// (B, 128, h, w) -> (B, 128, h, w): `(z - mean) / std`
    pub fn normalize(&self, z: &Tensor) -> Result<Tensor> {
        z.broadcast_sub(&self.running_mean)?
            .broadcast_div(&self.std)
    }

    /// (B, 128, h, w) -> (B, 128, h, w): `z * std + mean`
    pub fn denormalize(&self, z: &Tensor) -> Result<Tensor> {
        z.broadcast_mul(&self.std)?
            .broadcast_add(&self.running_mean)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    #[test]
    fn patchify_uses_channel_c4_plus_2pi_plus_pj() {
        let z = Tensor::arange(0f32, 2. * 4. * 6., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 4, 6))
            .unwrap();
        let p = patchify(&z, [2, 2]).unwrap();
        assert_eq!(p.dims(), [1, 8, 2, 3]);
        for c in 0..2 {
            for pi in 0..2 {
                for pj in 0..2 {
                    for i in 0..2 {
                        for j in 0..3 {
                            let got: f32 = p
                                .i((0, c * 4 + 2 * pi + pj, i, j))
                                .unwrap()
                                .to_scalar()
                                .unwrap();
                            let want: f32 = z
                                .i((0, c, 2 * i + pi, 2 * j + pj))
                                .unwrap()
                                .to_scalar()
                                .unwrap();
                            assert_eq!(got, want);
                        }
                    }
                }
            }
        }
        let back = unpatchify(&p, [2, 2]).unwrap();
        let diff = (back - &z).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn pack_orders_tokens_row_major() {
        let z = Tensor::arange(0f32, 3. * 2. * 4., &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 2, 4))
            .unwrap();
        let t = pack(&z).unwrap();
        assert_eq!(t.dims(), [1, 8, 3]);
        let token5: Vec<f32> = t.i((0, 5)).unwrap().to_vec1().unwrap();
        let want: Vec<f32> = (0..3)
            .map(|c| z.i((0, c, 1, 1)).unwrap().to_scalar().unwrap())
            .collect();
        assert_eq!(token5, want);
        let back = unpack(&t, (2, 4)).unwrap();
        let diff = (back - &z).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert!(unpack(&t, (3, 3)).is_err());
    }
}
