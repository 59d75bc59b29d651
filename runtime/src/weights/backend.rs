//! [`VarBuilder`](candle_nn::VarBuilder) backends whose tensors reach their device through
//! [`klein_kernels::upload`]: every core copies a tensor's bytes, and a CUDA device takes them
//! in page-locked transfers while the next part is copied (candle's own backends copy on one
//! thread through the driver's pageable path).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Shape, Tensor, safetensors::MmapedSafetensors};
use candle_nn::{Init, var_builder::SimpleBackend};
use klein_kernels::{quant::MappedTensors, upload};

/// Mapped safetensors files.
pub struct Mapped(pub MmapedSafetensors);

/// Tensors in host memory.
pub struct Resident(pub HashMap<String, Tensor>);

/// The stored tensor `name` of `mapped` on `dev`, in its stored dtype (a dtype candle's
/// tensors lack, such as u16, as candle's loader converts it).
pub fn load(mapped: &MmapedSafetensors, name: &str, dev: &Device) -> Result<Tensor> {
    let view = mapped.get(name)?;
    match DType::try_from(view.dtype()) {
        Ok(dtype) => upload::tensor_from_bytes(view.data(), dtype, view.shape(), dev),
        Err(_) => mapped.load(name, dev),
    }
}

/// `t` if it has the shape the model asks for.
fn shaped(t: Tensor, expected: Shape, name: &str) -> Result<Tensor> {
    if t.shape() != &expected {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected,
            got: t.shape().clone(),
        }
        .bt());
    }
    Ok(t)
}

impl MappedTensors for Mapped {
    fn tensor(&self, name: &str) -> Option<(DType, Vec<usize>, &[u8])> {
        let view = self.0.get(name).ok()?;
        let dtype = DType::try_from(view.dtype()).ok()?;
        Some((dtype, view.shape().to_vec(), view.data()))
    }
}

impl SimpleBackend for Mapped {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        shaped(self.get_unchecked(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        load(&self.0, name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

impl SimpleBackend for Resident {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        shaped(self.get_unchecked(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.0.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_owned(),
            }
            .bt()
        })?;
        upload::to_device(t, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}
