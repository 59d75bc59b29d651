//! The model side of the service. A [`Runner`] lives on the engine thread
//! ([`klein_runtime::engine`]), owns the model and its device, and processes the images of a
//! request one at a time, so a request's peak is one image's peak. Cancellation is checked
//! between images and between tiles.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use klein_runtime::gpu_memory::{self, Attempt};
use tokio_util::sync::CancellationToken;

use crate::{
    error::VaeError,
    image,
    loader::WeightsFormat,
    memory::{DecodePlan, DecodePlans},
    model::{AutoencoderKLFlux2, Config, config::with_op_bytes},
    tiling::{self, TileJob, TilingConfig},
    validate::PIXELS_PER_TOKEN,
};

/// What was loaded, for Info and budgeting.
#[derive(Debug, Clone)]
pub struct Facts {
    pub config: Config,
    pub format: WeightsFormat,
    pub weight_bytes: u64,
    pub model_id: String,
}

/// Where a decode's time went, summed over its images.
#[derive(Debug, Default)]
struct DecodeTimes {
    /// Latents onto the device and the decoder, until the device finished.
    decode: Duration,
    /// Quantisation to u8 and the copy to the host.
    to_host: Duration,
}

/// A decode's images and the plan that made them.
#[derive(Debug)]
pub struct DecodedImages {
    /// RGB u8 `[B, 16h, 16w, 3]` on the CPU.
    pub images: Tensor,
    /// The plan the images were decoded with: the first, or its fallback.
    pub plan: DecodePlan,
}

/// The model and its device.
pub struct Runner {
    model: AutoencoderKLFlux2,
    device: Device,
    facts: Facts,
    /// The (grid, plan) of the decodes run so far: the first decode of a shape also holds the
    /// one-time set-up of its convolutions (cuDNN's and cuBLAS's handles, workspaces and
    /// kernels; up to 17 % over a 1024² reservation at the start-up decode, H200), which no
    /// reservation plans for, so only later decodes of a shape warn past their reservation.
    decoded: Seen<((usize, usize), DecodePlan)>,
}

/// The keys met so far, at most [`Seen::MAX`] (then it starts afresh).
struct Seen<K>(Vec<K>);

impl<K: PartialEq> Seen<K> {
    const MAX: usize = 64;

    fn new() -> Self {
        Self(Vec::new())
    }

    /// Notes `key`; whether it was met before.
    fn seen(&mut self, key: K) -> bool {
        if self.0.contains(&key) {
            return true;
        }
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        self.0.push(key);
        false
    }
}

fn check(cancel: &CancellationToken) -> Result<(), VaeError> {
    if cancel.is_cancelled() {
        Err(VaeError::Cancelled)
    } else {
        Ok(())
    }
}

impl Runner {
    /// Convolution bands reuse the memory earlier bands (and earlier jobs) freed
    /// ([`gpu_memory::keep_freed_memory`]); a job that runs out of memory hands it back and is
    /// run once more (jobs only read their inputs): an encode as it was
    /// ([`gpu_memory::retry_out_of_memory`]), a decode at its fallback plan
    /// ([`gpu_memory::fall_back_on_out_of_memory`], [`DecodePlans`]).
    pub fn new(model: AutoencoderKLFlux2, device: Device, facts: Facts) -> Self {
        gpu_memory::keep_freed_memory(&device);
        Self {
            model,
            device,
            facts,
            decoded: Seen::new(),
        }
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What was loaded.
    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    /// Images `[B, H, W, 3]` (CPU, u8 or f32) -> packed normalised latents
    /// `[B, (H/16) * (W/16), 128]` on the CPU in the model dtype, with operation chunks of
    /// `op_bytes` (the job's plan, [`crate::memory::plan_encode`]).
    pub fn encode(
        &self,
        images: &Tensor,
        op_bytes: u64,
        cancel: &CancellationToken,
    ) -> Result<Tensor, VaeError> {
        with_op_bytes(op_bytes, || {
            gpu_memory::retry_out_of_memory(&self.device, || self.encode_images(images, cancel))
        })
    }

    fn encode_images(
        &self,
        images: &Tensor,
        cancel: &CancellationToken,
    ) -> Result<Tensor, VaeError> {
        let batch = images.dim(0)?;
        let mut out = Vec::with_capacity(batch);
        for i in 0..batch {
            check(cancel)?;
            let x = image::to_model_input(&images.get(i)?)?.to_device(&self.device)?;
            out.push(self.model.encode_packed(&x)?.to_device(&Device::Cpu)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// Packed latents `[B, h * w, 128]` (CPU) -> RGB u8 `[B, 16h, 16w, 3]` on the CPU,
    /// untiled or tiled, with the operation chunk, as planned; from a pool handed back first
    /// where the driver has less free than the plan reserves ([`gpu_memory::make_room`]);
    /// after an out-of-memory, from a pool handed back and as the fallback plans.
    pub fn decode(
        &mut self,
        latents: &Tensor,
        grid: (usize, usize),
        (plans, tiling): (&DecodePlans, &TilingConfig),
        cancel: &CancellationToken,
    ) -> Result<DecodedImages, VaeError> {
        let mut times = DecodeTimes::default();
        let made_room = gpu_memory::make_room(&self.device, plans.first.reserve_bytes);
        gpu_memory::reset_peak(&self.device);
        let resident = gpu_memory::used_bytes(&self.device);
        let (images, plan) = gpu_memory::fall_back_on_out_of_memory(&self.device, |attempt| {
            let plan = match (attempt, plans.fallback) {
                (Attempt::Retry, Some(fallback)) => {
                    tracing::warn!(plan = ?fallback, "decoding again with the fallback plan");
                    metrics::counter!("klein_vae_decode_fallbacks_total").increment(1);
                    fallback
                }
                _ => plans.first,
            };
            with_op_bytes(plan.op_bytes, || {
                self.decode_latents(latents, grid, (&plan, tiling), cancel, &mut times)
            })
            .map(|images| (images, plan))
        })?;
        let reserve_bytes = plans.first.reserve_bytes;
        let peak_bytes = resident
            .zip(gpu_memory::peak_bytes(&self.device))
            .map(|(resident, high)| high.saturating_sub(resident));
        tracing::info!(
            decode_seconds = times.decode.as_secs_f64(),
            to_host_seconds = times.to_host.as_secs_f64(),
            peak_bytes,
            reserve_bytes,
            made_room,
            "decode done"
        );
        let warmed = self.decoded.seen((grid, plan));
        if warmed && peak_bytes.is_some_and(|peak| peak > reserve_bytes) {
            tracing::warn!(
                peak_bytes,
                reserve_bytes,
                "the decode's device memory peak exceeded its reservation"
            );
        }
        Ok(DecodedImages { images, plan })
    }

    fn decode_latents(
        &self,
        latents: &Tensor,
        grid: (usize, usize),
        (plan, tiling): (&DecodePlan, &TilingConfig),
        cancel: &CancellationToken,
        times: &mut DecodeTimes,
    ) -> Result<Tensor, VaeError> {
        let batch = latents.dim(0)?;
        let (h, w) = (grid.0 * PIXELS_PER_TOKEN, grid.1 * PIXELS_PER_TOKEN);
        let mut bytes = Vec::with_capacity(batch * h * w * 3);
        for i in 0..batch {
            check(cancel)?;
            let started = Instant::now();
            let tokens = latents.narrow(0, i, 1)?.to_device(&self.device)?;
            let z = self.model.unpack_latents(&tokens, grid)?;
            let pixels = if plan.tiles.tiled {
                let job = TileJob {
                    tile: plan.tiles.tile_tokens,
                    overlap: plan.overlap_param,
                    max_passes: tiling.norm_max_passes,
                    tolerance: tiling.norm_tolerance,
                    global_blocks: plan.global_blocks,
                };
                let statistics = self.model.for_statistics();
                let (pixels, passes) =
                    tiling::decode_tiled(&self.model, &statistics, &z, grid, &job, cancel)?;
                tracing::info!(image = i, passes, "tiled decode done");
                pixels.to_dtype(self.model.dtype())?
            } else {
                self.model.decode(&z)?
            };
            self.device.synchronize()?;
            let decoded = Instant::now();
            times.decode += decoded - started;
            bytes.extend(image::to_u8(&pixels)?);
            times.to_host += decoded.elapsed();
        }
        Ok(Tensor::from_vec(bytes, (batch, h, w, 3), &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_is_seen_from_its_second_decode_on() {
        let mut seen = Seen::new();
        assert!(!seen.seen((64, 64)), "the first decode of a shape");
        assert!(seen.seen((64, 64)));
        assert!(!seen.seen((64, 48)), "another shape");
        for side in 0..Seen::<(usize, usize)>::MAX {
            seen.seen((side, 1));
        }
        assert!(!seen.seen((64, 64)), "forgotten once the list filled up");
    }
}
