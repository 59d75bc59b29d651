//! `ResnetBlock2D` without a time embedding (diffusers `resnet.py`, spec §1.4):
//! `h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h))); out = shortcut(x) + h`; on cuDNN's
//! TF32 paths each norm runs inside its convolution ([`silu_conv`]).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::{
    Config,
    config::NORM_EPS,
    layers::{Conv2d, Padding},
    norm::{GroupNorm, silu_conv},
    norm_stats::NormStats,
};

/// A ResNet block; `conv_shortcut` (1x1) exists when the width changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(cfg: &Config, c_in: usize, c_out: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let conv_shortcut = if c_in != c_out {
            Some(Conv2d::new(
                cfg,
                (c_in, c_out, 1),
                1,
                Padding::same(0),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(cfg, c_in, NORM_EPS, vb.pp("norm1"))?,
            conv1: Conv2d::new(cfg, (c_in, c_out, 3), 1, Padding::same(1), vb.pp("conv1"))?,
            norm2: GroupNorm::new(cfg, c_out, NORM_EPS, vb.pp("norm2"))?,
            conv2: Conv2d::new(cfg, (c_out, c_out, 3), 1, Padding::same(1), vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    /// The block with its convolutions in one TF32 pass ([`Conv2d::one_tf32_pass`]).
    pub fn one_tf32_pass(&self) -> Self {
        Self {
            conv1: self.conv1.one_tf32_pass(),
            conv2: self.conv2.one_tf32_pass(),
            conv_shortcut: self.conv_shortcut.as_ref().map(Conv2d::one_tf32_pass),
            ..self.clone()
        }
    }

    /// (B, C_in, H, W) -> (B, C_out, H, W), group-norm statistics from `stats`. Each
    /// intermediate is dropped as soon as the next one exists, so at most the input and three
    /// activations are alive at once.
    pub fn forward(&self, x: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        let h = silu_conv(&self.norm1, &self.conv1, x.clone(), stats, None)?;
        // The residual sum is written where the last convolution's bias is: conv2 adds the
        // input, or the 1x1 shortcut adds conv2's output (h's input is gone by then). h moves
        // into conv2's call, which drops it once norm2's output exists.
        match &self.conv_shortcut {
            Some(shortcut) => {
                let h = silu_conv(&self.norm2, &self.conv2, h, stats, None)?;
                shortcut.forward_add(x, Some(&h))
            }
            None => silu_conv(&self.norm2, &self.conv2, h, stats, Some(x)),
        }
    }
}
