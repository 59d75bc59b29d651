//! Every committed fixture opens and holds what the manifest says: the tiny pipelines in the
//! diffusers layout (sharded text encoder included) and every golden tensor with its listed
//! shape and dtype.

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use klein_runtime::weights;
use klein_test_support::{fixtures_dir, golden, goldens_dir, manifest, pipeline_dir};

const PIPELINES: &[&str] = &["tiny-klein-4b", "tiny-klein-base-4b", "tiny-klein-9b"];
const COMPONENTS: &[&str] = &["transformer", "text_encoder", "vae"];

fn dtype(name: &str) -> DType {
    match name {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "U8" => DType::U8,
        "I64" => DType::I64,
        "F64" => DType::F64,
        other => panic!("manifest names an unexpected dtype {other}"),
    }
}

#[test]
fn every_pipeline_component_loads_from_the_diffusers_layout() {
    for name in PIPELINES {
        let root = pipeline_dir(name);
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("model_index.json")).unwrap())
                .unwrap();
        assert_eq!(index["_class_name"], "Flux2KleinPipeline", "{name}");
        for component in COMPONENTS {
            let dir = weights::component_dir(&root, component).unwrap();
            assert_eq!(
                weights::component_dir(&dir, component).unwrap(),
                dir,
                "component folder accepted as is"
            );
            let files = weights::safetensors_files(&dir).unwrap();
            if *component == "text_encoder" {
                assert!(
                    files.len() > 1,
                    "{name}/text_encoder must be sharded, got {files:?}"
                );
            }
            let mut tensors = 0;
            for file in &files {
                let loaded = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
                assert!(
                    loaded.values().all(|t| t.elem_count() > 0),
                    "{}",
                    file.display()
                );
                tensors += loaded.len();
            }
            assert!(tensors > 10, "{name}/{component}: only {tensors} tensors");
            let vb = weights::mmap_var_builder(&files, DType::F32, &Device::Cpu).unwrap();
            let probe = match *component {
                "transformer" => "x_embedder.weight",
                "text_encoder" => "model.embed_tokens.weight",
                _ => "bn.running_mean",
            };
            assert!(
                vb.contains_tensor(probe),
                "{name}/{component} lacks {probe}"
            );
        }
        assert!(root.join("tokenizer/tokenizer.json").is_file(), "{name}");
        assert!(
            root.join("scheduler/scheduler_config.json").is_file(),
            "{name}"
        );
    }
}

#[test]
fn every_golden_tensor_matches_the_manifest() {
    let m = manifest();
    let cases = m["cases"].as_object().expect("cases");
    assert!(
        cases.len() >= 10,
        "expected every case, got {:?}",
        cases.keys()
    );
    let mut seen_files = 0;
    for (case, spec) in cases {
        let file = spec["file"].as_str().expect("file");
        let tensors = golden(file.trim_start_matches("goldens/"));
        seen_files += 1;
        let listed = spec["tensors"].as_object().expect("tensors");
        assert_eq!(
            listed.len(),
            tensors.len(),
            "{case}: manifest and file disagree on the key count"
        );
        for (key, desc) in listed {
            let t = tensors
                .get(key)
                .unwrap_or_else(|| panic!("{case}: {key} missing from {file}"));
            let shape: Vec<usize> = desc["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(t.dims(), shape.as_slice(), "{case}.{key}");
            assert_eq!(
                t.dtype(),
                dtype(desc["dtype"].as_str().unwrap()),
                "{case}.{key}"
            );
        }
        if let Some(spread) = spec.get("spread").and_then(|s| s.as_object()) {
            for (out, s) in spread {
                let rel = s["rel_l2"].as_f64().unwrap();
                assert!(
                    rel > 0.0 && rel < 0.05,
                    "{case}.{out}: implausible bf16 spread {rel}"
                );
                for k in ["f32_key", "bf16_key"] {
                    let key = s[k].as_str().unwrap();
                    assert!(tensors.contains_key(key), "{case}.{out}: {k} {key} missing");
                }
            }
        }
    }
    let on_disk = std::fs::read_dir(goldens_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "safetensors")
        })
        .count();
    assert_eq!(
        seen_files, on_disk,
        "every golden file is described by the manifest"
    );
}

#[test]
fn fixtures_stay_small() {
    let mut sizes = BTreeMap::new();
    let mut total = 0u64;
    let mut stack = vec![fixtures_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let len = path.metadata().unwrap().len();
                total += len;
                sizes.insert(path, len);
            }
        }
    }
    assert!(
        total < 32 << 20,
        "fixtures are {total} bytes (limit 32 MiB): {sizes:#?}"
    );
}
