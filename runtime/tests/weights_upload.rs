//! The weights' loaders on the test device (`KLEIN_TEST_DEVICE`, default cpu): a mapped
//! safetensors file ([`klein_runtime::weights::mmap_var_builder`]) and a host copy
//! ([`klein_runtime::models::HostWeights`]) yield every tensor with the values candle's own
//! loader gives, in the stored dtype and converted, whatever its size against the upload's
//! pieces (1 MiB) and page-locked buffers (two of 16 MiB, so a 40 MB tensor reuses both).

use std::{collections::HashMap, path::PathBuf, str::FromStr};

use candle_core::{DType, Device, Result, Tensor};
use klein_runtime::{device::DeviceSpec, models::HostWeights, weights::mmap_var_builder};

fn device() -> Device {
    let name = std::env::var("KLEIN_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    DeviceSpec::from_str(&name).unwrap().open().unwrap()
}

/// A file of tensors of every kind the loaders meet: large and small, several dtypes, a float8
/// weight with its one-element scale (BFL's fp8 files), and an odd-sized one whose data starts
/// at an offset no element size divides.
fn write_file(dir: &std::path::Path) -> Result<PathBuf> {
    let cpu = Device::Cpu;
    let normal = |n: usize| Tensor::randn(0f32, 1.0, n, &cpu);
    let tensors: HashMap<String, Tensor> = [
        ("odd", Tensor::new(&[7u8, 1, 2], &cpu)?),
        ("big", normal(10_000_000)?.reshape((2500, 4000))?),
        (
            "w",
            normal(3000 * 700)?
                .reshape((3000, 700))?
                .to_dtype(DType::BF16)?,
        ),
        ("h", normal(4099)?.to_dtype(DType::F16)?),
        ("ids", Tensor::arange(-5i64, 300, &cpu)?),
        ("q", Tensor::arange(0u32, 77, &cpu)?),
        (
            "fp8",
            normal(64 * 48)?
                .reshape((64, 48))?
                .to_dtype(DType::F8E4M3)?,
        ),
        ("scale", Tensor::new(&[0.125f32], &cpu)?),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let path = dir.join("weights.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    Ok(path)
}

/// Every value of `t`, compared on the host (candle's CUDA backend converts no float8).
fn values(t: &Tensor) -> Vec<f64> {
    let t = t.to_device(&Device::Cpu).unwrap();
    let t = match t.dtype() {
        DType::F8E4M3 => t.to_dtype(DType::F32).unwrap(),
        _ => t,
    };
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// The conversions the models' loaders ask for (candle's CUDA backend has no kernel for some
/// other pairs, integers to bf16 among them).
fn converted(stored: DType, dtype: DType) -> bool {
    stored != dtype
        && matches!(
            (stored, dtype),
            (DType::BF16 | DType::F16 | DType::F32, DType::F32)
                | (DType::BF16 | DType::F32, DType::BF16)
        )
}

/// How many values of `a` differ from `b`'s, and the first such position.
fn differing(a: &Tensor, b: &Tensor) -> (usize, Option<usize>) {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len());
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    (diff.len(), diff.first().copied())
}

#[test]
fn loaders_give_candles_values() -> Result<()> {
    let dev = device();
    let dir = std::env::temp_dir().join(format!("klein-weights-upload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = write_file(&dir)?;
    let reference = candle_core::safetensors::load(&file, &dev)?;
    let host = HostWeights::read(std::slice::from_ref(&file), DType::BF16, |_| true)
        .map_err(candle_core::Error::wrap)?;
    for dtype in [DType::F32, DType::BF16] {
        let mapped = mmap_var_builder(std::slice::from_ref(&file), dtype, &dev)
            .map_err(candle_core::Error::wrap)?;
        let copied = host.var_builder(dtype, &dev);
        for (name, expected) in &reference {
            let stored = expected.dtype();
            let mut asked = vec![stored];
            if converted(stored, dtype) {
                asked.push(dtype);
            }
            for want in asked {
                let got = mapped.get_unchecked_dtype(name, want)?;
                assert_eq!(got.dtype(), want, "{name}");
                assert_eq!(got.shape(), expected.shape(), "{name}");
                assert!(got.device().same_device(&dev), "{name} on {dev:?}");
                let expected = expected.to_dtype(want)?;
                assert_eq!(differing(&got, &expected), (0, None), "{name} as {want:?}");
            }
            if stored == dtype || converted(stored, dtype) {
                let shaped = mapped.get(expected.shape(), name)?;
                assert_eq!(shaped.dtype(), dtype, "{name}: the builder's dtype");
                let expected = expected.to_dtype(dtype)?;
                assert_eq!(differing(&shaped, &expected), (0, None), "{name}");
            }
            // The host copy holds floats in bf16 (converted on the host) but float8 and
            // one-element tensors as stored.
            let kept = if stored.is_float() && stored != DType::F8E4M3 && expected.elem_count() > 1
            {
                expected.to_device(&Device::Cpu)?.to_dtype(DType::BF16)?
            } else {
                expected.clone()
            };
            let got = copied.get_unchecked_dtype(name, kept.dtype())?;
            assert!(got.device().same_device(&dev), "{name} from the host copy");
            assert_eq!(
                differing(&got, &kept),
                (0, None),
                "{name} from the host copy"
            );
        }
        assert!(
            mapped.get((3, 3), "odd").is_err(),
            "a shape the file does not hold"
        );
        assert!(mapped.get_unchecked_dtype("absent", dtype).is_err());
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
