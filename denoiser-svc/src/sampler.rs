//! The flow-matching Euler sampler (spec §4, §5): pure and generic over the velocity model.
//!
//! - [`sigmas`]: the FLUX.2 empirical-mu schedule (mu jumps at 4300 image tokens) or a fixed
//!   classic shift, computed in f32 as diffusers' scheduler does;
//! - [`Run`]: one request's sampling state, advanced one step at a time by [`Run::step`] (the
//!   engine interleaves, cancels and reports between steps). Modes: text-to-image,
//!   image-to-image (strength → start index, image latents noised to the start sigma),
//!   inpainting as diffusers' `Flux2KleinInpaintPipeline` (per-step blend with the source
//!   re-noised to the next sigma, clean on the last step, source also given as clean t=10
//!   reference tokens), multi-reference editing (clean tokens at t = 10 + 10k, output sliced to
//!   the noisy tokens) and classifier-free guidance `v = v_u + g (v_c − v_u)`.
//!
//! Latents live in the model dtype between steps and every elementwise op rounds to it, in the
//! reference's order (spec §4.4, §7.1): parity with a bf16 diffusers run needs it.

use candle_core::{DType, Result, Tensor};

use crate::model::{
    Flux2Transformer2DModel, PositionId, Rope, embeddings::round_to, grid_ids, text_ids,
};

/// What the sampler needs from a denoiser: a velocity for packed tokens.
pub trait Velocity {
    /// Per-run position data prepared once (the RoPE tables for the transformer).
    type Positions;

    /// Prepares the positions of `[text; noisy image; references]` tokens.
    fn positions(&self, layout: &TokenLayout) -> Result<Self::Positions>;

    /// Velocity of the first `outputs` tokens of `x` (B, N_total, C) — the noisy ones, before
    /// any references — conditioned on `context` (B, L, C_ctx) at the pipeline timesteps
    /// `t = σ·1000`, one per batch item. → (B, outputs, C)
    fn velocity(
        &self,
        x: &Tensor,
        context: &Tensor,
        timesteps: &[f32],
        positions: &Self::Positions,
        outputs: usize,
    ) -> Result<Tensor>;
}

impl Velocity for Flux2Transformer2DModel {
    type Positions = Rope;

    fn positions(&self, layout: &TokenLayout) -> Result<Rope> {
        // The model's device is the one every input tensor lives on; the tables are built there.
        self.rope(&layout.ids(), &layout.device)
    }

    fn velocity(
        &self,
        x: &Tensor,
        context: &Tensor,
        timesteps: &[f32],
        rope: &Rope,
        outputs: usize,
    ) -> Result<Tensor> {
        self.forward_first(x, context, timesteps, rope, outputs)
    }
}

/// A latent token grid (image pixels / 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Grid {
    pub height: usize,
    pub width: usize,
}

impl Grid {
    /// Tokens in the grid.
    pub fn tokens(&self) -> usize {
        self.height * self.width
    }
}

/// The token sequence one forward sees: text, the noisy grid, then clean conditioning grids
/// (reference k at time offset 10 + 10k).
#[derive(Debug, Clone)]
pub struct TokenLayout {
    pub text_len: usize,
    pub grid: Grid,
    pub conditions: Vec<Grid>,
    pub device: candle_core::Device,
}

impl TokenLayout {
    /// Position ids `[text; noisy; conditions]` (§2.5).
    pub fn ids(&self) -> Vec<PositionId> {
        let mut ids = text_ids(self.text_len);
        ids.extend(grid_ids(0, self.grid.height, self.grid.width));
        for (k, g) in self.conditions.iter().enumerate() {
            ids.extend(grid_ids(10 + 10 * k as u32, g.height, g.width));
        }
        ids
    }
}

/// How the sigma schedule is shifted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shift {
    /// FLUX.2's empirical mu from the image token count and the step count (§4.3).
    Empirical,
    /// The classic fixed shift `s σ / (1 + (s − 1) σ)` (the seed's 3.0).
    Fixed(f32),
}

/// `compute_empirical_mu` (§4.3), in f64 like the Python original.
pub fn empirical_mu(image_seq_len: usize, num_steps: usize) -> f64 {
    let (a1, b1) = (8.738_095_24e-5, 1.898_333_33);
    let (a2, b2) = (0.000_169_27, 0.456_666_66);
    let n = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * n + b2;
    }
    let m_200 = a2 * n + b2;
    let m_10 = a1 * n + b1;
    let a = (m_200 - m_10) / 190.0;
    let b = m_200 - 200.0 * a;
    a * num_steps as f64 + b
}

/// The scheduler's sigmas for `num_steps` steps: `num_steps + 1` values from 1 down to the
/// appended terminal 0, in f32 (`np.linspace(1, 1/N, N)` cast to f32, then shifted in f32).
pub fn sigmas(num_steps: usize, image_seq_len: usize, shift: Shift) -> Vec<f32> {
    let n = num_steps.max(1);
    let step = if n > 1 {
        (1.0 / n as f64 - 1.0) / (n - 1) as f64
    } else {
        0.0
    };
    let linear = (0..n).map(|i| {
        if i + 1 == n {
            1.0 / n as f64
        } else {
            1.0 + i as f64 * step
        }
    });
    let mut out: Vec<f32> = match shift {
        Shift::Empirical => {
            let e = empirical_mu(image_seq_len, num_steps).exp() as f32;
            linear.map(|s| e / (e + (1.0 / s as f32 - 1.0))).collect()
        }
        Shift::Fixed(k) => linear
            .map(|s| {
                let s = s as f32;
                k * s / (1.0 + (k - 1.0) * s)
            })
            .collect(),
    };
    out.push(0.0);
    out
}

/// Index of the first step actually run for `strength` in [0, 1]:
/// `int(max(N − min(N·strength, N), 0))` (diffusers `get_timesteps`). The f32 strength is read
/// as the decimal it prints as (0.7f32 → 0.7), so the rounding matches a Python float.
pub fn start_index(num_steps: usize, strength: f32) -> usize {
    let s: f64 = strength.to_string().parse().unwrap_or(strength as f64);
    let n = num_steps as f64;
    (n - (n * s).min(n)).max(0.0) as usize
}

/// `[B, C, h, w] → [B, h·w, C]` (token index r·w + c).
pub fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// Multiplies by a scalar already representable in `x`'s dtype, one rounding.
fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    x.affine(s as f64, 0.0)
}

/// `scale_noise`: `σ·noise + (1 − σ)·x0` with σ cast to the sample dtype first (§5.2).
pub fn scale_noise(x0: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    let dtype = x0.dtype();
    let s = round_to(dtype, sigma);
    scale(noise, s)? + scale(x0, round_to(dtype, 1.0 - s))?
}

/// One Euler step `x + (σ_next − σ)·v` in the scheduler's dtype order: the product is rounded
/// to the model dtype, the sum is done in f32 and rounded again (§4.4).
pub fn euler_step(x: &Tensor, v: &Tensor, sigma: f32, sigma_next: f32) -> Result<Tensor> {
    let dtype = x.dtype();
    let dt = sigma_next - sigma;
    let prod = scale(&v.to_dtype(DType::F32)?, dt)?.to_dtype(dtype)?;
    (x.to_dtype(DType::F32)? + prod.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// Classifier-free guidance `v_u + g·(v_c − v_u)`; `g·d` computed in f32 then rounded.
pub fn guide(v_cond: &Tensor, v_uncond: &Tensor, g: f32) -> Result<Tensor> {
    let dtype = v_cond.dtype();
    let d = (v_cond - v_uncond)?;
    v_uncond + scale(&d.to_dtype(DType::F32)?, g)?.to_dtype(dtype)?
}

/// The inpainting blend `(1 − m)·keep + m·latents`; `mask` (B or 1, N, 1).
pub fn blend(keep: &Tensor, latents: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let keep_weight = mask.affine(-1.0, 1.0)?;
    keep.broadcast_mul(&keep_weight)? + latents.broadcast_mul(mask)?
}

/// Classifier-free guidance inputs.
#[derive(Debug, Clone)]
pub struct Guidance {
    /// Negative embeddings (B, L, C_ctx).
    pub negative: Tensor,
    /// g > 1.
    pub scale: f32,
}

/// The conditioning mode.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Start from pure noise.
    TextToImage,
    /// Start from `image_latents` (B or 1, N, C) noised to the sigma chosen by `strength`.
    ImageToImage {
        image_latents: Tensor,
        strength: f32,
    },
    /// Repaint where `mask` (B or 1, N, 1) is 1, keep `image_latents` where it is 0.
    Inpaint {
        image_latents: Tensor,
        mask: Tensor,
        strength: f32,
    },
}

/// Everything one sampling run needs, on the model's device and in its dtype.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt embeddings (B, L, C_ctx).
    pub prompt_embeds: Tensor,
    /// CFG, for base models only.
    pub guidance: Option<Guidance>,
    /// Initial noise, packed (B, N, C).
    pub noise: Tensor,
    /// The output grid.
    pub grid: Grid,
    /// Clean reference tokens, each (N_k, C) with its grid.
    pub references: Vec<(Tensor, Grid)>,
    pub mode: Mode,
    /// Steps of the full schedule (before the strength cut).
    pub num_steps: usize,
    pub shift: Shift,
}

/// Per-step inpainting state.
struct Blend {
    x0: Tensor,
    mask: Tensor,
    noise: Tensor,
}

/// One request's sampling state.
pub struct Run<P> {
    sigmas: Vec<f32>,
    start: usize,
    index: usize,
    latents: Tensor,
    context: Tensor,
    guidance: Option<Guidance>,
    conditions: Option<Tensor>,
    blend: Option<Blend>,
    positions: P,
}

impl<P> Run<P> {
    /// Prepares a run: schedule, start latents, conditioning tokens and positions.
    pub fn new<M: Velocity<Positions = P>>(model: &M, req: Request) -> Result<Self> {
        let n_img = req.grid.tokens();
        let sigmas = sigmas(req.num_steps, n_img, req.shift);
        let (b, _, c) = req.noise.dims3()?;
        let expand = |t: &Tensor| -> Result<Tensor> {
            let (_, n, c) = t.dims3()?;
            t.broadcast_as((b, n, c))?.contiguous()
        };
        let mut conditions = Vec::new();
        let mut grids = Vec::new();
        let (start, latents, blend) = match req.mode {
            Mode::TextToImage => (0, req.noise, None),
            Mode::ImageToImage {
                image_latents,
                strength,
            } => {
                let start = start_index(req.num_steps, strength);
                let x0 = expand(&image_latents)?;
                (start, scale_noise(&x0, &req.noise, sigmas[start])?, None)
            }
            Mode::Inpaint {
                image_latents,
                mask,
                strength,
            } => {
                let start = start_index(req.num_steps, strength);
                let x0 = expand(&image_latents)?;
                let latents = scale_noise(&x0, &req.noise, sigmas[start])?;
                conditions.push(x0.clone());
                grids.push(req.grid);
                let blend = Blend {
                    x0,
                    mask,
                    noise: req.noise,
                };
                (start, latents, Some(blend))
            }
        };
        for (tokens, grid) in &req.references {
            conditions.push(
                tokens
                    .unsqueeze(0)?
                    .broadcast_as((b, grid.tokens(), c))?
                    .contiguous()?,
            );
            grids.push(*grid);
        }
        let layout = TokenLayout {
            text_len: req.prompt_embeds.dim(1)?,
            grid: req.grid,
            conditions: grids,
            device: latents.device().clone(),
        };
        let conditions = match conditions.len() {
            0 => None,
            _ => Some(Tensor::cat(&conditions, 1)?),
        };
        Ok(Self {
            positions: model.positions(&layout)?,
            sigmas,
            start,
            index: start,
            latents,
            context: req.prompt_embeds,
            guidance: req.guidance,
            conditions,
            blend,
        })
    }

    /// Steps this run executes (after the strength cut).
    pub fn total_steps(&self) -> usize {
        self.sigmas.len() - 1 - self.start
    }

    /// Steps finished so far.
    pub fn steps_done(&self) -> usize {
        self.index - self.start
    }

    /// Whether every step has run.
    pub fn is_finished(&self) -> bool {
        self.index + 1 >= self.sigmas.len()
    }

    /// The sigma the latents sit at now.
    pub fn sigma(&self) -> f32 {
        self.sigmas[self.index]
    }

    /// The current latents (B, N, C).
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }

    /// Consumes the run, returning the latents (B, N, C).
    pub fn into_latents(self) -> Tensor {
        self.latents
    }

    /// Runs one step. A finished run is left as it is.
    pub fn step<M: Velocity<Positions = P>>(&mut self, model: &M) -> Result<()> {
        if self.is_finished() {
            return Ok(());
        }
        let (i, last) = (self.index, self.sigmas.len() - 2);
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let (b, n, _) = self.latents.dims3()?;
        let t = vec![sigma * 1000.0; b];
        let x = match &self.conditions {
            Some(c) => Tensor::cat(&[&self.latents, c], 1)?,
            None => self.latents.clone(),
        };
        let mut v = model.velocity(&x, &self.context, &t, &self.positions, n)?;
        if let Some(g) = &self.guidance {
            let v_u = model.velocity(&x, &g.negative, &t, &self.positions, n)?;
            v = guide(&v, &v_u, g.scale)?;
        }
        let mut latents = euler_step(&self.latents, &v, sigma, next)?;
        if let Some(blend) = &self.blend {
            let keep = if i < last {
                scale_noise(&blend.x0, &blend.noise, next)?
            } else {
                blend.x0.clone()
            };
            latents = self::blend(&keep, &latents, &blend.mask)?;
        }
        self.latents = latents;
        self.index += 1;
        Ok(())
    }
}

/// Runs `req` to the end, calling `on_step(steps_done, total)` after each step.
pub fn sample<M: Velocity>(
    model: &M,
    req: Request,
    mut on_step: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let mut run = Run::new(model, req)?;
    while !run.is_finished() {
        run.step(model)?;
        on_step(run.steps_done(), run.total_steps());
    }
    Ok(run.into_latents())
}
