//! One transformer forward against the diffusers goldens (`goldens/transformer_forward`), with
//! and without reference tokens, in f32 (rel-L2 <= 1e-4) and bf16 (within 2x torch's own
//! bf16-vs-f32 spread), loaded from the diffusers folder and from a BFL single file; the same
//! on the klein-9B-shaped fixture (`goldens/transformer_forward_9b`: more blocks and heads, a
//! wider context, bf16 shards on disk).

mod golden_forward;

use candle_core::{DType, Device, Tensor};
use denoiser_svc::{
    model::{AttentionConfig, Flux2Transformer2DModel},
    weights::Checkpoint,
};
use golden_forward::{Outputs, ids};
use klein_test_support::{golden, manifest, pipeline_dir, rel_l2, take, test_device};

/// A fixture pipeline and its forward golden.
struct Fixture {
    pipeline: &'static str,
    golden: &'static str,
}

const KLEIN_4B: Fixture = Fixture {
    pipeline: "tiny-klein-4b",
    golden: "transformer_forward",
};

const KLEIN_9B: Fixture = Fixture {
    pipeline: "tiny-klein-9b",
    golden: "transformer_forward_9b",
};

fn model(fixture: &Fixture, dtype: DType, attention: AttentionConfig) -> Flux2Transformer2DModel {
    Checkpoint::locate(&pipeline_dir(fixture.pipeline))
        .unwrap()
        .load(dtype, &test_device(), attention)
        .unwrap()
}

fn spread(fixture: &Fixture, output: &str) -> f64 {
    manifest()["cases"][fixture.golden]["spread"][output]["rel_l2"]
        .as_f64()
        .unwrap()
}

fn run(fixture: &Fixture, m: &Flux2Transformer2DModel, dtype: DType) -> Outputs {
    golden_forward::run(fixture.golden, m, dtype)
}

fn check_f32(fixture: &Fixture) {
    let g = golden(fixture.golden);
    let m = model(fixture, DType::F32, AttentionConfig::default());
    let out = run(fixture, &m, DType::F32);
    let want_noisy = take(&g, "ref.output.f32").narrow(1, 0, out.noisy.dim(1).unwrap());
    let e = rel_l2(&out.plain, take(&g, "output.f32"));
    let e_ref = rel_l2(&out.refs, take(&g, "ref.output.f32"));
    let e_noisy = rel_l2(&out.noisy, &want_noisy.unwrap());
    println!(
        "{} f32 forward rel-L2: {e:.3e}; with references: {e_ref:.3e}, their noisy tokens alone: {e_noisy:.3e}",
        fixture.pipeline
    );
    assert!(e <= 1e-4, "{e}");
    assert!(e_ref <= 1e-4, "{e_ref}");
    assert!(e_noisy <= 1e-4, "{e_noisy}");
}

fn check_bf16(fixture: &Fixture) {
    let g = golden(fixture.golden);
    let m = model(fixture, DType::BF16, AttentionConfig::default());
    let out = run(fixture, &m, DType::BF16);
    let e = rel_l2(&out.plain, take(&g, "output.bf16"));
    let want_ref = take(&g, "ref.output.bf16").narrow(1, 0, 24).unwrap();
    let e_ref = rel_l2(&out.refs.narrow(1, 0, 24).unwrap(), &want_ref);
    let e_noisy = rel_l2(&out.noisy, &want_ref);
    let (s, s_ref) = (
        spread(fixture, "output"),
        spread(fixture, "ref.output[:, :24]"),
    );
    println!(
        "{} bf16 forward rel-L2: {e:.3e} (torch spread {s:.3e}); with references: {e_ref:.3e}, their noisy tokens alone: {e_noisy:.3e} (spread {s_ref:.3e})",
        fixture.pipeline
    );
    assert!(e <= 2.0 * s, "{e} > 2 x {s}");
    assert!(e_ref <= 2.0 * s_ref, "{e_ref} > 2 x {s_ref}");
    assert!(e_noisy <= 2.0 * s_ref, "{e_noisy} > 2 x {s_ref}");
}

#[test]
fn f32_forward_matches_diffusers() {
    check_f32(&KLEIN_4B);
}

#[test]
fn bf16_forward_is_within_the_torch_spread() {
    check_bf16(&KLEIN_4B);
}

#[test]
fn klein_9b_f32_forward_matches_diffusers() {
    check_f32(&KLEIN_9B);
}

#[test]
fn klein_9b_bf16_forward_is_within_the_torch_spread() {
    check_bf16(&KLEIN_9B);
}

/// The 9B-shaped folder's config is read as such (not as the 4B one or the class defaults),
/// from sharded bf16 weights, and the model is built to it.
#[test]
fn klein_9b_config_has_the_9b_shape() {
    let ckpt = Checkpoint::locate(&pipeline_dir(KLEIN_9B.pipeline)).unwrap();
    let c = &ckpt.config;
    assert_eq!((c.num_layers, c.num_single_layers), (3, 3));
    assert_eq!((c.num_attention_heads, c.attention_head_dim), (3, 32));
    assert_eq!((c.hidden_size(), c.mlp_hidden()), (96, 288));
    assert_eq!(c.joint_attention_dim, 288);
    assert_eq!(ckpt.is_distilled, Some(true));
    assert_eq!(ckpt.model_id, KLEIN_9B.pipeline);
    assert_eq!(ckpt.files.len(), 3, "sharded: {:?}", ckpt.files);
    let on_disk: usize = ckpt
        .files
        .iter()
        .flat_map(|f| candle_core::safetensors::load(f, &Device::Cpu).unwrap())
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(on_disk as u64, c.param_count());
    let m = ckpt
        .load(DType::F32, &Device::Cpu, AttentionConfig::default())
        .unwrap();
    assert_eq!(m.config(), c);
    let base = Checkpoint::locate(&pipeline_dir(KLEIN_4B.pipeline)).unwrap();
    assert_eq!(
        (base.config.num_layers, base.config.num_single_layers),
        (2, 2)
    );
    assert_eq!(base.config.joint_attention_dim, 192);
}

/// A batch of two with references: each item's noisy tokens alone are the whole forward's
/// rows (the last block's row views over a strided batch); asking for no token or more tokens
/// than there are is refused.
#[test]
fn a_batchs_noisy_tokens_alone_are_the_whole_forwards_rows() {
    let g = golden(KLEIN_4B.golden);
    let dev = test_device();
    let m = model(&KLEIN_4B, DType::F32, AttentionConfig::default());
    let input = |name: &str| take(&g, name).to_device(&dev).unwrap();
    let hs = input("ref.hidden_states");
    let hs = Tensor::cat(&[&hs, &(&hs * 0.5).unwrap()], 0).unwrap();
    let ehs = input("encoder_hidden_states");
    let ehs = Tensor::cat(&[&ehs, &ehs.flip(&[1]).unwrap()], 0).unwrap();
    let mut all = ids(take(&g, "txt_ids"));
    all.extend(ids(take(&g, "ref.img_ids")));
    let rope = m.rope(&all, &dev).unwrap();
    let noisy = take(&g, "hidden_states").dim(1).unwrap();
    let t = [730.0, 410.0];
    let whole = m.forward(&hs, &ehs, &t, &rope).unwrap();
    let alone = m.forward_first(&hs, &ehs, &t, &rope, noisy).unwrap();
    let e = rel_l2(&alone, &whole.narrow(1, 0, noisy).unwrap());
    println!("noisy tokens alone against the whole forward's rows: rel-L2 {e:.3e}");
    assert!(e <= 1e-6, "{e}");
    for outputs in [0, hs.dim(1).unwrap() + 1] {
        assert!(m.forward_first(&hs, &ehs, &t, &rope, outputs).is_err());
    }
}

#[test]
fn tiny_score_chunks_change_nothing() {
    let g = golden("transformer_forward");
    // One query row per chunk.
    let out = run(
        &KLEIN_4B,
        &model(
            &KLEIN_4B,
            DType::F32,
            AttentionConfig { max_score_bytes: 1 },
        ),
        DType::F32,
    );
    let want_ref = take(&g, "ref.output.f32");
    let want_noisy = want_ref.narrow(1, 0, out.noisy.dim(1).unwrap()).unwrap();
    assert!(rel_l2(&out.plain, take(&g, "output.f32")) <= 1e-4);
    assert!(rel_l2(&out.refs, want_ref) <= 1e-4);
    assert!(rel_l2(&out.noisy, &want_noisy) <= 1e-4);
}

/// `q4k` / `q8_0` projections: the quantized model computes exactly the dense model whose block
/// projections are their quantized-then-dequantized weights (ggml blocks never cross a row, so
/// stacking q/k/v before quantizing changes nothing). How far that moves the output from the
/// f32 golden is the formats' own error, asserted only to be non-zero and below a sanity bound:
/// q8_0 6.7e-3; q4k 0.10 (the tiny model's 64- and 192-wide rows fall back to q4_0, ~10 %
/// error per weight on these Gaussian weights).
#[test]
fn quantized_projections_compute_the_dense_model_of_their_dequantized_weights() {
    use std::collections::HashMap;

    use candle_nn::VarBuilder;
    use klein_kernels::quant::{QuantFormat, Quantize, quantize_rows};

    let dev = test_device();
    let g = golden(KLEIN_4B.golden);
    let checkpoint = Checkpoint::locate(&pipeline_dir(KLEIN_4B.pipeline)).unwrap();
    let tensors: HashMap<String, Tensor> = checkpoint
        .files
        .iter()
        .flat_map(|f| candle_core::safetensors::load(f, &Device::Cpu).unwrap())
        .map(|(k, t)| (k, t.to_dtype(DType::F32).unwrap()))
        .collect();
    let in_blocks = |k: &str| {
        k.starts_with("transformer_blocks.") || k.starts_with("single_transformer_blocks.")
    };
    for (format, bound) in [(QuantFormat::Q8_0, 0.02), (QuantFormat::Q4K, 0.2)] {
        let mut quantized_weights = 0;
        let dequantized: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| {
                let width = t.dims().last().copied().unwrap_or(0);
                let fmt = format.for_width(width);
                let t = match fmt {
                    // Quantized on the host, dequantized on the device, as the model does.
                    Some(f) if t.rank() == 2 && in_blocks(k) => {
                        quantized_weights += t.elem_count();
                        quantize_rows(t, f.ggml(), &dev)
                            .and_then(|q| q.dequantize(&dev))
                            .unwrap()
                    }
                    _ => t.to_device(&dev).unwrap(),
                };
                (k.clone(), t)
            })
            .collect();
        let cfg = checkpoint.config.clone();
        let dense = Flux2Transformer2DModel::new(
            &cfg,
            VarBuilder::from_tensors(dequantized, DType::F32, &dev),
        )
        .unwrap();
        let quantized = checkpoint
            .clone()
            .with_quantize(Quantize::Format(format))
            .load(DType::F32, &dev, AttentionConfig::default())
            .unwrap();
        let (want, got) = (
            run(&KLEIN_4B, &dense, DType::F32),
            run(&KLEIN_4B, &quantized, DType::F32),
        );
        let same = rel_l2(&got.noisy, &want.noisy).max(rel_l2(&got.plain, &want.plain));
        let got = got.plain;
        let from_golden = rel_l2(&got, take(&g, "output.f32"));
        println!(
            "{format}: {quantized_weights} weights quantized; rel-L2 against the dequantized \
             dense model {same:.3e}, against the f32 golden {from_golden:.3e}"
        );
        let projections: usize = cfg.projections().iter().map(|&(c, r, w)| c * r * w).sum();
        assert_eq!(quantized_weights, projections);
        assert_eq!(same, 0.0, "{format}");
        assert!(
            from_golden > 1e-4 && from_golden < bound,
            "{format}: {from_golden}"
        );
        // The projections' f32 bytes shrink at least 3.7-fold (q8_0: 34 bytes per 32 weights).
        let saved = checkpoint.weight_bytes(DType::F32)
            - checkpoint
                .clone()
                .with_quantize(Quantize::Format(format))
                .weight_bytes(DType::F32);
        assert!(saved as f64 >= projections as f64 * 4.0 * (1.0 - 1.0 / 3.7));
    }
}
