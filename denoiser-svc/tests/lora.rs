//! LoRA adapters merged at load against diffusers (`loras/golden.safetensors`, written by
//! `tools/reference/lora.py`): one random LoRA of tiny-klein-4b in diffusers', ai-toolkit's and
//! kohya's layouts, each loaded and fused by diffusers at `lora_scale` 0.8. The f32 forward with
//! each file merged matches its golden (rel-L2 <= 1e-4; leaving out any one module moves it by
//! at least 4e-3, and the whole adapter by 0.19), from the diffusers folder and from a BFL
//! single file; bf16 stays within twice torch's own spread; quantized at load the adapter is
//! merged before the blocks are cut. Files that cannot be merged are refused with their reason.

mod bfl_layout;
mod golden_forward;
mod lora_golden;

use std::{collections::HashMap, path::PathBuf};

use candle_core::{DType, Device, Tensor, quantized::GgmlDType};
use denoiser_svc::{lora::LoraSpec, model::AttentionConfig, weights::Checkpoint};
use klein_kernels::quant::{QuantFormat, Quantize};
use klein_test_support::{fixtures_dir, golden, rel_l2, take};
use lora_golden::{LAYOUTS, forward, golden_lora, load, lora_file, manifest_lora, scale, tiny_4b};

fn spec(layout: &str, scale: f32) -> LoraSpec {
    LoraSpec {
        path: lora_file(layout),
        scale,
    }
}

#[test]
fn each_layout_merges_as_diffusers_fuses_it() {
    let g = golden_lora();
    let plain = forward(&load(tiny_4b(), DType::F32), DType::F32);
    for layout in LAYOUTS {
        let want = take(&g, &format!("output.{layout}.f32"));
        let ckpt = tiny_4b().with_loras(&[spec(layout, scale())]).unwrap();
        let e = rel_l2(&forward(&load(ckpt, DType::F32), DType::F32), want);
        let without = rel_l2(&plain, want);
        println!("{layout}: f32 rel-L2 {e:.3e} (without the LoRA {without:.3e})");
        assert!(e <= 1e-4, "{layout}: {e}");
        assert!(without > 0.1, "{layout}: the adapter matters ({without})");
    }
}

/// Two entries of the same file add up: 0.5 + 0.3 of it is the golden's 0.8.
#[test]
fn adapters_add_up() {
    let g = golden_lora();
    let (a, b) = (0.5, scale() - 0.5);
    let ckpt = tiny_4b()
        .with_loras(&[spec("diffusers", a), spec("kohya", b)])
        .unwrap();
    let e = rel_l2(
        &forward(&load(ckpt, DType::F32), DType::F32),
        take(&g, "output.diffusers.f32"),
    );
    assert!(e <= 1e-4, "{e}");
}

/// A BFL single file (fused qkv, its final layer's halves swapped) takes the adapter as the
/// diffusers folder does.
#[test]
fn a_bfl_single_file_takes_the_same_adapter() {
    let dir = std::env::temp_dir().join(format!("denoiser-lora-bfl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flux-2-klein-tiny.safetensors");
    candle_core::safetensors::save(&bfl_layout::tensors(), &path).unwrap();
    let g = golden_lora();
    for layout in ["ai_toolkit", "diffusers"] {
        let ckpt = Checkpoint::locate(&path)
            .unwrap()
            .with_loras(&[spec(layout, scale())])
            .unwrap();
        let e = rel_l2(
            &forward(&load(ckpt, DType::F32), DType::F32),
            take(&g, &format!("output.{layout}.f32")),
        );
        assert!(e <= 1e-4, "{layout}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// In bf16 the merged model is within twice the spread torch shows between its own bf16 and
/// f32 runs with the adapter fused.
#[test]
fn bf16_with_an_adapter_is_within_the_torch_spread() {
    let g = golden_lora();
    let ckpt = tiny_4b().with_loras(&[spec("diffusers", scale())]).unwrap();
    let out = forward(&load(ckpt, DType::BF16), DType::BF16);
    let e = rel_l2(&out, take(&g, "output.diffusers.f32"));
    let spread = manifest_lora()["spread"]["rel_l2"].as_f64().unwrap();
    println!("bf16 with the adapter: rel-L2 {e:.3e} (torch spread {spread:.3e})");
    assert!(e <= 2.0 * spread, "{e} > 2 x {spread}");
}

/// Quantized at load (on a GPU from the file's bytes, except the weights an adapter updates),
/// the merged weights are what is quantized: q8_0 moves the output from the golden no more
/// than twice as far as it moves the plain model from its own golden, and the model without
/// the adapter is far.
#[test]
fn quantized_at_load_the_adapter_is_merged_first() {
    let g = golden_lora();
    let q8 = Quantize::Format(QuantFormat::Q8_0);
    let want = take(&g, "output.diffusers.f32");
    let ckpt = tiny_4b()
        .with_quantize(q8)
        .with_loras(&[spec("diffusers", scale())])
        .unwrap();
    let e = rel_l2(&forward(&load(ckpt, DType::F32), DType::F32), want);
    let plain = forward(&load(tiny_4b().with_quantize(q8), DType::F32), DType::F32);
    let plain_e = rel_l2(&plain, take(&golden("transformer_forward"), "output.f32"));
    let without = rel_l2(&plain, want);
    println!(
        "q8_0 with the adapter: rel-L2 {e:.3e} (the plain model's {plain_e:.3e}); without it {without:.3e}"
    );
    assert!(e <= 2.0 * plain_e, "{e} > 2 x {plain_e}");
    assert!(without > 0.1, "{without}");
}

/// `tensors` saved as a LoRA file of its own.
fn write_lora(name: &str, tensors: HashMap<String, Tensor>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("denoiser-lora-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lora.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

fn pair(module: &str, rank: usize, out: usize, inp: usize) -> HashMap<String, Tensor> {
    let t = |shape: (usize, usize)| Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
    HashMap::from([
        (format!("{module}.lora_A.weight"), t((rank, inp))),
        (format!("{module}.lora_B.weight"), t((out, rank))),
    ])
}

fn refusal(path: PathBuf) -> String {
    let err = match tiny_4b().with_loras(&[LoraSpec { path, scale: 1.0 }]) {
        Err(e) => e,
        Ok(ckpt) => ckpt
            .load(DType::F32, &Device::Cpu, AttentionConfig::default())
            .map(|_| ())
            .unwrap_err(),
    };
    err.to_string()
}

#[test]
fn adapters_that_cannot_be_merged_are_refused_with_their_reason() {
    let hidden = 64;
    let other_block = refusal(write_lora(
        "other-block",
        pair(
            "transformer.transformer_blocks.7.attn.to_q",
            2,
            hidden,
            hidden,
        ),
    ));
    assert!(
        other_block.contains("`transformer_blocks.7.attn.to_q` matches no weight"),
        "{other_block}"
    );
    let wrong_shape = refusal(write_lora(
        "wrong-shape",
        pair(
            "transformer.transformer_blocks.0.attn.to_q",
            2,
            2 * hidden,
            hidden,
        ),
    ));
    assert!(wrong_shape.contains("to_q"), "{wrong_shape}");
    let mut lokr = pair("transformer.proj_out", 2, 128, hidden);
    lokr.insert(
        "transformer.proj_out.lokr_w1".into(),
        Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    let lokr = refusal(write_lora("lokr", lokr));
    assert!(
        lokr.contains("unsupported key `transformer.proj_out.lokr_w1`"),
        "{lokr}"
    );
    let half = refusal(write_lora(
        "half",
        HashMap::from([(
            "diffusion_model.img_in.lora_A.weight".to_owned(),
            Tensor::ones((2, 128), DType::F32, &Device::Cpu).unwrap(),
        )]),
    ));
    assert!(half.contains("lacks its A (down) or B (up)"), "{half}");
    let mut mixed = pair("transformer.proj_out", 2, 128, hidden);
    mixed.extend(pair("diffusion_model.img_in", 2, hidden, 128));
    let mixed = refusal(write_lora("mixed", mixed));
    assert!(mixed.contains("mixes another layout's names in"), "{mixed}");
    let empty = refusal(write_lora("empty", HashMap::new()));
    assert!(empty.contains("no LoRA tensors"), "{empty}");
    let dora = write_lora("dora", HashMap::new());
    let metadata = r#"{"transformer.r": 2, "transformer.use_dora": true}"#;
    safetensors::serialize_to_file(
        pair("transformer.proj_out", 2, 128, hidden),
        Some(HashMap::from([(
            "lora_adapter_metadata".to_owned(),
            metadata.to_owned(),
        )])),
        &dora,
    )
    .unwrap();
    let dora = refusal(dora);
    assert!(
        dora.contains("DoRA adapters (use_dora) are not supported"),
        "{dora}"
    );
    let missing = refusal(fixtures_dir().join("loras/none.safetensors"));
    assert!(missing.contains("none.safetensors"), "{missing}");
    let gguf = bfl_layout::temp("lora.gguf");
    bfl_layout::write_gguf(&gguf, &bfl_layout::tensors(), "", |_, _| GgmlDType::F32);
    let err = Checkpoint::locate(&gguf.0)
        .unwrap()
        .with_loras(&[spec("diffusers", 1.0)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a GGUF transformer"), "{err}");
}
