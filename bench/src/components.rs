//! Component timings with random weights of the real klein-4B configs.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use denoiser_svc::{config::Quantize, lora::ResidentAdapters};
use klein_runtime::gpu_memory;
use serde::Serialize;

use crate::{model::Model, random::RandomWeights};

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub component: String,
    pub case: String,
    pub dtype: String,
    /// Median wall time of one call, milliseconds (device synchronised).
    pub median_ms: f64,
    pub min_ms: f64,
    /// Median time until the call returned, before the device finished: the host's cost of
    /// issuing the work. Near `median_ms`, the host is what limits the call.
    pub host_ms: f64,
    pub iters: usize,
    /// CUDA pool bytes in use before the call (the weights and inputs), GiB; `None` on the CPU.
    pub resident_gib: Option<f64>,
    /// Peak CUDA pool bytes above `resident_gib` during one call, plus the memory CUDA graphs
    /// held mapped (its activations), GiB.
    pub activation_gib: Option<f64>,
    /// The serving code's activation estimate for this call, GiB (what admission reserves).
    pub estimate_gib: f64,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Pool bytes in use before one call of `f` and the peak above that during it, with the memory
/// CUDA graphs held mapped (a replayed forward's activations are there; CUDA only).
pub fn memory(
    dev: &Device,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<(Option<f64>, Option<f64>)> {
    let before = gpu_memory::used_bytes(dev);
    gpu_memory::reset_peak(dev);
    drop(f()?);
    let graphs = gpu_memory::graph_reserved_high(dev).unwrap_or(0);
    let peak = gpu_memory::peak_bytes(dev).map(|p| p + graphs);
    Ok((
        before.map(|b| b as f64 / GIB),
        peak.zip(before)
            .map(|(p, b)| p.saturating_sub(b) as f64 / GIB),
    ))
}

/// Milliseconds of one call: the median and minimum with the device synchronised, and the
/// median time until `f` returned.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub host_ms: f64,
}

pub(crate) fn median(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

/// Runs `f` `warm` times and waits for the device.
fn warm_up(dev: &Device, warm: usize, f: &mut impl FnMut() -> Result<Tensor>) -> Result<()> {
    for _ in 0..warm {
        f()?;
    }
    dev.synchronize()
}

/// Times `f` over `iters` runs after `warm` warm-ups.
pub fn time(
    dev: &Device,
    warm: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<Timing> {
    warm_up(dev, warm, &mut f)?;
    let (mut ms, mut host) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for _ in 0..iters {
        let t = Instant::now();
        let out = f()?;
        host.push(t.elapsed().as_secs_f64() * 1e3);
        dev.synchronize()?;
        drop(out);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let min_ms = ms.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Timing {
        median_ms: median(ms),
        min_ms,
        host_ms: median(host),
    })
}

/// Calls queued per synchronisation by [`time_queued`].
const QUEUED: usize = 10;

/// Milliseconds per call of `f` when calls queue back to back ([`QUEUED`] of them between
/// synchronisations; the median over `iters` such batches after `warm` calls): the device's
/// time for a short kernel, without the launch and synchronisation latency a lone call pays.
pub fn time_queued(
    dev: &Device,
    warm: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<f64> {
    warm_up(dev, warm, &mut f)?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        for _ in 0..QUEUED {
            f()?;
        }
        dev.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3 / QUEUED as f64);
    }
    Ok(median(ms))
}

fn random_vb(dtype: DType, dev: &Device) -> VarBuilder<'static> {
    let weights = RandomWeights::new(false).drawn_on(dev);
    VarBuilder::from_backend(Box::new(weights), dtype, dev.clone())
}

/// `model`'s text encoder, 512 tokens, in `dtype` and optionally 4-bit.
pub fn encoder(dev: &Device, model: Model, dtype: DType, q4: bool, iters: usize) -> Result<Row> {
    use encoder_svc::model::{
        quant::QuantFormat,
        qwen3::TextEncoder,
        weights::{QuantPlan, Weights},
    };
    let (cfg, name) = model.encoder();
    let plan = q4.then_some(QuantPlan {
        linear: QuantFormat::Q4K,
        embedding: None,
    });
    let model = TextEncoder::new(&cfg, Weights::safetensors(random_vb(dtype, dev), plan))?;
    let ids = Tensor::arange(0u32, 512, dev)?.unsqueeze(0)?;
    let mask = Tensor::cat(
        &[
            Tensor::ones((1, 40), DType::U32, dev)?,
            Tensor::zeros((1, 472), DType::U32, dev)?,
        ],
        1,
    )?;
    let timing = time(dev, 2, iters, || model.forward(&ids, &mask))?;
    let (resident_gib, activation_gib) = memory(dev, || model.forward(&ids, &mask))?;
    let mut estimate = encoder_svc::budget::activation_bytes(&cfg, dtype, 1, 512);
    if q4 {
        estimate += if dev.is_cpu() {
            encoder_svc::budget::host_quant_scratch_bytes(&cfg, 512)
        } else {
            encoder_svc::budget::dequantize_reserve_bytes(&cfg, dtype, 512)
        };
    }
    Ok(Row {
        resident_gib,
        activation_gib,
        estimate_gib: estimate as f64 / GIB,
        component: "text_encoder".into(),
        case: format!(
            "{name}, 512 tokens{}",
            if q4 { ", linears q4k" } else { "" }
        ),
        dtype: format!("{dtype:?}").to_lowercase(),
        median_ms: timing.median_ms,
        min_ms: timing.min_ms,
        host_ms: timing.host_ms,
        iters,
    })
}

/// Where memory a step freed goes before the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pool {
    /// Kept in the device's pool (denoiser-svc while runs are active).
    Keep,
    /// Back to the driver at the step's end (the pool's default release threshold, 0).
    Release,
}

/// The pause between the GEMM tuning and the timed steps.
const COOL_DOWN: std::time::Duration = std::time::Duration::from_secs(5);

/// `model`'s transformer with its block projections quantized as `quantize` says, one step
/// at `px`² with `batch` images and `refs` reference images of the same size: the velocity of
/// the noisy tokens, as the sampler asks for it; replayed from a CUDA graph when `graphs` (as
/// denoiser-svc's engine runs it), else queued kernel by kernel. With `lora_rank` > 0, a
/// request's view with a random adapter of that rank over every block projection, stepped
/// eagerly as the engine steps it.
pub fn transformer(
    dev: &Device,
    (model, quantize, lora_rank): (Model, Quantize, usize),
    dtype: DType,
    (px, batch, refs): (usize, usize, usize),
    iters: usize,
    (pool, graphs): (Pool, bool),
) -> Result<Row> {
    use denoiser_svc::{
        graphed::GraphedTransformer,
        model::{Config, Flux2Transformer2DModel, grid_ids, text_ids},
        sampler::Velocity,
    };
    let name = model.name();
    let cfg = Config {
        quantize,
        ..model.transformer()
    };
    let built = Instant::now();
    let model = Flux2Transformer2DModel::new(&cfg, random_vb(dtype, dev))?;
    if quantize != Quantize::None {
        eprintln!(
            "{name} transformer built with {quantize} projections in {:.1} s",
            built.elapsed().as_secs_f64()
        );
    }
    let (h, w) = (px / 16, px / 16);
    let (noisy, tokens) = (h * w, (1 + refs) * h * w);
    let x = Tensor::randn(0f32, 1.0, (batch, tokens, 128), dev)?.to_dtype(dtype)?;
    let ctx =
        Tensor::randn(0f32, 1.0, (batch, 512, cfg.joint_attention_dim), dev)?.to_dtype(dtype)?;
    let mut ids = text_ids(512);
    ids.extend(grid_ids(0, h, w));
    for k in 0..refs {
        ids.extend(grid_ids(10 + 10 * k as u32, h, w));
    }
    let rope = model.rope(&ids, dev)?;
    let t = vec![968.0f32; batch];
    let (model, graphs) = match lora_rank {
        0 => (model, graphs),
        rank => (crate::lora::view(&model, rank, dtype, dev)?, false),
    };
    let model = GraphedTransformer::new(model, ResidentAdapters::default(), graphs, dev);
    let step = || model.velocity(&x, &ctx, &t, &rope, noisy);
    gpu_memory::keep_freed_memory(dev);
    // The linear layers' GEMM algorithms tuned for this shape, as denoiser-svc's warm-up tunes
    // its warm-up size's (other sizes there keep cuBLASLt's heuristic choice).
    let (_, tuned) = klein_kernels::tune_linear(&Default::default(), step)?;
    for t in &tuned {
        eprintln!("GEMM tuned: {t}");
    }
    if !tuned.is_empty() {
        // Seconds of products at the power cap leave the card hotter (more leakage, lower
        // clocks) than the start-up tuning leaves a service's card by its first request.
        dev.synchronize()?;
        std::thread::sleep(COOL_DOWN);
    }
    let timing = time(dev, 2, iters, || {
        let y = step();
        if pool == Pool::Release {
            gpu_memory::release_freed_memory(dev);
        }
        y
    })?;
    gpu_memory::release_freed_memory(dev);
    let (resident_gib, activation_gib) = memory(dev, step)?;
    let flash = klein_kernels::flash_attention_applies(dev, dtype, cfg.attention_head_dim);
    let adapters = usize::from(lora_rank > 0);
    let estimate =
        denoiser_svc::admission::activation_bytes(
            &cfg,
            dtype,
            batch,
            512 + tokens,
            &cfg.attention,
            flash,
        ) + denoiser_svc::admission::lora_bytes(&cfg, dtype, batch, 512 + tokens, adapters);
    Ok(Row {
        resident_gib,
        activation_gib,
        estimate_gib: estimate as f64 / GIB,
        component: "transformer".into(),
        case: format!(
            "{name} step {px}x{px}, batch {batch}{}{}{}{}{}",
            match refs {
                0 => String::new(),
                r => format!(", {r} references"),
            },
            match quantize {
                Quantize::None => String::new(),
                q => format!(", {q} projections"),
            },
            match lora_rank {
                0 => String::new(),
                r => format!(", a rank-{r} LoRA per request"),
            },
            match pool {
                Pool::Keep => "",
                Pool::Release => ", pool released each step",
            },
            match model.graphs_captured() {
                0 => String::new(),
                _ => format!(
                    ", CUDA graph ({} memsets as kernels)",
                    model.memsets_as_kernels()
                ),
            }
        ),
        dtype: format!("{dtype:?}").to_lowercase(),
        median_ms: timing.median_ms,
        min_ms: timing.min_ms,
        host_ms: timing.host_ms,
        iters,
    })
}

/// The FLUX.2 VAE with random weights in `dtype`, its convolutions chunked by `chunking` on
/// `dev`, and its configuration.
fn random_vae(
    dev: &Device,
    dtype: DType,
    chunking: vae_svc::model::Chunking,
) -> Result<(vae_svc::model::Config, vae_svc::model::AutoencoderKLFlux2)> {
    let cfg = vae_svc::model::Config {
        chunking: chunking.on(dev),
        ..vae_svc::model::Config::default()
    };
    let model = vae_svc::model::AutoencoderKLFlux2::new(&cfg, random_vb(dtype, dev))?;
    Ok((cfg, model))
}

/// FLUX.2 VAE decode or encode at `px`².
pub fn vae(
    dev: &Device,
    dtype: DType,
    px: usize,
    decode: bool,
    iters: usize,
    chunking: vae_svc::model::Chunking,
) -> Result<Row> {
    use vae_svc::memory::MemoryModel;
    let conv_algo = chunking.conv_algo;
    let (cfg, model) = random_vae(dev, dtype, chunking)?;
    let estimates = MemoryModel::new(&cfg, dtype);
    // As vae-svc's engine: freed memory stays pooled for the next band and the next job.
    gpu_memory::keep_freed_memory(dev);
    let (timing, (resident_gib, activation_gib), estimate) = if decode {
        let z = Tensor::randn(0f32, 1.0, (1, 32, px / 8, px / 8), dev)?.to_dtype(dtype)?;
        (
            time(dev, 1, iters, || model.decode(&z))?,
            memory(dev, || model.decode(&z))?,
            estimates.decode_peak(px, px),
        )
    } else {
        let x = Tensor::rand(-1f32, 1.0, (1, 3, px, px), dev)?.to_dtype(dtype)?;
        (
            time(dev, 1, iters, || model.encode_mean(&x))?,
            memory(dev, || model.encode_mean(&x))?,
            estimates.encode_peak(px, px),
        )
    };
    let case = format!(
        "{} {px}x{px} ({}, {:?}, op chunks {} MiB)",
        if decode { "decode" } else { "encode" },
        conv_algo.map_or_else(|| "auto".into(), |a| format!("{a:?}")),
        chunking.conv_precision,
        chunking.op_bytes >> 20
    );
    Ok(vae_row(
        case,
        dtype,
        timing,
        (resident_gib, activation_gib),
        estimate,
        iters,
    ))
}

/// A VAE row: `timing` over `iters` calls, the pool's resident and activation bytes, and
/// the service's `estimate` of the activations in bytes.
fn vae_row(
    case: String,
    dtype: DType,
    timing: Timing,
    (resident_gib, activation_gib): (Option<f64>, Option<f64>),
    estimate: u64,
    iters: usize,
) -> Row {
    Row {
        resident_gib,
        activation_gib,
        estimate_gib: estimate as f64 / GIB,
        component: "vae".into(),
        case,
        dtype: format!("{dtype:?}").to_lowercase(),
        median_ms: timing.median_ms,
        min_ms: timing.min_ms,
        host_ms: timing.host_ms,
        iters,
    }
}

/// How vae_tiled cuts a decode.
#[derive(Debug, Clone, Copy)]
pub enum Tiles {
    /// Bands of `rows` token rows across the whole width after `global_blocks` up blocks ran
    /// on the whole image, at the bench's operation chunk.
    Bands { rows: usize, global_blocks: usize },
    /// What vae-svc plans with `capacity` bytes for activations (`vae_svc::memory::plan_decode`,
    /// operation chunks up to 16 GiB as the service's default): tiles, global blocks, chunk.
    Planned { capacity: u64 },
}

/// FLUX.2 VAE f32 decode at `px`² in tiles as a budget that cannot hold the untiled decode
/// runs it (`vae_svc::tiling::decode_tiled`, the service's overlap and passes), its statistics
/// passes in one TF32 pass as vae-svc runs them (`tf32_statistics`) or in the model's own
/// arithmetic.
pub fn vae_tiled(
    dev: &Device,
    px: usize,
    tiles: Tiles,
    tf32_statistics: bool,
    iters: usize,
    chunking: vae_svc::model::Chunking,
) -> Result<Row> {
    use vae_svc::{
        memory::{MemoryModel, plan_decode},
        model::config::with_op_bytes,
        tiling::{TileJob, decode_tiled},
    };
    let (cfg, model) = random_vae(dev, DType::F32, chunking)?;
    let statistics = if tf32_statistics {
        model.for_statistics()
    } else {
        model.clone()
    };
    let tiling = vae_svc::config::Config::default().tiling();
    let grid = (px / 16, px / 16);
    let estimates = MemoryModel::new(&cfg, DType::F32);
    // The tiles, global blocks, operation chunk and the reservation they estimate.
    let (tile, global_blocks, op_bytes, estimate) = match tiles {
        Tiles::Bands {
            rows,
            global_blocks,
        } => {
            let tile = (rows, grid.1);
            let estimate = estimates.tiled_decode_request(grid, 1, tile, global_blocks);
            (tile, global_blocks, chunking.op_bytes, estimate)
        }
        Tiles::Planned { capacity } => {
            let roomy = estimates.with_max_op_bytes(16 << 30);
            let plan = plan_decode(&roomy, grid, 1, capacity, &tiling, false).map_err(|need| {
                candle_core::Error::Msg(format!("no tiling of {px}² fits: {need} bytes needed"))
            })?;
            if !plan.tiles.tiled {
                candle_core::bail!("{px}² decodes untiled in {capacity} bytes");
            }
            let t = plan.tiles.tile_tokens;
            (t, plan.global_blocks, plan.op_bytes, plan.reserve_bytes)
        }
    };
    let job = TileJob {
        tile,
        overlap: tiling.overlap_for(tile.0.min(tile.1)),
        max_passes: tiling.norm_max_passes,
        tolerance: tiling.norm_tolerance,
        global_blocks,
    };
    gpu_memory::keep_freed_memory(dev);
    let z = Tensor::randn(0f32, 1.0, (1, 32, px / 8, px / 8), dev)?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut passes = 0;
    let mut decode = || -> Result<Tensor> {
        let (pixels, n) = with_op_bytes(op_bytes, || {
            decode_tiled(&model, &statistics, &z, grid, &job, &cancel)
        })
        .map_err(candle_core::Error::wrap)?;
        passes = n;
        Ok(pixels)
    };
    let timing = time(dev, 1, iters, &mut decode)?;
    let pool = memory(dev, &mut decode)?;
    let count = |n: usize, t: usize| vae_svc::tiling::tile_starts(n, t, job.overlap).len();
    let case = format!(
        "decode {px}x{px} tiled ({global_blocks} global up blocks, {} tiles of {} × {} tokens, {passes} passes, statistics in {}, {:?}, op chunks {} MiB{})",
        count(grid.0, tile.0) * count(grid.1, tile.1),
        tile.0,
        tile.1,
        if tf32_statistics {
            "TF32"
        } else {
            "the model's arithmetic"
        },
        chunking.conv_precision,
        op_bytes >> 20,
        match tiles {
            Tiles::Planned { capacity } => format!(", planned for {capacity} bytes"),
            Tiles::Bands { .. } => String::new(),
        }
    );
    Ok(vae_row(case, DType::F32, timing, pool, estimate, iters))
}
