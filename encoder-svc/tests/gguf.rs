//! Pre-quantized GGUF weights: a Qwen3 GGUF file written here from the tiny checkpoint (names,
//! metadata and block formats as llama.cpp lays them out, quantized the way `--quantize q4k`
//! does) loads through `--gguf` and gives exactly the model that quantizing at load time gives.

mod common;

use std::{fs::File, path::PathBuf};

use candle_core::{DType, Device, Tensor, quantized::QTensor, quantized::gguf_file};
use encoder_svc::{
    config::Quantize,
    engine::{Encoder, ModelSpec},
    error::EncoderError,
    model::{
        gguf::{ARCHITECTURE, GgufFile, keys, tensor_name, write_gguf as write_gguf_file},
        quant::QuantFormat,
        qwen3::Config,
        weights::QuantPlan,
    },
    prompt::pad,
};
use klein_runtime::weights::{read_config, safetensors_files};
use klein_test_support::{max_abs_diff, test_device};

fn config_json() -> Config {
    read_config(&common::model_dir().join("text_encoder/config.json")).unwrap()
}

/// A file in the temp folder, removed when dropped (the test binaries also run on machines
/// where the build's target folder does not exist).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes the tiny text encoder as a Qwen3 GGUF file (embedding q8_0, projections q4k or its
/// q4_0 fallback, norms f32) with `rope_theta` as its RoPE base.
fn write_gguf(name: &str, rope_theta: f32) -> TempFile {
    let cfg = config_json();
    let plan = QuantPlan::of(Quantize::Format(QuantFormat::Q4K)).unwrap();
    let dir = common::model_dir().join("text_encoder");
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for file in safetensors_files(&dir).unwrap() {
        for (key, t) in candle_core::safetensors::load(&file, &Device::Cpu).unwrap() {
            let Some(gguf) = tensor_name(&key) else {
                continue;
            };
            let t = t.to_dtype(DType::F32).unwrap();
            let format = match t.dims() {
                [_, width] if key.ends_with("embed_tokens.weight") => {
                    plan.embedding.unwrap().for_width(*width).unwrap().ggml()
                }
                [_, width] => plan.linear.for_width(*width).unwrap().ggml(),
                _ => candle_core::quantized::GgmlDType::F32,
            };
            tensors.push((gguf, QTensor::quantize(&t, format).unwrap()));
        }
    }
    let u32v = |v: usize| gguf_file::Value::U32(v as u32);
    let metadata = [
        (
            "general.architecture",
            gguf_file::Value::String(ARCHITECTURE.into()),
        ),
        (keys::BLOCK_COUNT, u32v(cfg.num_hidden_layers)),
        (keys::EMBEDDING_LENGTH, u32v(cfg.hidden_size)),
        (keys::FEED_FORWARD_LENGTH, u32v(cfg.intermediate_size)),
        (keys::HEAD_COUNT, u32v(cfg.num_attention_heads)),
        (keys::HEAD_COUNT_KV, u32v(cfg.num_key_value_heads)),
        (keys::KEY_LENGTH, u32v(cfg.head_dim())),
        (
            keys::RMS_EPS,
            gguf_file::Value::F32(cfg.rms_norm_eps as f32),
        ),
        (keys::ROPE_FREQ_BASE, gguf_file::Value::F32(rope_theta)),
    ];
    let path = std::env::temp_dir().join(format!("encoder-svc-{}-{name}", std::process::id()));
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut File::create(&path).unwrap(), &metadata, &tensors).unwrap();
    TempFile(path)
}

fn load(gguf: Option<PathBuf>, quantize: Quantize) -> Result<Encoder, EncoderError> {
    let spec = ModelSpec {
        model_dir: common::model_dir(),
        gguf,
        dtype: DType::F32,
        quantize: QuantPlan::of(quantize),
    };
    Encoder::load(&spec, common::tokenizer().pad_id(), &test_device())
}

#[test]
fn gguf_metadata_describes_the_checkpoint() {
    let file = write_gguf("tiny-meta.gguf", 1e6);
    let from_gguf = GgufFile::open(&file.0).unwrap().config().unwrap();
    let json = config_json();
    assert_eq!(from_gguf.vocab_size, json.vocab_size);
    assert_eq!(from_gguf.hidden_size, json.hidden_size);
    assert_eq!(from_gguf.intermediate_size, json.intermediate_size);
    assert_eq!(from_gguf.num_hidden_layers, json.num_hidden_layers);
    assert_eq!(from_gguf.num_attention_heads, json.num_attention_heads);
    assert_eq!(from_gguf.num_key_value_heads, json.num_key_value_heads);
    assert_eq!(from_gguf.head_dim(), json.head_dim());
    assert_eq!(
        from_gguf.rms_norm_eps, json.rms_norm_eps,
        "1e-6 survives the f32 round trip"
    );
    assert_eq!(from_gguf.rope_theta(), json.rope_theta());
}

#[test]
fn gguf_weights_equal_quantizing_at_load_time() {
    let file = write_gguf("tiny-q4k.gguf", 1e6);
    let gguf = load(Some(file.0.clone()), Quantize::None).unwrap();
    let quantized = load(None, Quantize::Format(QuantFormat::Q4K)).unwrap();
    assert_eq!(gguf.report().by_format(), quantized.report().by_format());
    assert_eq!(
        gguf.report().total_bytes(),
        quantized.report().total_bytes()
    );
    // A short sequence keeps the debug-build forward cheap; the model is the same at any length.
    let tokenizer = common::tokenizer();
    let ids = tokenizer.encode(&common::fixture_prompts()[2]).unwrap();
    let (ids, mask) = pad(&ids.ids, tokenizer.pad_id());
    let len = 48;
    let device = test_device();
    let ids = Tensor::from_slice(&ids[..len], (1, len), &device).unwrap();
    let mask = Tensor::from_slice(&mask[..len], (1, len), &device).unwrap();
    let a = gguf.model().forward(&ids, &mask).unwrap();
    let b = quantized.model().forward(&ids, &mask).unwrap();
    assert_eq!(a.dims(), &[1, len, 192]);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// The library's writer (`klein quantize --text-encoder-out`) writes the tensors this test's
/// llama.cpp-layout writer writes, block for block, with the metadata the reader needs; it
/// quantizes on the test device (on a GPU, `klein quantize --device cuda`), the reference on
/// the host.
#[test]
fn the_written_gguf_is_the_llama_cpp_layout_quantized_as_at_load_time() {
    let want = write_gguf("tiny-want.gguf", 1e6);
    let path = std::env::temp_dir().join(format!(
        "encoder-svc-{}-tiny-written.gguf",
        std::process::id()
    ));
    let got = TempFile(path.clone());
    let plan = QuantPlan::of(Quantize::Format(QuantFormat::Q4K)).unwrap();
    let written = write_gguf_file(&common::model_dir(), plan, &got.0, &test_device()).unwrap();
    let (want, got) = (
        klein_runtime::weights::gguf::GgufFile::open(&want.0).unwrap(),
        klein_runtime::weights::gguf::GgufFile::open(&got.0).unwrap(),
    );
    let names = |f: &klein_runtime::weights::gguf::GgufFile| {
        let mut n: Vec<String> = f.tensor_infos().map(|(n, _)| n.to_owned()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&got), names(&want));
    assert_eq!(written.tensors, names(&got).len());
    let mut blocks = 0;
    for name in names(&want) {
        let (a, b) = (
            got.tensor(&name, &Device::Cpu).unwrap(),
            want.tensor(&name, &Device::Cpu).unwrap(),
        );
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}");
        assert_eq!(a.data().unwrap(), b.data().unwrap(), "{name}");
        blocks += usize::from(a.dtype().block_size() > 1);
    }
    assert_eq!(written.quantized, blocks);
    let from_file = GgufFile::open(&path).unwrap().config().unwrap();
    let json = config_json();
    assert_eq!(
        (
            from_file.num_hidden_layers,
            from_file.head_dim(),
            from_file.rope_theta()
        ),
        (json.num_hidden_layers, json.head_dim(), json.rope_theta())
    );
}

#[test]
fn writing_from_a_folder_without_a_text_encoder_is_a_configuration_error() {
    let plan = QuantPlan::of(Quantize::Format(QuantFormat::Q4K)).unwrap();
    let out = std::env::temp_dir().join(format!("encoder-svc-{}-none.gguf", std::process::id()));
    let transformer = common::model_dir().join("transformer");
    match write_gguf_file(&transformer, plan, &out, &Device::Cpu) {
        Err(EncoderError::Config(msg)) => assert!(msg.contains("no Qwen3 text encoder"), "{msg}"),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a transformer folder was written as a text encoder"),
    }
    assert!(!out.exists());
}

#[test]
fn a_gguf_that_disagrees_with_config_json_is_refused() {
    let file = write_gguf("tiny-theta.gguf", 1e4);
    match load(Some(file.0.clone()), Quantize::None) {
        Err(EncoderError::Config(msg)) => assert!(msg.contains("does not match"), "{msg}"),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a GGUF with another RoPE base was accepted"),
    }
}
