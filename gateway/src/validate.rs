//! `GenerateRequest` -> [`ValidGenerate`]: every field checked, defaults resolved and input
//! images decoded and prepared before any downstream call. Errors name the field.
//!
//! Decisions a user may wonder about:
//! - An empty prompt is allowed (unconditional generation, as diffusers allows it).
//! - Width and height must be multiples of 16 (diffusers silently floors; we refuse instead
//!   of returning a different size than asked). 0 means 1024, or the first reference's size.
//! - Inpainting takes its output size from the source image (floored to 16, capped to 1 MP);
//!   a width/height that disagrees is ignored with a warning, as diffusers does.
//! - `guidance_scale` on a distilled model is accepted and ignored with a warning.

use candle_core::DType;
use image::{GrayImage, RgbImage};
use klein_proto::{pb, tensor};

use crate::{
    config::Limits,
    error::GatewayError,
    image_io::{self, ImageLimits},
    preprocess,
};

/// What the gateway knows about a model (from the denoiser's Info).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCaps {
    /// Model id.
    pub id: String,
    /// Architecture family (`klein-4b`, ..., `custom`); empty when the denoiser did not say.
    pub variant: String,
    /// Encoder model id whose embeddings it takes ("" = the encoder's default).
    pub text_encoder: String,
    /// Step-distilled (no CFG, 4 steps by default).
    pub distilled: bool,
    /// Default step count.
    pub default_steps: u32,
    /// Default guidance scale.
    pub default_guidance: f32,
    /// LoRA adapters requests may apply to it, sorted.
    pub adapters: Vec<String>,
}

/// Conditioning mode after validation.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Text-to-image.
    TextToImage,
    /// Image-to-image: the init image at the output size.
    ImageToImage { image: RgbImage, strength: f32 },
    /// Inpainting: the source at the output size and the token-grid mask (1 = repaint).
    Inpaint {
        image: RgbImage,
        mask: Vec<f32>,
        strength: f32,
    },
}

/// A request that passed validation, with every default resolved.
#[derive(Debug, Clone)]
pub struct ValidGenerate {
    pub prompt: String,
    pub negative_prompt: String,
    pub model: ModelCaps,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    /// `Some(g)` when classifier-free guidance runs (base model, g > 1).
    pub cfg: Option<f32>,
    pub seed: u64,
    pub num_images: u32,
    pub mode: Mode,
    /// Prepared reference images (<= 1 MP, sides multiples of 16).
    pub references: Vec<RgbImage>,
    pub initial_noise: Option<pb::Tensor>,
    pub preview_every: u32,
    /// LoRA adapters of the model, with their strengths, in order.
    pub loras: Vec<(String, f32)>,
    pub warnings: Vec<String>,
}

/// Default strength of image-to-image.
pub const DEFAULT_I2I_STRENGTH: f32 = 0.75;
/// Default strength of inpainting.
pub const DEFAULT_INPAINT_STRENGTH: f32 = 1.0;

fn invalid(field: &str, reason: impl Into<String>) -> GatewayError {
    GatewayError::invalid(field, reason)
}

fn strength(value: Option<f32>, default: f32, field: &str) -> Result<f32, GatewayError> {
    let s = value.unwrap_or(default);
    if !s.is_finite() || !(0.0..=1.0).contains(&s) {
        return Err(invalid(field, format!("must be in [0, 1], got {s}")));
    }
    Ok(s)
}

fn image_limits(limits: &Limits) -> ImageLimits {
    ImageLimits {
        max_bytes: usize::try_from(limits.max_input_image_bytes.0).unwrap_or(usize::MAX),
        max_side: 16384,
        max_alloc: 1 << 30,
    }
}

fn check_side(field: &str, value: u32, limits: &Limits) -> Result<(), GatewayError> {
    if !value.is_multiple_of(16) {
        return Err(invalid(
            field,
            format!("must be a multiple of 16, got {value}"),
        ));
    }
    if value < limits.min_image_side || value > limits.max_image_side {
        return Err(invalid(
            field,
            format!(
                "must be in [{}, {}], got {value}",
                limits.min_image_side, limits.max_image_side
            ),
        ));
    }
    Ok(())
}

fn check_size(width: u32, height: u32, limits: &Limits) -> Result<(), GatewayError> {
    check_side("width", width, limits)?;
    check_side("height", height, limits)?;
    let area = u64::from(width) * u64::from(height);
    if area > limits.max_image_pixels {
        return Err(invalid(
            "width",
            format!(
                "{width}x{height} is {area} pixels, the limit is {}",
                limits.max_image_pixels
            ),
        ));
    }
    if width.max(height) > 8 * width.min(height) {
        return Err(invalid(
            "width",
            format!("aspect ratio of {width}x{height} exceeds 8"),
        ));
    }
    Ok(())
}

fn random_seed() -> u64 {
    let mut buf = [0u8; 8];
    // The OS RNG failing is not the client's problem; fall back to the clock.
    if getrandom::fill(&mut buf).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return nanos;
    }
    u64::from_le_bytes(buf)
}

/// Validates `req` against `limits` and the served `models` (the first is the default).
pub fn validate(
    req: pb::GenerateRequest,
    limits: &Limits,
    models: &[ModelCaps],
) -> Result<ValidGenerate, GatewayError> {
    let mut warnings = Vec::new();
    if req.prompt.len() > limits.max_prompt_bytes {
        return Err(invalid(
            "prompt",
            format!(
                "has {} bytes, the limit is {}",
                req.prompt.len(),
                limits.max_prompt_bytes
            ),
        ));
    }
    if req.negative_prompt.len() > limits.max_prompt_bytes {
        return Err(invalid(
            "negative_prompt",
            format!(
                "has {} bytes, the limit is {}",
                req.negative_prompt.len(),
                limits.max_prompt_bytes
            ),
        ));
    }
    let model = if req.model.is_empty() {
        models
            .first()
            .cloned()
            .ok_or_else(|| invalid("model", "no model is being served"))?
    } else {
        models
            .iter()
            .find(|m| m.id == req.model)
            .cloned()
            .ok_or_else(|| {
                let ids: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
                invalid(
                    "model",
                    format!(
                        "unknown model {:?}; available: {}",
                        req.model,
                        ids.join(", ")
                    ),
                )
            })?
    };
    let num_images = match req.num_images {
        0 => 1,
        n if n > limits.max_num_images => {
            return Err(invalid(
                "num_images",
                format!("must be at most {}, got {n}", limits.max_num_images),
            ));
        }
        n => n,
    };
    let steps = match req.num_steps {
        0 => model.default_steps,
        n if n > limits.max_steps => {
            return Err(invalid(
                "num_steps",
                format!("must be in [1, {}], got {n}", limits.max_steps),
            ));
        }
        n => n,
    };
    let cfg = match req.guidance_scale {
        Some(g) if !g.is_finite() || !(0.0..=100.0).contains(&g) => {
            return Err(invalid(
                "guidance_scale",
                format!("must be in [0, 100], got {g}"),
            ));
        }
        Some(_) if model.distilled => {
            warnings.push("guidance_scale ignored: distilled model".to_owned());
            None
        }
        g => Some(g.unwrap_or(model.default_guidance)).filter(|g| !model.distilled && *g > 1.0),
    };

    let img_limits = image_limits(limits);
    if req.reference_images.len() > limits.max_reference_images as usize {
        return Err(invalid(
            "reference_images",
            format!(
                "at most {} images, got {}",
                limits.max_reference_images,
                req.reference_images.len()
            ),
        ));
    }
    let mut references = Vec::with_capacity(req.reference_images.len());
    for (i, bytes) in req.reference_images.iter().enumerate() {
        let field = format!("reference_images[{i}]");
        let decoded = image_io::decode(bytes, &field, &img_limits)?;
        let prepared = preprocess::reference(&decoded.rgb);
        if prepared.width() < limits.min_image_side || prepared.height() < limits.min_image_side {
            return Err(invalid(
                &field,
                format!(
                    "is {}x{} after cropping to multiples of 16; both sides must be >= {}",
                    prepared.width(),
                    prepared.height(),
                    limits.min_image_side
                ),
            ));
        }
        references.push(prepared);
    }

    let (mut width, mut height) = (req.width, req.height);
    let mut mode = match req.mode {
        None => Mode::TextToImage,
        Some(pb::generate_request::Mode::ImageToImage(i2i)) => {
            let decoded = image_io::decode(&i2i.image, "image_to_image.image", &img_limits)?;
            let strength = strength(
                i2i.strength,
                DEFAULT_I2I_STRENGTH,
                "image_to_image.strength",
            )?;
            if width == 0 && height == 0 && references.is_empty() {
                (width, height) =
                    preprocess::inpaint_size(decoded.rgb.width(), decoded.rgb.height());
            }
            Mode::ImageToImage {
                image: decoded.rgb,
                strength,
            }
        }
        Some(pb::generate_request::Mode::Inpaint(inp)) => {
            let decoded = image_io::decode(&inp.image, "inpaint.image", &img_limits)?;
            let strength = strength(inp.strength, DEFAULT_INPAINT_STRENGTH, "inpaint.strength")?;
            let mask: GrayImage = if inp.mask.is_empty() {
                let alpha = decoded.alpha.as_ref().ok_or_else(|| {
                    invalid(
                        "inpaint.mask",
                        "is required when inpaint.image has no alpha channel",
                    )
                })?;
                preprocess::mask_from_alpha(alpha)
            } else {
                image_io::decode_mask(&inp.mask, "inpaint.mask", &img_limits)?
            };
            if mask.dimensions() != decoded.rgb.dimensions() {
                return Err(invalid(
                    "inpaint.mask",
                    format!(
                        "is {}x{} but inpaint.image is {}x{}",
                        mask.width(),
                        mask.height(),
                        decoded.rgb.width(),
                        decoded.rgb.height()
                    ),
                ));
            }
            let (w, h) = preprocess::inpaint_size(decoded.rgb.width(), decoded.rgb.height());
            if (width != 0 || height != 0) && (width, height) != (w, h) {
                warnings.push(format!(
                    "width/height ignored: inpainting outputs the image's size {w}x{h}"
                ));
            }
            (width, height) = (w, h);
            check_size(width, height, limits).map_err(|_| {
                invalid(
                    "inpaint.image",
                    format!(
                        "{w}x{h} (after flooring to multiples of 16) is outside the size limits"
                    ),
                )
            })?;
            let image = preprocess::inpaint_source(&decoded.rgb, w, h);
            let mask = preprocess::mask_to_token_grid(&mask, w, h);
            Mode::Inpaint {
                image,
                mask,
                strength,
            }
        }
    };
    if width == 0 && height == 0 {
        (width, height) = references
            .first()
            .map(|r| r.dimensions())
            .unwrap_or((1024, 1024));
    }
    check_size(width, height, limits)?;
    let loras = klein_proto::lora::check(&req.loras, &model.id, &model.adapters)
        .map_err(|r| invalid(&r.field, r.reason))?;
    if let Mode::ImageToImage { image, .. } = &mut mode {
        *image = preprocess::init_image(image, width, height);
    }
    finish(
        req.initial_noise,
        req.seed,
        ValidGenerate {
            prompt: req.prompt,
            negative_prompt: req.negative_prompt,
            model,
            width,
            height,
            steps,
            cfg,
            seed: 0,
            num_images,
            mode,
            references,
            initial_noise: None,
            preview_every: req.preview_every,
            loras,
            warnings,
        },
    )
}

/// Resolves the seed and checks the explicit noise against the final geometry.
fn finish(
    noise: Option<pb::Tensor>,
    seed: Option<u64>,
    mut valid: ValidGenerate,
) -> Result<ValidGenerate, GatewayError> {
    valid.seed = seed.unwrap_or_else(random_seed);
    if let Some(noise) = noise {
        let checked = tensor::check(&noise, &tensor::Limits::default())
            .map_err(|e| invalid("initial_noise", e.to_string()))?;
        let want = [
            valid.num_images as usize,
            128,
            (valid.height / 16) as usize,
            (valid.width / 16) as usize,
        ];
        if checked.shape != want {
            return Err(invalid(
                "initial_noise",
                format!(
                    "shape {:?} must be {want:?} (num_images, 128, height/16, width/16)",
                    checked.shape
                ),
            ));
        }
        if !matches!(checked.dtype, DType::F32 | DType::BF16) {
            return Err(invalid(
                "initial_noise",
                format!("dtype must be f32 or bf16, got {:?}", checked.dtype),
            ));
        }
        valid.initial_noise = Some(noise);
    }
    Ok(valid)
}
