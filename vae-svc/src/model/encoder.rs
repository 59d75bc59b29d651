//! The VAE encoder (diffusers `vae.py` `Encoder`, `double_z=True`): `conv_in`, the down
//! blocks (all but the last end with a downsampler), the mid block, then
//! `conv_out(silu(conv_norm_out(h)))` to twice the latent channels (mean and log-variance).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::{
    Config,
    blocks::{DownEncoderBlock2D, UNetMidBlock2D},
    config::NORM_EPS,
    layers::{Conv2d, Padding},
    norm::{GroupNorm, silu_conv},
    norm_stats::NormStats,
};

/// Image -> latent moments at 1/8 resolution.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let last = ch[ch.len() - 1];
        let down_blocks = (0..ch.len())
            .map(|i| {
                let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                let add_downsample = i + 1 < ch.len();
                DownEncoderBlock2D::new(
                    cfg,
                    c_in,
                    ch[i],
                    add_downsample,
                    vb.pp("down_blocks").pp(i),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            conv_in: Conv2d::new(
                cfg,
                (cfg.in_channels, ch[0], 3),
                1,
                Padding::same(1),
                vb.pp("conv_in"),
            )?,
            down_blocks,
            mid_block: UNetMidBlock2D::new(cfg, last, vb.pp("mid_block"))?,
            conv_norm_out: GroupNorm::new(cfg, last, NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(
                cfg,
                (last, 2 * cfg.latent_channels, 3),
                1,
                Padding::same(1),
                vb.pp("conv_out"),
            )?,
        })
    }

    /// (B, 3, H, W) in [-1, 1] -> (B, 2 * latent_channels, H/8, W/8)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            h = block.forward(h)?;
        }
        h = self.mid_block.forward(h)?;
        silu_conv(
            &self.conv_norm_out,
            &self.conv_out,
            h,
            &mut NormStats::Local,
            None,
        )
    }
}
