//! The VAE decoder (diffusers `vae.py` `Decoder`): `conv_in`, the mid block, the up blocks
//! over the reversed widths (all but the last end with an upsampler), then
//! `conv_out(silu(conv_norm_out(h)))` to RGB.

use candle_core::{Result, Tensor, bail};
use candle_nn::VarBuilder;

use super::{
    Config,
    blocks::{UNetMidBlock2D, UpDecoderBlock2D},
    config::NORM_EPS,
    layers::{Conv2d, Padding},
    norm::{GroupNorm, silu_conv},
    norm_stats::NormStats,
};

/// Latent at 1/8 resolution -> image.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let rev: Vec<usize> = cfg.decoder_channels().iter().rev().copied().collect();
        let up_blocks = (0..rev.len())
            .map(|i| {
                let c_in = if i == 0 { rev[0] } else { rev[i - 1] };
                let add_upsample = i + 1 < rev.len();
                UpDecoderBlock2D::new(cfg, c_in, rev[i], add_upsample, vb.pp("up_blocks").pp(i))
            })
            .collect::<Result<_>>()?;
        let first = rev[rev.len() - 1];
        Ok(Self {
            conv_in: Conv2d::new(
                cfg,
                (cfg.latent_channels, rev[0], 3),
                1,
                Padding::same(1),
                vb.pp("conv_in"),
            )?,
            mid_block: UNetMidBlock2D::new(cfg, rev[0], vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: GroupNorm::new(cfg, first, NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(
                cfg,
                (first, cfg.out_channels, 3),
                1,
                Padding::same(1),
                vb.pp("conv_out"),
            )?,
        })
    }

    /// (B, latent_channels, h, w) -> (B, 3, 8h, 8w), roughly in [-1, 1]
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.forward_up_from(self.forward_mid(z)?, 0, &mut NormStats::Local)
    }

    /// `conv_in` and the mid block: the part with global context (attention), at latent
    /// resolution. (B, latent_channels, h, w) -> (B, C, h, w)
    pub fn forward_mid(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        self.mid_block.forward(h)
    }

    /// The decoder with the convolutions of its up blocks and output layers in one TF32 pass
    /// ([`Conv2d::one_tf32_pass`]).
    pub fn up_in_one_tf32_pass(&self) -> Self {
        Self {
            up_blocks: self
                .up_blocks
                .iter()
                .map(UpDecoderBlock2D::one_tf32_pass)
                .collect(),
            conv_out: self.conv_out.one_tf32_pass(),
            ..self.clone()
        }
    }

    /// The first `blocks` up blocks on the mid block's output, the last of them without its
    /// upsampler, with the group norms' own statistics: the whole image's where `x` is the
    /// whole image. `blocks = 0` returns `x`. (B, C, h, w) -> (B, C_k, 2^(k−1)·h, 2^(k−1)·w)
    pub fn forward_up_to(&self, x: Tensor, blocks: usize) -> Result<Tensor> {
        self.check_blocks(blocks)?;
        let mut h = x;
        for (i, block) in self.up_blocks.iter().take(blocks).enumerate() {
            h = block.forward_resnets(h, &mut NormStats::Local)?;
            if i + 1 < blocks {
                h = block.upsample(h)?;
            }
        }
        Ok(h)
    }

    /// The up blocks and the output layers after [`Self::forward_up_to`] with `blocks` (all of
    /// them with 0): that last block's upsampler, the later blocks and the output layers,
    /// group-norm statistics from `stats`. (B, C_k, h_k, w_k) -> (B, 3, H, W)
    pub fn forward_up_from(
        &self,
        x: Tensor,
        blocks: usize,
        stats: &mut NormStats,
    ) -> Result<Tensor> {
        self.check_blocks(blocks)?;
        let mut h = match blocks.checked_sub(1) {
            Some(last) => self.up_blocks[last].upsample(x)?,
            None => x,
        };
        for block in self.up_blocks.iter().skip(blocks) {
            h = block.forward(h, stats)?;
        }
        silu_conv(&self.conv_norm_out, &self.conv_out, h, stats, None)
    }

    fn check_blocks(&self, blocks: usize) -> Result<()> {
        if blocks > self.up_blocks.len() {
            bail!(
                "the decoder has {} up blocks, not {blocks}",
                self.up_blocks.len()
            );
        }
        Ok(())
    }
}
