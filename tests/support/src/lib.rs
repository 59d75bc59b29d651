//! Test support for the committed reference fixtures under `tests/fixtures/`.
//!
//! The fixtures are tiny random-weight FLUX.2 klein pipelines in the diffusers folder layout
//! and golden tensors written by `tools/reference/` with diffusers 0.42.1 (see
//! `tests/fixtures/README.md`). This crate only reads them; it never needs Python.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/`, or `$KLEIN_FIXTURES_DIR` when set (test binaries built here and run on
/// another machine, e.g. the GPU machine, find the fixtures there).
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("KLEIN_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures"))
}

/// The device parity tests run on: `$KLEIN_TEST_DEVICE` (`cpu`, `cuda` or `cuda:N`; default
/// `cpu`). CUDA needs this crate's `cuda` feature (the GPU builds enable it).
pub fn test_device() -> Device {
    let name = test_device_name();
    match name.strip_prefix("cuda") {
        None => Device::Cpu,
        Some(n) => {
            let ordinal = n.trim_start_matches(':').parse().unwrap_or(0);
            Device::new_cuda(ordinal).unwrap_or_else(|e| panic!("KLEIN_TEST_DEVICE={name}: {e}"))
        }
    }
}

/// `$KLEIN_TEST_DEVICE` as written (default `cpu`), for service configs.
pub fn test_device_name() -> String {
    std::env::var("KLEIN_TEST_DEVICE").unwrap_or_else(|_| "cpu".to_owned())
}

/// A tiny pipeline folder, e.g. `tiny-klein-4b` (distilled) or `tiny-klein-base-4b`.
pub fn pipeline_dir(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// `tests/fixtures/goldens/`.
pub fn goldens_dir() -> PathBuf {
    fixtures_dir().join("goldens")
}

/// The goldens' `manifest.json`.
pub fn manifest() -> serde_json::Value {
    let path = goldens_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every tensor of a golden file (`goldens/<name>`, with or without `.safetensors`), on the CPU.
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    let file = if name.ends_with(".safetensors") {
        name.to_owned()
    } else {
        format!("{name}.safetensors")
    };
    let path = goldens_dir().join(file);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One tensor of a golden map, with a clear panic when it is missing.
pub fn take<'a>(golden: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    golden.get(key).unwrap_or_else(|| {
        let mut keys: Vec<_> = golden.keys().collect();
        keys.sort();
        panic!("golden key {key:?} missing; have {keys:?}")
    })
}

fn as_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor converts to f64")
}

/// Relative L2 error `|a - b| / |b|` (b is the reference), computed in f64.
pub fn rel_l2(actual: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(actual.dims(), reference.dims(), "shape mismatch");
    let a = as_f64(actual);
    let b = as_f64(reference);
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Largest absolute elementwise difference, computed in f64.
pub fn max_abs_diff(actual: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(actual.dims(), reference.dims(), "shape mismatch");
    as_f64(actual)
        .iter()
        .zip(as_f64(reference))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
