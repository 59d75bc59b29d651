//! Loading every accepted layout: a pipeline root, its `vae/` folder, a single diffusers-named
//! file, and BFL's `ae.safetensors` layout (written here from the fixture by reversing the
//! key mapping: reversed decoder up blocks, `nin_shortcut`, 1x1-conv attention weights).

use std::{collections::HashMap, path::PathBuf};

use candle_core::{DType, Device, Tensor};
use klein_test_support::{golden, pipeline_dir, take, test_device};
use vae_svc::{
    loader::{self, Loaded, ModelSource, WeightsFormat},
    model::{Chunking, bfl::bfl_name},
};

fn load(path: PathBuf, config: Option<PathBuf>) -> Result<Loaded, vae_svc::VaeError> {
    let source = ModelSource {
        path,
        single_file_config: config,
        chunking: Chunking::default(),
    };
    loader::load(&source, DType::F32, &test_device())
}

fn vae_dir() -> PathBuf {
    pipeline_dir("tiny-klein-4b").join("vae")
}

fn fixture_file() -> PathBuf {
    vae_dir().join("diffusion_pytorch_model.safetensors")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vae-svc-loading-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Decoded pixels of the golden latents, and the packed encoding of the golden image.
fn outputs(loaded: &Loaded) -> (Tensor, Tensor) {
    let g = golden("vae");
    let dev = test_device();
    let tokens = take(&g, "decode_input_packed").to_device(&dev).unwrap();
    let z = loaded.model.unpack_latents(&tokens, (4, 6)).unwrap();
    let decoded = loaded.model.decode(&z).unwrap();
    let image = take(&g, "image").to_device(&dev).unwrap();
    let packed = loaded.model.encode_packed(&image).unwrap();
    (decoded, packed)
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() == 0.0
}

#[test]
fn pipeline_root_vae_folder_and_single_file_load_the_same_model() {
    let root = load(pipeline_dir("tiny-klein-4b"), None).unwrap();
    assert_eq!(root.format, WeightsFormat::Diffusers);
    assert_eq!(root.model_id, "tiny-klein-4b");
    assert_eq!(root.config.block_out_channels, [8, 16, 32, 32]);
    let folder = load(vae_dir(), None).unwrap();
    assert_eq!(folder.model_id, "tiny-klein-4b");
    let single = load(fixture_file(), Some(vae_dir().join("config.json"))).unwrap();
    assert_eq!(single.format, WeightsFormat::Diffusers);
    assert_eq!(single.model_id, "diffusion_pytorch_model");
    assert_eq!(root.weight_bytes, folder.weight_bytes);
    assert_eq!(root.weight_bytes, single.weight_bytes);
    let (d0, e0) = outputs(&root);
    let (d1, e1) = outputs(&single);
    assert!(same(&d0, &d1) && same(&e0, &e1));
}

#[test]
fn bfl_layout_loads_to_identical_outputs() {
    let tensors = candle_core::safetensors::load(fixture_file(), &Device::Cpu).unwrap();
    let mut bfl = HashMap::new();
    for (name, t) in tensors {
        let is_attention_weight =
            name.contains("mid_block.attentions.0.to_") && name.ends_with(".weight");
        let t = if is_attention_weight {
            t.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
        } else {
            t
        };
        bfl.insert(bfl_name(&name, 4), t);
    }
    assert!(bfl.contains_key("decoder.up.0.block.0.nin_shortcut.weight"));
    assert_eq!(bfl["encoder.mid.attn_1.q.weight"].rank(), 4);
    let path = scratch("ae.safetensors");
    candle_core::safetensors::save(&bfl, &path).unwrap();

    let loaded = load(path.clone(), Some(vae_dir().join("config.json"))).unwrap();
    assert_eq!(loaded.format, WeightsFormat::Bfl);
    assert_eq!(loaded.model_id, "ae");
    let reference = load(pipeline_dir("tiny-klein-4b"), None).unwrap();
    assert_eq!(loaded.weight_bytes, reference.weight_bytes);
    let (d0, e0) = outputs(&reference);
    let (d1, e1) = outputs(&loaded);
    assert!(same(&d0, &d1), "decode differs");
    assert!(same(&e0, &e1), "encode differs");

    // Without a config the class defaults (the released VAE) apply: shapes do not match.
    let err = load(path, None)
        .err()
        .expect("tiny weights under the real config");
    assert!(err.to_string().contains("shape"), "{err}");
}

#[test]
fn unknown_files_and_folders_are_refused_clearly() {
    let path = scratch("other.safetensors");
    let t = HashMap::from([(
        "w".to_owned(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&t, &path).unwrap();
    let err = load(path, None).err().unwrap().to_string();
    assert!(
        err.contains("neither a BFL ae.safetensors nor a diffusers VAE"),
        "{err}"
    );
    let err = load(pipeline_dir("no-such-pipeline"), None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no such directory"), "{err}");
}
