//! What each model on the device runs before the service reports ready: a one-token step
//! ([`warm_up`]), then on a GPU in bf16 a step at the warm-up size with the GEMM tuning on
//! ([`Tuning`]), whose choices are kept in a file between starts.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use klein_kernels::{Tuned, TuningCache};
use klein_runtime::gpu_memory;

use crate::{
    error::DenoiseError,
    graphed::GraphedTransformer,
    model::{grid_ids, text_ids},
    sampler::Velocity,
    validate::{PIXELS_PER_TOKEN, TEXT_TOKENS},
};

/// One forward over a one-token image, so the first request does not pay for lazy
/// initialisation (kernels, allocator pools).
pub(crate) fn warm_up(
    model: &GraphedTransformer,
    device: &Device,
    dtype: DType,
) -> Result<(), DenoiseError> {
    let cfg = model.config();
    let x = Tensor::zeros((1, 1, cfg.in_channels), dtype, device)?;
    let ctx = Tensor::zeros((1, TEXT_TOKENS, cfg.joint_attention_dim), dtype, device)?;
    square_step(model, &x, &ctx, 1)?;
    Ok(())
}

/// One step's forward at t = 1000 over x, the latent tokens of a `tokens`² image, and the text
/// `ctx`, as the engine runs it.
fn square_step(
    model: &GraphedTransformer,
    x: &Tensor,
    ctx: &Tensor,
    tokens: usize,
) -> candle_core::Result<Tensor> {
    let mut ids = text_ids(TEXT_TOKENS);
    ids.extend(grid_ids(0, tokens, tokens));
    let rope = model.rope(&ids, x.device())?;
    model.velocity(x, ctx, &[1000.0], &rope, x.dim(1)?)
}

/// The warm-up's GEMM tuning: the side of its square image (0: none) and the choices of
/// earlier starts, read from the cache file (if any) and written back when a tuning changed
/// them. A shape the file remembers for this card costs two products instead of timing every
/// candidate (~0.8 s), and its result is checked bit for bit (`klein_kernels::tune_linear`).
pub(crate) struct Tuning {
    side: usize,
    path: Option<PathBuf>,
    cache: TuningCache,
    /// This start's choices where they changed the cache, for the write.
    new: Vec<Tuned>,
}

impl Tuning {
    /// The tuning at `side` with the cache file at `path`. An unreadable or foreign file is
    /// logged and replaced by the next write; nothing is read when `side` is 0.
    pub(crate) fn read(side: usize, path: Option<PathBuf>) -> Self {
        let path = path.filter(|_| side > 0);
        let cache = match &path {
            Some(p) => TuningCache::read(p).unwrap_or_else(|e| {
                tracing::warn!(path = %p.display(), error = %e, "GEMM tuning cache unreadable; tuning afresh");
                TuningCache::default()
            }),
            None => TuningCache::default(),
        };
        Self {
            side,
            path,
            cache,
            new: Vec::new(),
        }
    }

    /// One step over a random `side`² image with the GEMM tuning on: random rather than zero
    /// values, since at the power cap a product's speed depends on its operands' bits. With
    /// CUDA graphs, a second step captures that size's graph, so its first request replays every
    /// step. Best effort: a failure leaves the heuristic's algorithms in place.
    pub(crate) fn tune(&mut self, model: &GraphedTransformer, device: &Device, dtype: DType) {
        let side = self.side;
        if side == 0 {
            return;
        }
        let started = std::time::Instant::now();
        let tokens = side / PIXELS_PER_TOKEN;
        let run = || -> candle_core::Result<Vec<Tuned>> {
            let cfg = model.config();
            let x = Tensor::randn(0f32, 1.0, (1, tokens * tokens, cfg.in_channels), device)?
                .to_dtype(dtype)?;
            let ctx = Tensor::randn(0f32, 1.0, (1, TEXT_TOKENS, cfg.joint_attention_dim), device)?
                .to_dtype(dtype)?;
            let (_, tuned) =
                klein_kernels::tune_linear(&self.cache, || square_step(model, &x, &ctx, tokens))?;
            if model.graphs_enabled() {
                square_step(model, &x, &ctx, tokens)?;
            }
            device.synchronize()?;
            Ok(tuned)
        };
        match run() {
            Ok(tuned) => {
                for t in &tuned {
                    tracing::info!(side, "GEMM tuned: {t}");
                }
                tracing::info!(
                    side,
                    shapes = tuned.len(),
                    cached = tuned.iter().filter(|t| t.cached).count(),
                    graphs = model.graphs_captured(),
                    ms = started.elapsed().as_millis() as u64,
                    "GEMMs tuned at the warm-up size"
                );
                self.take(tuned);
            }
            Err(e) => {
                tracing::warn!(side, error = %e, "GEMM tuning step failed; heuristic algorithms kept")
            }
        }
        gpu_memory::release_freed_memory(device);
    }

    /// Takes in a tuning run's choices: kept for the write if they changed the cache.
    fn take(&mut self, tuned: Vec<Tuned>) {
        if self.cache.record(&tuned) {
            self.new.extend(tuned);
        }
    }

    /// Writes this start's new choices into the cache file, if there are any, on top of what
    /// the file holds now: another service that shares the file (a second denoiser, `klein
    /// serve` beside the stack) keeps what it wrote since this one read it. A failure is logged
    /// (the next start tunes again).
    pub(crate) fn write(self) {
        let Some(path) = self.path.filter(|_| !self.new.is_empty()) else {
            return;
        };
        let mut cache = TuningCache::read(&path).unwrap_or_default();
        cache.record(&self.new);
        match cache.write(&path) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                shapes = cache.len(),
                "GEMM tuning cache written"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "GEMM tuning cache not written; the next start tunes again"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that is not a cache, alone in a folder of its own.
    fn garbage_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("klein-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gemm-tuning.json");
        std::fs::write(&path, "not a cache").unwrap();
        path
    }

    fn choice() -> Tuned {
        Tuned {
            card: "card".into(),
            dims: [1, 4096, 3072, 18432, 3072, 4096 * 3072],
            align: [256; 3],
            candidates: 8,
            first_ms: f32::NAN,
            chosen: 5,
            chosen_ms: f32::NAN,
            tile: 197,
            cached: false,
        }
    }

    #[test]
    fn without_a_tuning_size_the_file_is_neither_read_nor_written() {
        let path = garbage_file("tuning-off");
        let mut tuning = Tuning::read(0, Some(path.clone()));
        assert!(tuning.path.is_none() && tuning.cache.is_empty());
        tuning.take(vec![choice()]);
        tuning.write();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a cache");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn an_unreadable_file_is_replaced_by_the_next_choices() {
        let path = garbage_file("tuning-unreadable");
        let mut tuning = Tuning::read(1024, Some(path.clone()));
        assert!(tuning.cache.is_empty(), "tuned afresh");
        tuning.take(vec![choice()]);
        tuning.write();
        let t = choice();
        let kept = TuningCache::read(&path).unwrap();
        assert_eq!(kept.rank(&t.card, t.dims, t.align), Some(5));
        let again = Tuning::read(1024, Some(path.clone()));
        assert_eq!(again.cache, kept);
        assert!(again.new.is_empty(), "nothing to write back");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn services_sharing_the_file_keep_each_others_choices() {
        let path = garbage_file("tuning-shared");
        std::fs::remove_file(&path).unwrap();
        let wide = choice();
        let narrow = Tuned {
            dims: [1, 4096, 3072, 9216, 3072, 4096 * 3072],
            chosen: 2,
            ..choice()
        };
        // Both start before either writes.
        let mut first = Tuning::read(1024, Some(path.clone()));
        let mut second = Tuning::read(1024, Some(path.clone()));
        first.take(vec![wide.clone()]);
        first.write();
        second.take(vec![narrow.clone()]);
        second.write();
        let kept = TuningCache::read(&path).unwrap();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert_eq!(kept.rank(&wide.card, wide.dims, wide.align), Some(5));
        assert_eq!(kept.rank(&narrow.card, narrow.dims, narrow.align), Some(2));
        // A start that only confirms what the file holds writes nothing.
        let mut third = Tuning::read(1024, Some(path.clone()));
        third.take(vec![narrow]);
        assert!(third.new.is_empty());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
