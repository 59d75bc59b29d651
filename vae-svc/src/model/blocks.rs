//! The stage blocks (diffusers `unet_2d_blocks.py`): `DownEncoderBlock2D`,
//! `UpDecoderBlock2D` and `UNetMidBlock2D` (ResNet, attention, ResNet).
//!
//! Blocks take their input by value so that it is freed as soon as the first ResNet has run.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::{
    Config,
    attention::Attention,
    norm_stats::NormStats,
    resnet::ResnetBlock2D,
    sampling::{Downsample2D, Upsample2D},
};

/// `layers_per_block` ResNets, then an optional stride-2 downsampler.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsamplers: Vec<Downsample2D>,
}

impl DownEncoderBlock2D {
    pub fn new(
        cfg: &Config,
        c_in: usize,
        c_out: usize,
        add_downsample: bool,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let resnets = (0..cfg.layers_per_block)
            .map(|j| {
                let c = if j == 0 { c_in } else { c_out };
                ResnetBlock2D::new(cfg, c, c_out, vb.pp("resnets").pp(j))
            })
            .collect::<Result<_>>()?;
        let downsamplers = if add_downsample {
            vec![Downsample2D::new(cfg, c_out, vb.pp("downsamplers").pp(0))?]
        } else {
            vec![]
        };
        Ok(Self {
            resnets,
            downsamplers,
        })
    }

    /// (B, C_in, H, W) -> (B, C_out, H', W'), H' = H/2 with a downsampler.
    pub fn forward(&self, x: Tensor) -> Result<Tensor> {
        let mut h = x;
        for resnet in &self.resnets {
            h = resnet.forward(&h, &mut NormStats::Local)?;
        }
        for down in &self.downsamplers {
            h = down.forward(&h)?;
        }
        Ok(h)
    }
}

/// `layers_per_block + 1` ResNets, then an optional nearest x2 upsampler.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsamplers: Vec<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn new(
        cfg: &Config,
        c_in: usize,
        c_out: usize,
        add_upsample: bool,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let resnets = (0..cfg.layers_per_block + 1)
            .map(|j| {
                let c = if j == 0 { c_in } else { c_out };
                ResnetBlock2D::new(cfg, c, c_out, vb.pp("resnets").pp(j))
            })
            .collect::<Result<_>>()?;
        let upsamplers = if add_upsample {
            vec![Upsample2D::new(cfg, c_out, vb.pp("upsamplers").pp(0))?]
        } else {
            vec![]
        };
        Ok(Self {
            resnets,
            upsamplers,
        })
    }

    /// The block with its convolutions in one TF32 pass ([`ResnetBlock2D::one_tf32_pass`]).
    pub fn one_tf32_pass(&self) -> Self {
        Self {
            resnets: self
                .resnets
                .iter()
                .map(ResnetBlock2D::one_tf32_pass)
                .collect(),
            upsamplers: self
                .upsamplers
                .iter()
                .map(Upsample2D::one_tf32_pass)
                .collect(),
        }
    }

    /// (B, C_in, H, W) -> (B, C_out, H', W'), H' = 2H with an upsampler; group-norm
    /// statistics from `stats`.
    pub fn forward(&self, x: Tensor, stats: &mut NormStats) -> Result<Tensor> {
        self.upsample(self.forward_resnets(x, stats)?)
    }

    /// The ResNets alone: (B, C_in, H, W) -> (B, C_out, H, W).
    pub fn forward_resnets(&self, x: Tensor, stats: &mut NormStats) -> Result<Tensor> {
        let mut h = x;
        for resnet in &self.resnets {
            h = resnet.forward(&h, stats)?;
        }
        Ok(h)
    }

    /// The upsampler alone (the identity in a block without one).
    pub fn upsample(&self, x: Tensor) -> Result<Tensor> {
        let mut h = x;
        for up in &self.upsamplers {
            h = up.forward(&h)?;
        }
        Ok(h)
    }
}

/// ResNet, attention (when `mid_block_add_attention`), ResNet; width unchanged.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
}

impl UNetMidBlock2D {
    pub fn new(cfg: &Config, channels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let resnets = (0..2)
            .map(|j| ResnetBlock2D::new(cfg, channels, channels, vb.pp("resnets").pp(j)))
            .collect::<Result<_>>()?;
        let attentions = if cfg.mid_block_add_attention {
            vec![Attention::new(cfg, channels, vb.pp("attentions").pp(0))?]
        } else {
            vec![]
        };
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// (B, C, H, W) -> (B, C, H, W)
    pub fn forward(&self, x: Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(&x, &mut NormStats::Local)?;
        drop(x);
        for attn in &self.attentions {
            h = attn.forward(&h)?;
        }
        self.resnets[1].forward(&h, &mut NormStats::Local)
    }
}
