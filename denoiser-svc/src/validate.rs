//! `DenoiseRequest` → [`ValidDenoiseRequest`]: every field checked before any work is queued.
//! Failures are [`DenoiseError::Validation`] naming the field (→ `INVALID_ARGUMENT`).

use candle_core::{DType, Device, Tensor};
use klein_proto::{
    pb::{self, denoise_request},
    tensor::{Limits, decode_required, first_non_finite},
};

use crate::{
    embeddings::Embeddings,
    error::DenoiseError,
    sampler::{Grid, Shift},
};

/// Text tokens every prompt embedding carries (the pipeline pads to exactly 512, §7.2).
pub const TEXT_TOKENS: usize = 512;
/// Largest step count.
pub const MAX_STEPS: u32 = 200;
/// Image pixels along a side of one latent token (VAE ×8, 2×2 patches).
pub const PIXELS_PER_TOKEN: usize = 16;

/// What requests are checked against: the loaded model and the configured limits.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub model_id: String,
    pub is_distilled: bool,
    /// Width of the prompt embeddings (`joint_attention_dim`).
    pub context_dim: usize,
    /// Latent channels per token (`in_channels`, 128).
    pub channels: usize,
    pub max_batch: usize,
    pub max_image_side: usize,
    pub max_image_pixels: u64,
    pub max_references: usize,
    /// Names of the LoRA adapters requests may apply, sorted.
    pub adapters: Vec<String>,
}

/// Where the initial noise comes from.
#[derive(Debug, Clone)]
pub enum Noise {
    /// The documented CPU generator ([`crate::noise`]).
    Seed(u64),
    /// Explicit noise `[B, C, h, w]`.
    Tensor(Tensor),
}

/// The conditioning mode, tensors still in their wire dtype on the CPU.
#[derive(Debug, Clone)]
pub enum ValidMode {
    TextToImage,
    ImageToImage {
        image_latents: Tensor,
        strength: f32,
    },
    Inpaint {
        image_latents: Tensor,
        mask: Tensor,
        strength: f32,
    },
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub struct ValidDenoiseRequest {
    /// Id of the model that runs it.
    pub model: String,
    /// `[B, 512, C_ctx]`.
    pub prompt_embeds: Tensor,
    /// Negative embeddings and g, only when CFG applies (base model, g > 1).
    pub guidance: Option<(Tensor, f32)>,
    pub grid: Grid,
    pub num_steps: usize,
    pub noise: Noise,
    pub shift: Shift,
    pub mode: ValidMode,
    /// Each `[h_k·w_k, C]` with its grid.
    pub references: Vec<(Tensor, Grid)>,
    pub preview_every: usize,
    /// LoRA adapters applied unmerged, with their strengths, in order.
    pub loras: Vec<(String, f32)>,
    /// Non-fatal notes returned with the result.
    pub warnings: Vec<String>,
}

impl ValidDenoiseRequest {
    /// Batch size B.
    pub fn batch(&self) -> usize {
        self.prompt_embeds.dims()[0]
    }

    /// Tokens of one forward: text + noisy + every clean conditioning token.
    pub fn sequence_len(&self) -> usize {
        let source = match self.mode {
            ValidMode::Inpaint { .. } => self.grid.tokens(),
            _ => 0,
        };
        let refs: usize = self.references.iter().map(|(_, g)| g.tokens()).sum();
        TEXT_TOKENS + self.grid.tokens() + source + refs
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> DenoiseError {
    DenoiseError::invalid(field, reason)
}

/// Decodes a required float tensor, refusing other dtypes and non-finite values (found in the
/// wire bytes, without converting every element to f32 and copying it out to look).
fn float_tensor(wire: Option<&pb::Tensor>, field: &str) -> Result<Tensor, DenoiseError> {
    let t = decode_required(wire, field, &Device::Cpu, &Limits::default())?;
    if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Err(invalid(
            field,
            format!("dtype {:?}; expected f32, bf16 or f16", t.dtype()),
        ));
    }
    if let Some(i) = wire.and_then(first_non_finite) {
        let value = t
            .flatten_all()
            .and_then(|f| f.get(i))
            .and_then(|v| v.to_dtype(DType::F32))
            .and_then(|v| v.to_scalar::<f32>());
        let value = value.map_err(|e| invalid(field, e.to_string()))?;
        return Err(invalid(
            field,
            format!("element {i} is {value} (NaN or infinite)"),
        ));
    }
    Ok(t)
}

fn expect_shape(t: &Tensor, field: &str, want: &[usize], what: &str) -> Result<(), DenoiseError> {
    if t.dims() != want {
        return Err(invalid(
            field,
            format!("shape {:?}, expected {want:?} ({what})", t.dims()),
        ));
    }
    Ok(())
}

fn strength(s: f32, field: &str) -> Result<f32, DenoiseError> {
    if !(0.0..=1.0).contains(&s) {
        return Err(invalid(field, format!("{s} is outside [0, 1]")));
    }
    Ok(s)
}

impl RequestContext {
    fn grid(&self, g: Option<&pb::LatentGrid>, field: &str) -> Result<Grid, DenoiseError> {
        let g = g.ok_or_else(|| invalid(field, "is required"))?;
        let (h, w) = (g.height as usize, g.width as usize);
        if h == 0 || w == 0 {
            return Err(invalid(
                field,
                format!("{h}x{w} tokens; both sides must be >= 1"),
            ));
        }
        let side = self.max_image_side / PIXELS_PER_TOKEN;
        if h > side || w > side {
            return Err(invalid(
                field,
                format!(
                    "{h}x{w} tokens exceeds {side} tokens per side ({} px)",
                    self.max_image_side
                ),
            ));
        }
        if (h * w * 256) as u64 > self.max_image_pixels {
            return Err(invalid(
                field,
                format!("{h}x{w} tokens exceeds {} pixels", self.max_image_pixels),
            ));
        }
        Ok(Grid {
            height: h,
            width: w,
        })
    }

    /// `image_latents` of I2I / inpaint: `[B or 1, h·w, C]`.
    fn image_latents(
        &self,
        t: Option<&pb::Tensor>,
        field: &str,
        b: usize,
        grid: Grid,
    ) -> Result<Tensor, DenoiseError> {
        let t = float_tensor(t, field)?;
        let dims = t.dims().to_vec();
        let ok = dims.len() == 3
            && (dims[0] == b || dims[0] == 1)
            && dims[1] == grid.tokens()
            && dims[2] == self.channels;
        if !ok {
            return Err(invalid(
                field,
                format!(
                    "shape {dims:?}, expected [{b} or 1, {}, {}] for grid {}x{}",
                    grid.tokens(),
                    self.channels,
                    grid.height,
                    grid.width
                ),
            ));
        }
        Ok(t)
    }
}

/// The request's own embeddings (`prompt_embeds`, `negative_prompt_embeds`), checked.
pub fn embeddings(
    req: &pb::DenoiseRequest,
    ctx: &RequestContext,
) -> Result<Embeddings, DenoiseError> {
    let prompt = float_tensor(req.prompt_embeds.as_ref(), "prompt_embeds")?;
    let b = match *prompt.dims() {
        [b, TEXT_TOKENS, c] if c == ctx.context_dim => b,
        _ => {
            return Err(invalid(
                "prompt_embeds",
                format!(
                    "shape {:?}, expected [B, {TEXT_TOKENS}, {}] for this model",
                    prompt.dims(),
                    ctx.context_dim
                ),
            ));
        }
    };
    if b > ctx.max_batch {
        return Err(invalid(
            "prompt_embeds",
            format!("batch {b} exceeds the limit {}", ctx.max_batch),
        ));
    }
    let negative = match req.negative_prompt_embeds.as_ref() {
        Some(t) => {
            let t = float_tensor(Some(t), "negative_prompt_embeds")?;
            expect_shape(
                &t,
                "negative_prompt_embeds",
                prompt.dims(),
                "same as prompt_embeds",
            )?;
            Some(t)
        }
        None => None,
    };
    Ok(Embeddings { prompt, negative })
}

impl TryFrom<(pb::DenoiseRequest, &RequestContext)> for ValidDenoiseRequest {
    type Error = DenoiseError;

    fn try_from((req, ctx): (pb::DenoiseRequest, &RequestContext)) -> Result<Self, DenoiseError> {
        let embeddings = embeddings(&req, ctx)?;
        Self::try_from((req, ctx, embeddings))
    }
}

/// The request with embeddings checked before (its own, or those of an earlier request kept
/// under its `embeddings_handle`).
impl TryFrom<(pb::DenoiseRequest, &RequestContext, Embeddings)> for ValidDenoiseRequest {
    type Error = DenoiseError;

    fn try_from(
        (req, ctx, embeddings): (pb::DenoiseRequest, &RequestContext, Embeddings),
    ) -> Result<Self, DenoiseError> {
        if !req.model.is_empty() && req.model != ctx.model_id {
            return Err(invalid(
                "model",
                format!(
                    "unknown model {:?}; this service serves {:?}",
                    req.model, ctx.model_id
                ),
            ));
        }
        let Embeddings {
            prompt: prompt_embeds,
            negative,
        } = embeddings;
        // Kept embeddings were checked against the model they came with.
        let b = match *prompt_embeds.dims() {
            [b, TEXT_TOKENS, c] if c == ctx.context_dim && b <= ctx.max_batch => b,
            _ => {
                return Err(invalid(
                    "embeddings_handle",
                    format!(
                        "names embeddings of shape {:?}, not [B, {TEXT_TOKENS}, {}] for this model",
                        prompt_embeds.dims(),
                        ctx.context_dim
                    ),
                ));
            }
        };
        let grid = ctx.grid(req.grid.as_ref(), "grid")?;
        if req.num_steps == 0 || req.num_steps > MAX_STEPS {
            return Err(invalid(
                "num_steps",
                format!("{} is outside 1..={MAX_STEPS}", req.num_steps),
            ));
        }
        let mut warnings = Vec::new();
        let guidance = match req.guidance_scale {
            Some(g) if !g.is_finite() || g < 0.0 => {
                return Err(invalid(
                    "guidance_scale",
                    format!("{g} must be a finite number >= 0"),
                ));
            }
            Some(g) if g > 1.0 && ctx.is_distilled => {
                warnings.push(format!("guidance_scale {g} ignored: distilled model"));
                None
            }
            Some(g) if g > 1.0 => match negative {
                Some(neg) => Some((neg, g)),
                None => {
                    warnings.push(format!(
                        "guidance_scale {g} ignored: no negative_prompt_embeds"
                    ));
                    None
                }
            },
            _ => None,
        };
        let noise = match req.noise {
            Some(denoise_request::Noise::Seed(seed)) => Noise::Seed(seed),
            Some(denoise_request::Noise::InitialNoise(t)) => {
                let t = float_tensor(Some(&t), "initial_noise")?;
                expect_shape(
                    &t,
                    "initial_noise",
                    &[b, ctx.channels, grid.height, grid.width],
                    "[B, 128, h, w] of the grid",
                )?;
                Noise::Tensor(t)
            }
            None => return Err(invalid("noise", "either seed or initial_noise is required")),
        };
        let shift = match req.shift {
            None => Shift::Empirical,
            Some(s) if s.is_finite() && s > 0.0 => Shift::Fixed(s),
            Some(s) => return Err(invalid("shift", format!("{s} must be a finite number > 0"))),
        };
        let mode = match req.mode {
            None => ValidMode::TextToImage,
            Some(denoise_request::Mode::ImageToImage(m)) => ValidMode::ImageToImage {
                image_latents: ctx.image_latents(
                    m.image_latents.as_ref(),
                    "image_to_image.image_latents",
                    b,
                    grid,
                )?,
                strength: strength(m.strength, "image_to_image.strength")?,
            },
            Some(denoise_request::Mode::Inpaint(m)) => {
                let image_latents =
                    ctx.image_latents(m.image_latents.as_ref(), "inpaint.image_latents", b, grid)?;
                let mask = float_tensor(m.mask.as_ref(), "inpaint.mask")?;
                let dims = mask.dims().to_vec();
                if !(dims.len() == 3
                    && (dims[0] == b || dims[0] == 1)
                    && dims[1] == grid.tokens()
                    && dims[2] == 1)
                {
                    return Err(invalid(
                        "inpaint.mask",
                        format!(
                            "shape {dims:?}, expected [{b} or 1, {}, 1] (token grid {}x{})",
                            grid.tokens(),
                            grid.height,
                            grid.width
                        ),
                    ));
                }
                let values = mask
                    .flatten_all()
                    .and_then(|m| m.to_dtype(DType::F32))
                    .and_then(|m| m.to_vec1::<f32>())
                    .map_err(|e| invalid("inpaint.mask", e.to_string()))?;
                if values.iter().any(|v| !(0.0..=1.0).contains(v)) {
                    return Err(invalid("inpaint.mask", "values must lie in [0, 1]"));
                }
                ValidMode::Inpaint {
                    image_latents,
                    mask,
                    strength: strength(m.strength, "inpaint.strength")?,
                }
            }
        };
        if req.references.len() > ctx.max_references {
            return Err(invalid(
                "references",
                format!(
                    "{} references exceed the limit {}",
                    req.references.len(),
                    ctx.max_references
                ),
            ));
        }
        let mut references = Vec::with_capacity(req.references.len());
        for (k, r) in req.references.iter().enumerate() {
            let g = ctx.grid(r.grid.as_ref(), &format!("references[{k}].grid"))?;
            let field = format!("references[{k}].latents");
            let t = float_tensor(r.latents.as_ref(), &field)?;
            expect_shape(
                &t,
                &field,
                &[g.tokens(), ctx.channels],
                "[h_k * w_k, 128] of its grid",
            )?;
            references.push((t, g));
        }
        let loras = klein_proto::lora::check(&req.loras, &ctx.model_id, &ctx.adapters)
            .map_err(|r| invalid(&r.field, r.reason))?;
        Ok(Self {
            model: ctx.model_id.clone(),
            prompt_embeds,
            guidance,
            grid,
            num_steps: req.num_steps as usize,
            noise,
            shift,
            mode,
            references,
            preview_every: req.preview_every as usize,
            loras,
            warnings,
        })
    }
}
