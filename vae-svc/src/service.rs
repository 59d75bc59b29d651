//! [`Vae`]: the service logic behind the gRPC handlers, usable in-process.
//!
//! Every request is validated against the configured limits, reserves its estimated
//! activation peak through the admission budget ([`MemoryModel`]), and runs on the engine
//! thread. A decode that cannot fit untiled is decoded tiled instead of refused
//! ([`plan_decode`]); the plan is logged and returned.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use klein_proto::pb;
use klein_runtime::{
    budget::{AdmissionError, MemoryBudget},
    device::DeviceSpec,
    engine::Engine,
    gpu_memory,
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    engine::{Facts, Runner},
    error::VaeError,
    loader::{self, ModelSource},
    memory::{DecodePlan, DecodePlans, MemoryModel, plan_decode, plan_encode},
    tiling::{TilePlan, TilingConfig},
    validate::{Limits, PACKED_CHANNELS, PIXELS_PER_TOKEN, ValidDecodeRequest, ValidEncodeRequest},
};

/// Name of the budget in messages and metrics.
const BUDGET_NAME: &str = "vae";

/// Token grid of the warm-up decode (64 x 64 pixels).
const WARM_UP_GRID: (usize, usize) = (4, 4);

/// Result of an encode.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `[B, h * w, 128]` on the CPU, model dtype.
    pub latents: Tensor,
    /// Token grid `(h, w)`.
    pub grid: (usize, usize),
}

/// Result of a decode.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// `[B, 16h, 16w, 3]` u8 on the CPU.
    pub images: Tensor,
    /// How it was tiled.
    pub plan: TilePlan,
}

/// The loaded VAE behind its admission budget.
pub struct Vae {
    engine: Engine<Runner>,
    budget: MemoryBudget,
    memory: MemoryModel,
    limits: Limits,
    tiling: TilingConfig,
    facts: Facts,
    dtype: DType,
    device: String,
    budget_bytes: u64,
    /// `Config::warm_up_side` (at most `max_image_side`) on a GPU, else 0.
    warm_up_side: usize,
}

impl Vae {
    /// Opens the device and loads the model on the engine thread; refuses to start when the
    /// weights and the runtime overhead do not leave room in the budget.
    pub async fn start(config: &Config) -> Result<Self, VaeError> {
        config
            .check()
            .map_err(|e| VaeError::Config(e.to_string()))?;
        let dtype = DType::from(config.server.dtype);
        let device = config.server.device;
        let source = ModelSource {
            path: config.model_dir.clone().unwrap_or_default(),
            single_file_config: config.single_file_config.clone(),
            chunking: config.chunking(),
        };
        let engine = tokio::task::spawn_blocking(move || {
            Engine::spawn("vae-engine", move || {
                let device = device.open()?;
                let loaded = loader::load(&source, dtype, &device)?;
                let facts = Facts {
                    config: loaded.config,
                    format: loaded.format,
                    weight_bytes: loaded.weight_bytes,
                    model_id: loaded.model_id,
                };
                Ok::<_, VaeError>(Runner::new(loaded.model, device, facts))
            })
        })
        .await
        .map_err(|e| VaeError::Config(format!("model loading task failed: {e}")))??;
        let mut facts = engine.run(|r: &mut Runner| r.facts().clone()).await?;
        if let Some(id) = &config.model_id {
            facts.model_id = id.clone();
        }
        let cfg = &facts.config;
        if cfg.packed_channels() != PACKED_CHANNELS || cfg.in_channels != 3 || cfg.out_channels != 3
        {
            return Err(VaeError::Config(format!(
                "the wire contract needs RGB in and out and {PACKED_CHANNELS} packed latent channels; \
                 this VAE has {} in, {} out, {} packed",
                cfg.in_channels,
                cfg.out_channels,
                cfg.packed_channels()
            )));
        }
        let budget_bytes = config.server.gpu_memory_budget.0;
        let fixed = facts.weight_bytes + config.runtime_overhead.0;
        if fixed >= budget_bytes {
            return Err(VaeError::Config(format!(
                "weights ({} bytes) + runtime_overhead ({} bytes) exceed gpu_memory_budget ({budget_bytes} bytes)",
                facts.weight_bytes, config.runtime_overhead.0
            )));
        }
        let capacity = budget_bytes - fixed;
        tracing::info!(
            model_id = %facts.model_id,
            format = facts.format.as_str(),
            weight_bytes = facts.weight_bytes,
            activation_capacity = capacity,
            dtype = ?dtype,
            conv_precision = ?config.conv_precision,
            "VAE loaded"
        );
        metrics::gauge!("klein_vae_weight_bytes").set(facts.weight_bytes as f64);
        // Larger chunks pay where a band bounds only copies (cuDNN's implicit GEMM); where the
        // convolution materialises its im2col rows (the CPU) the band also bounds that buffer.
        let max_op_bytes = if cfg.chunking.conv_im2col {
            cfg.chunking.op_bytes
        } else {
            config.max_op_chunk_bytes.0
        };
        Ok(Self {
            engine,
            budget: MemoryBudget::new(BUDGET_NAME, capacity, config.server.max_queue_depth),
            memory: MemoryModel::new(&facts.config, dtype).with_max_op_bytes(max_op_bytes),
            limits: config.limits(),
            tiling: config.tiling(),
            facts,
            dtype,
            device: config.server.device.to_string(),
            budget_bytes,
            warm_up_side: match config.server.device {
                DeviceSpec::Cuda(_) => config.warm_up_side.min(config.max_image_side),
                DeviceSpec::Cpu => 0,
            },
        })
    }

    /// The activation-memory estimates this service reserves with.
    pub fn memory(&self) -> &MemoryModel {
        &self.memory
    }

    /// Images -> packed normalised latents.
    pub async fn encode(&self, req: ValidEncodeRequest) -> Result<Encoded, VaeError> {
        let req = req.within(&self.limits)?;
        let (batch, h, w) = req.dims();
        let capacity = self.budget.snapshot().capacity;
        let plan = plan_encode(&self.memory, (h, w), batch, capacity);
        let _reservation = self.budget.reserve(plan.reserve_bytes).await?;
        let cancel = CancellationToken::new();
        let _cancel_on_drop = cancel.clone().drop_guard();
        let images = req.images;
        let latents = self
            .engine
            .run(move |r: &mut Runner| r.encode(&images, plan.op_bytes, &cancel))
            .await??;
        Ok(Encoded {
            latents,
            grid: (h / PIXELS_PER_TOKEN, w / PIXELS_PER_TOKEN),
        })
    }

    /// How a decode of this size would run, and what it would reserve.
    pub fn plan(
        &self,
        grid: (usize, usize),
        batch: usize,
        force_tiling: bool,
    ) -> Result<DecodePlan, VaeError> {
        let capacity = self.budget.snapshot().capacity;
        plan_decode(
            &self.memory,
            grid,
            batch,
            capacity,
            &self.tiling,
            force_tiling,
        )
        .map_err(|need| {
            VaeError::Admission(AdmissionError::NeverFits {
                budget: BUDGET_NAME.into(),
                requested: need,
                capacity,
            })
        })
    }

    /// Packed latents -> RGB u8, tiled when the budget needs it or the request asks.
    pub async fn decode(&self, req: ValidDecodeRequest) -> Result<Decoded, VaeError> {
        let req = req.within(&self.limits)?;
        let plan = self.plan(req.grid, req.batch(), req.force_tiling)?;
        let plans = DecodePlans::new(
            &self.memory,
            (req.grid, req.batch()),
            plan,
            &self.tiling,
            req.force_tiling,
        );
        let t = plan.tiles;
        tracing::info!(
            grid = ?req.grid,
            batch = req.batch(),
            tiled = t.tiled,
            tile_tokens = ?t.tile_tokens,
            overlap_tokens = t.overlap_tokens,
            tile_count = t.tile_count,
            global_blocks = plan.global_blocks,
            op_chunk_bytes = plan.op_bytes,
            reserve_bytes = plan.reserve_bytes,
            "decode plan"
        );
        if t.tiled {
            metrics::counter!("klein_vae_tiled_decodes_total").increment(1);
        }
        let _reservation = self.budget.reserve(plan.reserve_bytes).await?;
        let cancel = CancellationToken::new();
        let _cancel_on_drop = cancel.clone().drop_guard();
        let (latents, grid, tiling) = (req.latents, req.grid, self.tiling);
        let images = self
            .engine
            .run(move |r: &mut Runner| r.decode(&latents, grid, (&plans, &tiling), &cancel))
            .await??;
        Ok(Decoded {
            images: images.images,
            plan: images.plan.tiles,
        })
    }

    /// Decodes a small zero latent through the whole path (budget, engine, postprocess), untiled
    /// and then tiled, so that the tiled path's kernels load here rather than in a request (0.95
    /// s on a fresh H200, 0.015 s once the driver's cache holds them); then at the common size
    /// ([`Self::warm_up_at_size`]), whose convolution shapes need kernels of their own.
    pub async fn warm_up(&self) -> Result<(), VaeError> {
        for force_tiling in [false, true] {
            let (decoded, seconds) = self.decode_zeros(WARM_UP_GRID, force_tiling).await?;
            tracing::info!(tiled = decoded.plan.tiled, seconds, "warm-up decode done");
        }
        // cuDNN and cuBLAS are loaded now: what is free is what activations really have.
        let budget = self.budget.clone();
        self.engine
            .run(move |r: &mut Runner| {
                gpu_memory::fit_budget(&budget, r.device(), gpu_memory::FIT_MARGIN_BYTES)
            })
            .await?;
        self.warm_up_at_size().await;
        Ok(())
    }

    /// Decodes a zero image of `warm_up_side` pixels square as a request of that size would
    /// run, if that is on; a failure is logged and the service starts anyway (the request's own
    /// first decode then pays the compilation).
    async fn warm_up_at_size(&self) {
        let side = self.warm_up_side / PIXELS_PER_TOKEN;
        if side == 0 {
            return;
        }
        match self.decode_zeros((side, side), false).await {
            Ok((decoded, seconds)) => tracing::info!(
                side = self.warm_up_side,
                tiled = decoded.plan.tiled,
                seconds,
                "warm-up decode at the common size done"
            ),
            Err(error) => tracing::warn!(
                side = self.warm_up_side,
                %error,
                "warm-up decode at the common size failed; the first such request compiles its kernels"
            ),
        }
    }

    /// Decodes one zero latent of `grid` through the whole path (budget, engine, postprocess);
    /// returns the result and the seconds it took.
    async fn decode_zeros(
        &self,
        grid: (usize, usize),
        force_tiling: bool,
    ) -> Result<(Decoded, f64), VaeError> {
        let latents = Tensor::zeros(
            (1, grid.0 * grid.1, PACKED_CHANNELS),
            DType::F32,
            &candle_core::Device::Cpu,
        )?;
        let req = ValidDecodeRequest {
            latents,
            grid,
            force_tiling,
        };
        let started = std::time::Instant::now();
        let decoded = self.decode(req).await?;
        Ok((decoded, started.elapsed().as_secs_f64()))
    }

    /// The Info description.
    pub fn info(&self) -> pb::ServiceInfo {
        let snap = self.budget.snapshot();
        let cfg = &self.facts.config;
        let megapixel = self.memory.decode_peak(1024, 1024);
        let details: HashMap<String, String> = [
            ("format", self.facts.format.as_str().to_owned()),
            ("latent_channels", cfg.latent_channels.to_string()),
            (
                "block_out_channels",
                format!("{:?}", cfg.block_out_channels),
            ),
            (
                "decoder_block_out_channels",
                format!("{:?}", cfg.decoder_channels()),
            ),
            ("activation_capacity_bytes", snap.capacity.to_string()),
            ("decode_peak_bytes_1024", megapixel.to_string()),
            (
                "attention_chunk_bytes",
                cfg.chunking.attention_bytes.to_string(),
            ),
            ("op_chunk_bytes", cfg.chunking.op_bytes.to_string()),
            ("max_op_chunk_bytes", self.memory.max_op_bytes().to_string()),
            (
                "conv_precision",
                format!("{:?}", cfg.chunking.conv_precision),
            ),
            (
                "conv_algorithm",
                cfg.chunking
                    .conv_algo
                    .map_or_else(|| "auto".into(), |a| format!("{a:?}")),
            ),
            ("tile_tokens", self.tiling.tile_tokens.to_string()),
            (
                "tile_overlap_tokens",
                self.tiling.overlap_tokens.to_string(),
            ),
            ("min_tile_tokens", self.tiling.min_tile_tokens.to_string()),
            (
                "tile_norm_max_passes",
                self.tiling.norm_max_passes.to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let dtype =
            klein_proto::tensor::dtype_to_wire(self.dtype).unwrap_or(pb::Dtype::Unspecified);
        pb::ServiceInfo {
            service: "vae".into(),
            model_id: self.facts.model_id.clone(),
            dtype: dtype as i32,
            device: self.device.clone(),
            quantization: "none".into(),
            memory_budget_bytes: self.budget_bytes,
            weight_bytes: self.facts.weight_bytes,
            reserved_bytes: snap.reserved,
            queue_depth: snap.queued as u32,
            max_queue_depth: snap.max_queue as u32,
            max_batch: self.limits.max_batch as u32,
            max_image_side: self.limits.max_image_side as u32,
            max_image_pixels: self.limits.max_image_pixels,
            details,
            // One VAE serves every klein model; it stays resident.
            models: vec![pb::ModelInfo {
                id: self.facts.model_id.clone(),
                variant: "flux2-vae".into(),
                weight_bytes: self.facts.weight_bytes,
                on_device: true,
                loads: 1,
                ..Default::default()
            }],
        }
    }
}
