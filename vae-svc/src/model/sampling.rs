//! Resolution changes between VAE stages (diffusers `downsampling.py` / `upsampling.py`).
//! - `Downsample2D`: zero-pad right and bottom by one (`F.pad(x, (0, 1, 0, 1))`, spec
//!   pitfall 18), then a 3x3 convolution with stride 2 and no further padding.
//! - `Upsample2D`: nearest-neighbour x2, then a 3x3 convolution with padding 1.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use klein_kernels::{ConvWeights, Prologue};

use super::{
    Config,
    layers::{Conv2d, Padding},
};

/// The asymmetric padding of the encoder's downsampler.
pub const DOWNSAMPLE_PADDING: Padding = Padding {
    top: 0,
    bottom: 1,
    left: 0,
    right: 1,
};

/// Halves height and width.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub fn new(cfg: &Config, channels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let conv = Conv2d::new(
            cfg,
            (channels, channels, 3),
            2,
            DOWNSAMPLE_PADDING,
            vb.pp("conv"),
        )?;
        Ok(Self { conv })
    }

    /// (B, C, H, W) -> (B, C, H/2, W/2)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// Doubles height and width.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
    /// Where cuDNN runs the convolution with TF32 arithmetic: its upsampling phases
    /// ([`klein_kernels::upsample_conv2d`]), four 2×2 filters over the input at its own size.
    phases: Option<ConvWeights>,
}

impl Upsample2D {
    pub fn new(cfg: &Config, channels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let vb = vb.pp("conv");
        let conv = Conv2d::new(
            cfg,
            (channels, channels, 3),
            1,
            Padding::same(1),
            vb.clone(),
        )?;
        let phases = if conv.runs_tf32_on_cudnn() {
            let weight = vb.get((channels, channels, 3, 3), "weight")?;
            let bias = vb.get(channels, "bias")?;
            Some(ConvWeights::new(
                klein_kernels::subpixel_weights(&weight)?,
                Tensor::cat(&[&bias; 4], 0)?,
                cfg.chunking.conv_precision,
            )?)
        } else {
            None
        };
        Ok(Self { conv, phases })
    }

    /// (B, C, H, W) -> (B, C, 2H, 2W). Where cuDNN runs TF32 arithmetic on the whole output in
    /// one band: the phases (16 products an output instead of 36, x read at its own size);
    /// otherwise the convolution of the upsampled x, on cuDNN reading x through the upsampling
    /// (no upsampled tensor).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(phases) = &self.phases
            && self.conv.fuses_prologue(x, true)?
        {
            return klein_kernels::upsample_conv2d(x, phases, self.conv.call(1));
        }
        let upsample = Prologue {
            affine: None,
            upsample: true,
        };
        self.conv.forward_prologue(x, &upsample, None)
    }
}
