//! Load-time quantization straight from a checkpoint's mapped bytes. A weight read through a
//! `VarBuilder` onto the host to be quantized lands in a fresh host tensor (18 GB of newly
//! faulted memory for klein-9B) before its parts go up. [`quantize_mapped`] sends the file's
//! own bytes through the upload's page-locked buffers into the quantizer's one device buffer:
//! one host pass, and the device memory of the host path (klein-9B's first image 2.3 s after
//! the start instead of 7.4-8.0 on an H200; docs/performance.md, thirty-seventh session).

use std::{cell::RefCell, sync::Arc};

use candle_core::{
    DType, Device, Result,
    quantized::{GgmlDType, QTensor},
};

/// A checkpoint's tensors as stored, by name (memory-mapped safetensors files).
pub trait MappedTensors: Send + Sync {
    /// Tensor `name`'s dtype, shape and little-endian row-major bytes; `None` where there is no
    /// such tensor or its dtype is not one of candle's.
    fn tensor(&self, name: &str) -> Option<(DType, Vec<usize>, &[u8])>;
}

thread_local! {
    /// The innermost [`with_mapped`] scope's checkpoint.
    static MAPPED: RefCell<Option<Arc<dyn MappedTensors>>> = const { RefCell::new(None) };
}

/// Runs `f`, a model's construction, with `source` as the checkpoint its load-time quantizers
/// read from directly ([`quantize_mapped`]). `source` must hold what the model's builder reads,
/// under the same names.
pub fn with_mapped<T>(source: Arc<dyn MappedTensors>, f: impl FnOnce() -> T) -> T {
    let outer = MAPPED.replace(Some(source));
    let out = f();
    MAPPED.set(outer);
    out
}

/// The tensors `names`, each (rows, width), stacked along their rows and quantized to `format`
/// on `device` from the scope's checkpoint ([`with_mapped`]): the same blocks as quantizing
/// the stack read in `dtype` ([`super::quantize_rows`]; ggml blocks never cross a row).
/// `None`, for the caller to read them through its builder: outside such a scope, off a CUDA
/// device, for a format the device does not quantize, or where a tensor is missing, is not
/// (rows, width) or is not stored in `dtype` (converted values would give other blocks).
pub fn quantize_mapped(
    names: &[String],
    dtype: DType,
    (rows, width): (usize, usize),
    format: GgmlDType,
    device: &Device,
) -> Result<Option<QTensor>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device
        && matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
        && let Some(stem) = super::device::kernel(format)
        && let Some(source) = MAPPED.with_borrow(Clone::clone)
    {
        let mut parts = Vec::with_capacity(names.len());
        for name in names {
            match source.tensor(name) {
                Some((d, shape, bytes)) if d == dtype && shape == [rows, width] => {
                    parts.push(bytes)
                }
                _ => return Ok(None),
            }
        }
        let q = super::device::quantize_bytes(&parts, dtype, (rows, width), format, stem, dev)?;
        return Ok(Some(q));
    }
    let _ = (names, dtype, rows, width, format, device, &MAPPED);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One;

    impl MappedTensors for One {
        fn tensor(&self, name: &str) -> Option<(DType, Vec<usize>, &[u8])> {
            (name == "w.weight").then_some((DType::BF16, vec![1, 32], &[0u8; 64][..]))
        }
    }

    #[test]
    fn scopes_nest_and_the_host_reads_through_its_builder() -> Result<()> {
        let names = ["w.weight".to_string()];
        let q4_0 = GgmlDType::Q4_0;
        let outer = with_mapped(Arc::new(One), || {
            let inner = with_mapped(Arc::new(One), || MAPPED.with_borrow(Option::is_some));
            (inner, MAPPED.with_borrow(Option::is_some))
        });
        assert_eq!(outer, (true, true));
        assert!(
            MAPPED.with_borrow(Option::is_none),
            "the scope is gone after it"
        );
        let on_cpu = with_mapped(Arc::new(One), || {
            quantize_mapped(&names, DType::BF16, (1, 32), q4_0, &Device::Cpu)
        })?;
        assert!(
            on_cpu.is_none(),
            "the host quantizer reads through the builder"
        );
        Ok(())
    }
}
