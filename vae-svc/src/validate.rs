//! Wire requests -> validated requests. Every failure is a [`ValidationError`] naming the
//! field; nothing here panics on any input.
//!
//! Rules (spec §4.6 and the `vae.proto` contract):
//! - images are `[B, H, W, 3]`, u8 or f32; f32 values are finite and within [-1, 1];
//! - image sides (for Decode: `16 * grid`) are multiples of 16, at least 64, with an aspect
//!   ratio of at most 8;
//! - latents are `[B, h * w, 128]`, f32 or bf16, finite; the grid matches the token count;
//! - [`Limits`] (batch, side, area) are the service's configured limits.

use candle_core::{DType, Device, Tensor};
use klein_proto::{pb, tensor};

use crate::error::ValidationError;

/// Pixels per latent token along each side (8x VAE x 2x2 patchify).
pub const PIXELS_PER_TOKEN: usize = 16;
/// Smallest accepted image side, pixels.
pub const MIN_SIDE: usize = 64;
/// Largest accepted ratio between the long and the short side.
pub const MAX_ASPECT: usize = 8;
/// Channels of a packed latent token.
pub const PACKED_CHANNELS: usize = 128;

/// The service's configured size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most images (or latent sets) per request.
    pub max_batch: usize,
    /// Longest accepted image side, pixels.
    pub max_image_side: usize,
    /// Largest accepted image area, pixels.
    pub max_image_pixels: u64,
}

/// A checked Encode request.
#[derive(Debug, Clone)]
pub struct ValidEncodeRequest {
    /// `[B, H, W, 3]` on the CPU, u8 or f32 in [-1, 1].
    pub images: Tensor,
}

/// A checked Decode request.
#[derive(Debug, Clone)]
pub struct ValidDecodeRequest {
    /// `[B, h * w, 128]` on the CPU, f32 or bf16, finite.
    pub latents: Tensor,
    /// Token grid `(h, w)`.
    pub grid: (usize, usize),
    /// Decode tiled even when untiled would fit.
    pub force_tiling: bool,
}

fn invalid(field: &str, message: impl Into<String>) -> ValidationError {
    ValidationError::new(field, message)
}

/// Checks an image size in pixels against the fixed rules.
fn check_geometry(field: &str, height: usize, width: usize) -> Result<(), ValidationError> {
    for (name, side) in [("height", height), ("width", width)] {
        if side % PIXELS_PER_TOKEN != 0 {
            return Err(invalid(
                field,
                format!("{name} {side} px is not a multiple of {PIXELS_PER_TOKEN}"),
            ));
        }
        if side < MIN_SIDE {
            return Err(invalid(
                field,
                format!("{name} {side} px is below the minimum of {MIN_SIDE}"),
            ));
        }
    }
    if height.max(width) > MAX_ASPECT * height.min(width) {
        return Err(invalid(
            field,
            format!("aspect ratio of {width}x{height} px exceeds {MAX_ASPECT}:1"),
        ));
    }
    Ok(())
}

/// Checks batch and image size against the configured limits.
fn check_limits(
    (batch_field, batch): (&str, usize),
    (size_field, height, width): (&str, usize, usize),
    limits: &Limits,
) -> Result<(), ValidationError> {
    if batch > limits.max_batch {
        return Err(invalid(
            batch_field,
            format!("batch {batch} exceeds max_batch {}", limits.max_batch),
        ));
    }
    let side = height.max(width);
    if side > limits.max_image_side {
        return Err(invalid(
            size_field,
            format!(
                "image side {side} px exceeds max_image_side {}",
                limits.max_image_side
            ),
        ));
    }
    let pixels = (height as u64) * (width as u64);
    if pixels > limits.max_image_pixels {
        return Err(invalid(
            size_field,
            format!(
                "image area {width}x{height} px exceeds max_image_pixels {}",
                limits.max_image_pixels
            ),
        ));
    }
    Ok(())
}

/// The index and value of the first element that is not finite or lies outside `range`.
fn first_bad_value(
    field: &str,
    t: &Tensor,
    range: Option<(f32, f32)>,
) -> Result<Option<(usize, f32)>, ValidationError> {
    let values = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| invalid(field, e.to_string()))?;
    Ok(values
        .iter()
        .copied()
        .enumerate()
        .find(|&(_, v)| !v.is_finite() || range.is_some_and(|(lo, hi)| v < lo || v > hi)))
}

impl TryFrom<pb::VaeServiceEncodeRequest> for ValidEncodeRequest {
    type Error = ValidationError;

    fn try_from(req: pb::VaeServiceEncodeRequest) -> Result<Self, Self::Error> {
        const F: &str = "images";
        let images = tensor::decode_required(
            req.images.as_ref(),
            F,
            &Device::Cpu,
            &tensor::Limits::default(),
        )?;
        let &[_, h, w, c] = images.dims() else {
            return Err(invalid(
                F,
                format!(
                    "expected rank 4 [B, H, W, 3], got shape {:?}",
                    images.dims()
                ),
            ));
        };
        if c != 3 {
            return Err(invalid(
                F,
                format!("last dimension must be 3 (RGB channels), got {c}"),
            ));
        }
        match images.dtype() {
            DType::U8 => {}
            DType::F32 => {
                if let Some((i, v)) = first_bad_value(F, &images, Some((-1.0, 1.0)))? {
                    return Err(invalid(
                        F,
                        format!("f32 pixels must be finite and in [-1, 1]; element {i} is {v}"),
                    ));
                }
            }
            other => {
                return Err(invalid(
                    F,
                    format!("dtype must be u8 or f32, got {other:?}"),
                ));
            }
        }
        check_geometry(F, h, w)?;
        Ok(Self { images })
    }
}

impl ValidEncodeRequest {
    /// (batch, height, width) in pixels.
    pub fn dims(&self) -> (usize, usize, usize) {
        let d = self.images.dims();
        (d[0], d[1], d[2])
    }

    /// Applies the configured limits.
    pub fn within(self, limits: &Limits) -> Result<Self, ValidationError> {
        let (b, h, w) = self.dims();
        check_limits(("images", b), ("images", h, w), limits)?;
        Ok(self)
    }
}

impl TryFrom<pb::DecodeRequest> for ValidDecodeRequest {
    type Error = ValidationError;

    fn try_from(req: pb::DecodeRequest) -> Result<Self, Self::Error> {
        const F: &str = "latents";
        let latents = tensor::decode_required(
            req.latents.as_ref(),
            F,
            &Device::Cpu,
            &tensor::Limits::default(),
        )?;
        let &[_, n, c] = latents.dims() else {
            return Err(invalid(
                F,
                format!(
                    "expected rank 3 [B, h * w, 128], got shape {:?}",
                    latents.dims()
                ),
            ));
        };
        if !matches!(latents.dtype(), DType::F32 | DType::BF16) {
            return Err(invalid(
                F,
                format!("dtype must be f32 or bf16, got {:?}", latents.dtype()),
            ));
        }
        if c != PACKED_CHANNELS {
            return Err(invalid(
                F,
                format!("last dimension must be {PACKED_CHANNELS} channels, got {c}"),
            ));
        }
        let grid = req.grid.ok_or_else(|| invalid("grid", "is required"))?;
        if grid.height == 0 {
            return Err(invalid("grid.height", "must be >= 1"));
        }
        if grid.width == 0 {
            return Err(invalid("grid.width", "must be >= 1"));
        }
        let (h, w) = (grid.height as usize, grid.width as usize);
        if (h as u64) * (w as u64) != n as u64 {
            return Err(invalid(
                "grid",
                format!(
                    "{h} x {w} = {} tokens, but latents hold {n} tokens per image",
                    h as u64 * w as u64
                ),
            ));
        }
        check_geometry("grid", h * PIXELS_PER_TOKEN, w * PIXELS_PER_TOKEN)?;
        if let Some((i, v)) = first_bad_value(F, &latents, None)? {
            return Err(invalid(
                F,
                format!("values must be finite; element {i} is {v}"),
            ));
        }
        Ok(Self {
            latents,
            grid: (h, w),
            force_tiling: req.force_tiling,
        })
    }
}

impl ValidDecodeRequest {
    /// Images in the request.
    pub fn batch(&self) -> usize {
        self.latents.dims()[0]
    }

    /// Output size (height, width) in pixels.
    pub fn pixels(&self) -> (usize, usize) {
        (
            self.grid.0 * PIXELS_PER_TOKEN,
            self.grid.1 * PIXELS_PER_TOKEN,
        )
    }

    /// Applies the configured limits.
    pub fn within(self, limits: &Limits) -> Result<Self, ValidationError> {
        let (h, w) = self.pixels();
        check_limits(("latents", self.batch()), ("grid", h, w), limits)?;
        Ok(self)
    }
}
