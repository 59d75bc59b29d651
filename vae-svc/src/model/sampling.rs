//! Resolution changes between VAE stages (diffusers `downsampling.py` / `upsampling.py`).
//! - `Downsample2D`: zero-pad right and bottom by one (`F.pad(x, (0, 1, 0, 1))`, spec
//!   pitfall 18), then a 3x3 convolution with stride 2 and no further padding.
//! - `Upsample2D`: nearest-neighbour x2, then a 3x3 convolution with padding 1.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

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
}

impl Upsample2D {
    pub fn new(cfg: &Config, channels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let conv = Conv2d::new(
            cfg,
            (channels, channels, 3),
            1,
            Padding::same(1),
            vb.pp("conv"),
        )?;
        Ok(Self { conv })
    }

    /// The upsampler with its convolution in one TF32 pass ([`Conv2d::one_tf32_pass`]).
    pub fn one_tf32_pass(&self) -> Self {
        Self {
            conv: self.conv.one_tf32_pass(),
        }
    }

    /// (B, C, H, W) -> (B, C, 2H, 2W). Where cuDNN runs the convolution in TF32 arithmetic: its
    /// upsampling phases ([`klein_kernels::upsample_conv2d_banded`], four 2×2 filters over x at
    /// its own size: 16 products an output instead of 36), in bands of x's rows; otherwise
    /// (exact arithmetic, the CPU) the convolution of the upsampled x.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.conv.bands_in_place(x) {
            let rows = self.conv.upsampled_band_rows(x)?;
            let phases = self.conv.weights().upsampling_phases()?;
            return klein_kernels::upsample_conv2d_banded(x, &phases, self.conv.call(1), rows);
        }
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}
