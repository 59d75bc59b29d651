//! Steps replayed from CUDA graphs give the eager forward's bits. A small random transformer
//! with klein's head dim (128, so bf16 on Hopper runs the kernels of the real model: cuBLASLt
//! products, the fused attention and norms), two step shapes (one with reference tokens, whose
//! velocity covers the noisy tokens alone) interleaved over rounds of new inputs and timesteps,
//! with a guidance-style second call whose replay must not overwrite the first call's velocity.
//! The text and token counts are multiples of 128, as a 1024² request's (512 + 4096): other
//! counts take fallback paths that copy operand layouts from the host, which graphs refuse.
//! On `KLEIN_TEST_DEVICE=cuda` the second call of each bf16 shape captures its graph and later
//! ones replay it (the batch-2 step too: its last block's residual rows are copied without an
//! operand layout from the host); f32 runs candle's generic kernels, which upload operand
//! layouts from the host, so those graphs are refused and run eagerly; on the CPU every call
//! runs eagerly. On CUDA a second test runs a block
//! of each kind at klein-4B's width and a 1024² step's tokens, whose cuBLASLt products clear a
//! word first: those memsets replay as fill kernels, ordered as the memsets were (a build that
//! left the products' wait to the disabled memsets replayed different bits, on an H200).

use std::str::FromStr;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use denoiser_svc::{
    graphed::GraphedTransformer,
    lora::ResidentAdapters,
    model::{Config, Flux2Transformer2DModel, Rope, grid_ids, text_ids},
    sampler::Velocity,
};
use klein_runtime::device::DeviceSpec;
use klein_test_support::test_device_name;

/// The test device as the services open it (no cudarc event tracking, so graphs apply).
fn device() -> Device {
    DeviceSpec::from_str(&test_device_name())
        .unwrap()
        .open()
        .unwrap()
}

/// Every weight drawn from N(0, 0.05²).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        _: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        (Tensor::randn(0f32, 1.0, s, dev)? * 0.05)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: no shape given")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Two heads of klein's 128, one block of each kind.
fn small_klein() -> Config {
    Config {
        num_layers: 1,
        num_single_layers: 2,
        num_attention_heads: 2,
        joint_attention_dim: 96,
        ..Config::klein_4b()
    }
}

/// One step's shape: batch, text tokens, the noisy grid and reference grids.
struct Step {
    batch: usize,
    text: usize,
    grid: (usize, usize),
    references: usize,
}

impl Step {
    fn noisy(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    fn tokens(&self) -> usize {
        (1 + self.references) * self.noisy()
    }

    fn rope(&self, m: &Flux2Transformer2DModel, dev: &Device) -> Rope {
        let mut ids = text_ids(self.text);
        let (h, w) = self.grid;
        for k in 0..=self.references {
            ids.extend(grid_ids(10 * k as u32, h, w));
        }
        m.rope(&ids, dev).unwrap()
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn replayed_steps_give_the_eager_bits() {
    // Why a capture fell back, if one does.
    klein_runtime::telemetry::init_tracing(Default::default());
    let dev = device();
    let shapes = [
        Step {
            batch: 1,
            text: 128,
            grid: (8, 16),
            references: 0,
        },
        Step {
            batch: 2,
            text: 128,
            grid: (8, 8),
            references: 1,
        },
    ];
    for dtype in [DType::F32, DType::BF16] {
        let cfg = small_klein();
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, dev.clone());
        let model = Flux2Transformer2DModel::new(&cfg, vb).unwrap();
        let graphed =
            GraphedTransformer::new(model.clone(), ResidentAdapters::default(), true, &dev);
        assert_eq!(graphed.graphs_enabled(), dev.is_cuda());
        let ropes: Vec<Rope> = shapes.iter().map(|s| s.rope(&model, &dev)).collect();
        for round in 0..4 {
            for (shape, rope) in shapes.iter().zip(&ropes) {
                let random = |dims: (usize, usize, usize)| {
                    Tensor::randn(0f32, 1.0, dims, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let x = random((shape.batch, shape.tokens(), cfg.in_channels));
                let ctx = random((shape.batch, shape.text, cfg.joint_attention_dim));
                let negative = random((shape.batch, shape.text, cfg.joint_attention_dim));
                let t: Vec<f32> = (0..shape.batch)
                    .map(|b| 1000.0 - 230.0 * round as f32 - b as f32)
                    .collect();
                let n = shape.noisy();
                let want = model.forward_first(&x, &ctx, &t, rope, n).unwrap();
                let want_negative = model.forward_first(&x, &negative, &t, rope, n).unwrap();
                let got = graphed.velocity(&x, &ctx, &t, rope, n).unwrap();
                let got_negative = graphed.velocity(&x, &negative, &t, rope, n).unwrap();
                let case = format!("{dtype:?}, round {round}, batch {}", shape.batch);
                assert_eq!(got.dims(), want.dims(), "{case}");
                assert!(bits(&got) == bits(&want), "{case}: velocity differs");
                assert!(
                    bits(&got_negative) == bits(&want_negative),
                    "{case}: second call's velocity differs"
                );
                assert_ne!(bits(&got), bits(&got_negative), "{case}: contexts differ");
            }
        }
        eprintln!(
            "{dtype:?}: {} graphs, {} memsets as kernels",
            graphed.graphs_captured(),
            graphed.memsets_as_kernels()
        );
        if !dev.is_cuda() {
            assert_eq!(graphed.graphs_captured(), 0);
        } else if dtype == DType::BF16 {
            assert_eq!(graphed.graphs_captured(), shapes.len());
        }
    }
}

/// At klein-4B's width and a 1024² step's tokens, cuBLASLt clears a word before several of its
/// products (68 memsets a step of the whole model), which the graph runs as fill kernels: a
/// block of each kind, its GEMMs tuned as the service tunes them, replays bit-identical to the
/// eager forward over rounds of new inputs. CUDA only: the memsets are cuBLASLt's, and on the
/// CPU the forward runs eagerly (the first test covers that).
#[test]
fn a_full_width_step_replays_its_memsets_as_kernels() {
    klein_runtime::telemetry::init_tracing(Default::default());
    let dev = device();
    if !dev.is_cuda() {
        return;
    }
    let cfg = Config {
        num_layers: 1,
        num_single_layers: 1,
        ..Config::klein_4b()
    };
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::BF16, dev.clone());
    let model = Flux2Transformer2DModel::new(&cfg, vb).unwrap();
    let graphed = GraphedTransformer::new(model.clone(), ResidentAdapters::default(), true, &dev);
    let step = Step {
        batch: 1,
        text: 512,
        grid: (64, 64),
        references: 0,
    };
    let rope = step.rope(&model, &dev);
    let n = step.noisy();
    let input = |round: usize| {
        let random = |dims: (usize, usize, usize)| {
            Tensor::randn(0f32, 1.0, dims, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let x = random((1, step.tokens(), cfg.in_channels));
        let ctx = random((1, step.text, cfg.joint_attention_dim));
        (x, ctx, vec![1000.0 - 230.0 * round as f32])
    };
    let (x, ctx, t) = input(0);
    klein_kernels::tune_linear(&Default::default(), || {
        graphed.velocity(&x, &ctx, &t, &rope, n)
    })
    .unwrap();
    for round in 1..5 {
        let (x, ctx, t) = input(round);
        let want = model.forward_first(&x, &ctx, &t, &rope, n).unwrap();
        let got = graphed.velocity(&x, &ctx, &t, &rope, n).unwrap();
        assert!(bits(&got) == bits(&want), "round {round}: velocity differs");
    }
    eprintln!(
        "{} graphs, {} memsets as kernels",
        graphed.graphs_captured(),
        graphed.memsets_as_kernels()
    );
    assert_eq!(graphed.graphs_captured(), 1);
    assert!(graphed.memsets_as_kernels() > 0);
}
