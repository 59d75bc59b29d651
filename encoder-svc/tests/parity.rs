//! Embeddings against the diffusers goldens on `$KLEIN_TEST_DEVICE` (all four fixture prompts
//! in one batch, which also exercises batching sequences of different lengths):
//! - f32: rel-L2 <= 1e-4;
//! - bf16: rel-L2 <= 2x the bf16-vs-f32 spread torch showed for that prompt;
//! - 4-bit (`--quantize q4k`; on the tiny model every row is 64 or 128 wide, so the
//!   projections fall back to q4_0): rel-L2 vs the f32 golden, printed per prompt and held
//!   under a sanity bound.

mod common;

use candle_core::{DType, Tensor};
use encoder_svc::{
    config::Quantize,
    engine::{Encoder, ModelSpec},
    model::quant::QuantFormat,
};
use klein_test_support::{golden, manifest, rel_l2, take, test_device};

/// Encodes every fixture prompt as one batch: (4, 512, 192).
fn encode_all(dtype: DType, quantize: Quantize) -> (Encoder, Tensor) {
    let tokenizer = common::tokenizer();
    let spec = ModelSpec {
        model_dir: common::model_dir(),
        gguf: None,
        dtype,
        quantize: quantize.plan(),
    };
    let encoder = Encoder::load(&spec, tokenizer.pad_id(), &test_device()).unwrap();
    let ids: Vec<_> = common::fixture_prompts()
        .iter()
        .map(|p| tokenizer.encode(p).unwrap())
        .collect();
    let out = encoder.encode(&ids).unwrap();
    (encoder, out)
}

fn reference(i: usize, suffix: &str) -> Tensor {
    take(
        &golden("text_embeddings"),
        &format!("p{i}.prompt_embeds.{suffix}"),
    )
    .squeeze(0)
    .unwrap()
}

#[test]
fn f32_matches_diffusers() {
    let (_, out) = encode_all(DType::F32, Quantize::None);
    assert_eq!(out.dims(), &[4, 512, 192]);
    assert_eq!(out.dtype(), DType::F32);
    for i in 0..4 {
        let err = rel_l2(&out.get(i).unwrap(), &reference(i, "f32"));
        println!("f32 p{i}: rel-L2 {err:.3e}");
        assert!(err <= 1e-4, "p{i}: rel-L2 {err:.3e}");
    }
}

#[test]
fn bf16_is_within_the_torch_spread() {
    let (_, out) = encode_all(DType::BF16, Quantize::None);
    assert_eq!(out.dtype(), DType::BF16);
    let spread = &manifest()["cases"]["text_embeddings"]["spread"];
    for i in 0..4 {
        let torch = spread[format!("p{i}.prompt_embeds")]["rel_l2"]
            .as_f64()
            .unwrap();
        let ours = out.get(i).unwrap();
        let err = rel_l2(&ours, &reference(i, "bf16"));
        let vs_f32 = rel_l2(&ours, &reference(i, "f32"));
        println!(
            "bf16 p{i}: vs torch bf16 {err:.3e}, vs f32 {vs_f32:.3e}, torch spread {torch:.3e}"
        );
        assert!(err <= 2.0 * torch, "p{i}: {err:.3e} > 2 x {torch:.3e}");
        assert!(vs_f32 <= 2.0 * torch, "p{i}: {vs_f32:.3e} vs f32");
    }
}

#[test]
fn four_bit_stays_close_to_f32() {
    let (encoder, out) = encode_all(DType::F32, Quantize::Format(QuantFormat::Q4K));
    let by_format = encoder.report().by_format();
    // 27 layers x 7 projections fall back to q4_0; the embedding is q8_0; 27 x 4 norms stay f32.
    assert_eq!(by_format["q4_0"].0, 27 * 7, "{by_format:?}");
    assert_eq!(by_format["q8_0"].0, 1, "{by_format:?}");
    assert_eq!(by_format["f32"].0, 27 * 4, "{by_format:?}");
    println!("4-bit weights: {}", encoder.report().summary());
    for i in 0..4 {
        let err = rel_l2(&out.get(i).unwrap(), &reference(i, "f32"));
        println!("q4k (q4_0 fallback) p{i}: rel-L2 vs f32 {err:.3e}");
        assert!(err < 0.3, "p{i}: rel-L2 {err:.3e}");
    }
}
