//! LoRA adapters chosen per request, added unmerged to a resident model, against diffusers'
//! unfused forwards (`loras/golden.safetensors`, `tools/reference/lora.py`): the adapter loaded
//! with `set_adapters` at weight 0.8 (`output.unfused.*`), and two adapters at 1.1 and -0.6
//! (`output.unfused_pair.f32`). f32 within 1e-4 for every file layout, bf16 within twice
//! torch's own spread of the unfused forward; the view shares the model's weights, so the model
//! itself stays plain, also quantized at load or stored quantized in a GGUF file (which a merge
//! cannot take).

mod bfl_layout;
mod golden_forward;
mod lora_golden;

use candle_core::{DType, quantized::GgmlDType};
use std::path::PathBuf;

use denoiser_svc::{
    lora::{AdapterSpec, NamedAdapters},
    model::{Flux2Transformer2DModel, bfl::is_projection},
    weights::Checkpoint,
};
use klein_kernels::quant::{QuantFormat, Quantize};
use klein_test_support::{golden, pipeline_dir, rel_l2, take, test_device};
use lora_golden::{LAYOUTS, forward, golden_lora, load, lora_file, manifest_lora, scale, tiny_4b};

fn named(layouts: &[&str]) -> NamedAdapters {
    let specs: Vec<AdapterSpec> = layouts
        .iter()
        .map(|l| AdapterSpec {
            name: (*l).to_owned(),
            path: lora_file(l),
        })
        .collect();
    NamedAdapters::read(&specs).unwrap()
}

#[test]
fn each_layout_unmerged_is_diffusers_unfused_forward() {
    let g = golden_lora();
    let want = take(&g, "output.unfused.f32");
    let model = load(tiny_4b(), DType::F32);
    let adapters = named(&LAYOUTS)
        .resident(&model, DType::F32, &test_device())
        .unwrap();
    for layout in LAYOUTS {
        let view = adapters.view(&model, &[(layout.into(), scale())]).unwrap();
        let e = rel_l2(&forward(&view, DType::F32), want);
        println!("{layout}: unmerged f32 rel-L2 {e:.3e}");
        assert!(e <= 1e-4, "{layout}: {e}");
    }
    let plain = forward(&model, DType::F32);
    let e = rel_l2(&plain, take(&golden("transformer_forward"), "output.f32"));
    assert!(e <= 1e-4, "the model itself stays plain: {e}");
    let none = forward(&adapters.view(&model, &[]).unwrap(), DType::F32);
    assert_eq!(rel_l2(&none, &plain), 0.0);
}

/// Two adapters at their own scales add up, in one forward.
#[test]
fn two_adapters_at_their_own_scales() {
    let g = golden_lora();
    let model = load(tiny_4b(), DType::F32);
    let adapters = named(&["kohya", "diffusers"])
        .resident(&model, DType::F32, &test_device())
        .unwrap();
    let view = adapters
        .view(&model, &[("kohya".into(), 1.1), ("diffusers".into(), -0.6)])
        .unwrap();
    let e = rel_l2(
        &forward(&view, DType::F32),
        take(&g, "output.unfused_pair.f32"),
    );
    println!("kohya 1.1 + diffusers -0.6: rel-L2 {e:.3e}");
    assert!(e <= 1e-4, "{e}");
    assert!(adapters.view(&model, &[("anime".into(), 1.0)]).is_err());
}

#[test]
fn bf16_unmerged_is_within_the_torch_spread() {
    let g = golden_lora();
    let model = load(tiny_4b(), DType::BF16);
    let adapters = named(&["diffusers"])
        .resident(&model, DType::BF16, &test_device())
        .unwrap();
    let view = adapters
        .view(&model, &[("diffusers".into(), scale())])
        .unwrap();
    let e = rel_l2(&forward(&view, DType::BF16), take(&g, "output.unfused.f32"));
    let spread = manifest_lora()["unfused_spread"]["rel_l2"]
        .as_f64()
        .unwrap();
    println!("bf16 unmerged: rel-L2 {e:.3e} (torch spread {spread:.3e})");
    assert!(e <= 2.0 * spread, "{e} > 2 x {spread}");
}

/// `model` (quantized) with the `layout` adapter at the golden's strength: as close to the
/// unfused golden as the plain `model` is to its own golden (`what` names it in the output).
fn within_the_models_own_error(model: &Flux2Transformer2DModel, layout: &str, what: &str) {
    let g = golden_lora();
    let adapters = named(&[layout])
        .resident(model, DType::F32, &test_device())
        .unwrap();
    let view = adapters.view(model, &[(layout.into(), scale())]).unwrap();
    let e = rel_l2(&forward(&view, DType::F32), take(&g, "output.unfused.f32"));
    let plain_e = rel_l2(
        &forward(model, DType::F32),
        take(&golden("transformer_forward"), "output.f32"),
    );
    println!("{what} with the adapter: rel-L2 {e:.3e} (the plain model's {plain_e:.3e})");
    assert!(e <= 2.0 * plain_e, "{e} > 2 x {plain_e}");
}

/// On a model quantized at load (q8_0) the adapter's terms stay dense beside the quantized
/// layers.
#[test]
fn a_quantized_model_takes_dense_terms() {
    let q8 = Quantize::Format(QuantFormat::Q8_0);
    let model = load(tiny_4b().with_quantize(q8), DType::F32);
    within_the_models_own_error(&model, "diffusers", "q8_0 at load");
}

/// A GGUF transformer (ComfyUI's layout, its projections in Q8_0 blocks) takes the terms beside
/// its stored blocks.
#[test]
fn a_gguf_transformer_takes_the_terms_beside_its_blocks() {
    let file = bfl_layout::temp("adapters-q8.gguf");
    bfl_layout::write_gguf(&file, &bfl_layout::tensors(), "", |name, _| {
        if is_projection(name) {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        }
    });
    let gguf = Checkpoint::locate(&file.0).unwrap();
    assert!(gguf.config.stored_projections().count() > 0);
    within_the_models_own_error(&load(gguf, DType::F32), "kohya", "Q8_0 GGUF");
}

/// Adapters a model cannot serve are refused with their file and reason: a name given twice,
/// a name that is not one (a TOML entry skips the flag's parsing), a missing file, and another
/// model's adapter (the 4B fixture on the 9B-shaped model) when the model is built.
#[test]
fn adapters_that_cannot_be_served_are_refused_with_their_reason() {
    let spec = |name: &str, path: PathBuf| AdapterSpec {
        name: name.into(),
        path,
    };
    let refusal = |specs: &[AdapterSpec]| NamedAdapters::read(specs).unwrap_err().to_string();
    let file = lora_file("diffusers");
    let twice = refusal(&[spec("a", file.clone()), spec("a", lora_file("kohya"))]);
    assert!(twice.contains("adapter name \"a\" given twice"), "{twice}");
    let bad = refusal(&[spec("../a", file.clone())]);
    assert!(bad.contains("\"../a\" is not an adapter name"), "{bad}");
    let missing = refusal(&[spec("a", "/nonexistent/a.safetensors".into())]);
    assert!(missing.contains("/nonexistent/a.safetensors"), "{missing}");
    let nine = Checkpoint::locate(&pipeline_dir("tiny-klein-9b")).unwrap();
    let other = NamedAdapters::read(&[spec("a", file.clone())])
        .unwrap()
        .resident(&load(nine, DType::F32), DType::F32, &test_device())
        .unwrap_err()
        .to_string();
    assert!(
        other.contains(&file.display().to_string()) && other.contains("gives (64, 256) for"),
        "{other}"
    );
}

#[test]
fn device_bytes_bound_the_stored_factors() {
    let model = load(tiny_4b(), DType::F32);
    let named = named(&LAYOUTS);
    let adapters = named.resident(&model, DType::F32, &test_device()).unwrap();
    let stored = adapters.device_bytes();
    let bound = named.device_bytes(DType::F32);
    println!("stored {stored} bytes, bound {bound}");
    assert!(stored > 0 && stored <= bound, "{stored} > {bound}");
}
