//! Embeddings against the diffusers goldens on `$KLEIN_TEST_DEVICE` (all four fixture prompts
//! in one batch, which also exercises batching sequences of different lengths), on the
//! klein-4B-shaped fixture and on the klein-9B-shaped one (Qwen3-8B-like encoder: other widths
//! and head counts, an untied `lm_head` the encoder must ignore):
//! - f32: rel-L2 <= 1e-4;
//! - bf16: rel-L2 <= 2x the bf16-vs-f32 spread torch showed for that prompt;
//! - 4-bit (`--quantize q4k`; on the tiny model every row is 64 or 128 wide, so the
//!   projections fall back to q4_0): rel-L2 vs the f32 golden, printed per prompt and held
//!   under a sanity bound.

mod common;

use candle_core::{DType, Device, Tensor};
use encoder_svc::{
    config::Quantize,
    engine::{Encoder, ModelSpec},
    model::{quant::QuantFormat, weights::QuantPlan},
};
use klein_runtime::weights::{read_config, safetensors_files};
use klein_test_support::{golden, manifest, pipeline_dir, rel_l2, take, test_device};

/// A fixture pipeline and its embeddings golden.
struct Fixture {
    pipeline: &'static str,
    golden: &'static str,
    /// Width of the embeddings: 3 x the encoder's hidden size.
    width: usize,
}

const KLEIN_4B: Fixture = Fixture {
    pipeline: "tiny-klein-4b",
    golden: "text_embeddings",
    width: 192,
};

const KLEIN_9B: Fixture = Fixture {
    pipeline: "tiny-klein-9b",
    golden: "text_embeddings_9b",
    width: 288,
};

/// Encodes every fixture prompt as one batch: (4, 512, width).
fn encode_all(fixture: &Fixture, dtype: DType, quantize: Quantize) -> (Encoder, Tensor) {
    let model_dir = pipeline_dir(fixture.pipeline);
    let tokenizer = common::tokenizer_in(&model_dir);
    let spec = ModelSpec {
        model_dir,
        gguf: None,
        dtype,
        quantize: QuantPlan::of(quantize),
    };
    let encoder = Encoder::load(&spec, tokenizer.pad_id(), &test_device()).unwrap();
    let ids: Vec<_> = common::fixture_prompts()
        .iter()
        .map(|p| tokenizer.encode(p).unwrap())
        .collect();
    let out = encoder.encode(&ids).unwrap();
    assert_eq!(out.dims(), &[4, 512, fixture.width]);
    assert_eq!(out.dtype(), dtype);
    (encoder, out)
}

fn reference(fixture: &Fixture, i: usize, suffix: &str) -> Tensor {
    take(
        &golden(fixture.golden),
        &format!("p{i}.prompt_embeds.{suffix}"),
    )
    .squeeze(0)
    .unwrap()
}

fn check_f32(fixture: &Fixture) -> Encoder {
    let (encoder, out) = encode_all(fixture, DType::F32, Quantize::None);
    for i in 0..4 {
        let err = rel_l2(&out.get(i).unwrap(), &reference(fixture, i, "f32"));
        println!("{} f32 p{i}: rel-L2 {err:.3e}", fixture.pipeline);
        assert!(err <= 1e-4, "p{i}: rel-L2 {err:.3e}");
    }
    encoder
}

fn check_bf16(fixture: &Fixture) {
    let (_, out) = encode_all(fixture, DType::BF16, Quantize::None);
    let spread = &manifest()["cases"][fixture.golden]["spread"];
    for i in 0..4 {
        let torch = spread[format!("p{i}.prompt_embeds")]["rel_l2"]
            .as_f64()
            .unwrap();
        let ours = out.get(i).unwrap();
        let err = rel_l2(&ours, &reference(fixture, i, "bf16"));
        let vs_f32 = rel_l2(&ours, &reference(fixture, i, "f32"));
        println!(
            "{} bf16 p{i}: vs torch bf16 {err:.3e}, vs f32 {vs_f32:.3e}, torch spread {torch:.3e}",
            fixture.pipeline
        );
        assert!(err <= 2.0 * torch, "p{i}: {err:.3e} > 2 x {torch:.3e}");
        assert!(vs_f32 <= 2.0 * torch, "p{i}: {vs_f32:.3e} vs f32");
    }
}

#[test]
fn f32_matches_diffusers() {
    check_f32(&KLEIN_4B);
}

#[test]
fn bf16_is_within_the_torch_spread() {
    check_bf16(&KLEIN_4B);
}

#[test]
fn klein_9b_f32_matches_diffusers_and_skips_the_lm_head() {
    let encoder = check_f32(&KLEIN_9B);
    let loaded = &encoder.report().tensors;
    assert!(
        loaded.iter().all(|t| t.key.starts_with("model.")),
        "only model.* is loaded: {loaded:?}"
    );
    assert_eq!(encoder.model().config().hidden_size, 96);
}

#[test]
fn klein_9b_bf16_is_within_the_torch_spread() {
    check_bf16(&KLEIN_9B);
}

/// The 9B-shaped checkpoint carries what the encoder must ignore: an untied `lm_head.weight`
/// (Qwen3-8B), unlike the 4B one whose head is the embedding table.
#[test]
fn klein_9b_checkpoint_has_an_untied_lm_head() {
    for (fixture, untied) in [(KLEIN_4B, false), (KLEIN_9B, true)] {
        let dir = pipeline_dir(fixture.pipeline).join("text_encoder");
        let config: serde_json::Value = read_config(&dir.join("config.json")).unwrap();
        assert_eq!(
            config["tie_word_embeddings"], !untied,
            "{}",
            fixture.pipeline
        );
        let mut tensors = std::collections::HashMap::new();
        for file in safetensors_files(&dir).unwrap() {
            tensors.extend(candle_core::safetensors::load(&file, &Device::Cpu).unwrap());
        }
        let embed = take(&tensors, "model.embed_tokens.weight");
        match tensors.get("lm_head.weight") {
            Some(head) => {
                assert!(untied, "{}: lm_head.weight saved", fixture.pipeline);
                assert_eq!(head.dims(), embed.dims());
                let diff = rel_l2(head, embed);
                assert!(diff > 0.5, "lm_head is a copy of the embeddings ({diff})");
            }
            None => assert!(!untied, "{}: no lm_head.weight", fixture.pipeline),
        }
    }
}

#[test]
fn four_bit_stays_close_to_f32() {
    let (encoder, out) = encode_all(&KLEIN_4B, DType::F32, Quantize::Format(QuantFormat::Q4K));
    let by_format = encoder.report().by_format();
    // 27 layers x 7 projections fall back to q4_0; the embedding is q8_0; 27 x 4 norms stay f32.
    assert_eq!(by_format["q4_0"].0, 27 * 7, "{by_format:?}");
    assert_eq!(by_format["q8_0"].0, 1, "{by_format:?}");
    assert_eq!(by_format["f32"].0, 27 * 4, "{by_format:?}");
    println!("4-bit weights: {}", encoder.report().summary());
    for i in 0..4 {
        let err = rel_l2(&out.get(i).unwrap(), &reference(&KLEIN_4B, i, "f32"));
        println!("q4k (q4_0 fallback) p{i}: rel-L2 vs f32 {err:.3e}");
        assert!(err < 0.3, "p{i}: rel-L2 {err:.3e}");
    }
}

/// A bf16 4-bit encoder loaded from its files (on a GPU its quantizer reads the checkpoint's
/// bytes, `quantize_mapped`) encodes exactly as one built from a host copy of the same files
/// (read through its builder, `quantize_rows`).
#[test]
fn four_bit_from_the_files_equals_four_bit_from_a_host_copy() {
    use klein_runtime::{models::HostWeights, weights::component_dir};
    let model_dir = pipeline_dir(KLEIN_4B.pipeline);
    let tokenizer = common::tokenizer_in(&model_dir);
    let spec = ModelSpec {
        model_dir: model_dir.clone(),
        gguf: None,
        dtype: DType::BF16,
        quantize: QuantPlan::of(Quantize::Format(QuantFormat::Q4K)),
    };
    let dev = test_device();
    let from_files = Encoder::load(&spec, tokenizer.pad_id(), &dev).unwrap();
    let files = safetensors_files(&component_dir(&model_dir, "text_encoder").unwrap()).unwrap();
    let host = HostWeights::read(&files, DType::BF16, |_| true).unwrap();
    let from_host = Encoder::from_host(&spec, &host, tokenizer.pad_id(), &dev).unwrap();
    assert_eq!(
        from_files.report().by_format(),
        from_host.report().by_format()
    );
    let ids: Vec<_> = common::fixture_prompts()
        .iter()
        .map(|p| tokenizer.encode(p).unwrap())
        .collect();
    let (a, b) = (
        from_files.encode(&ids).unwrap(),
        from_host.encode(&ids).unwrap(),
    );
    let diff = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "largest difference between the two loads");
}
