//! Float8 (e4m3) weights with a per-tensor scale, as BFL's and ComfyUI's fp8 checkpoints store
//! them, to a dense dtype: each weight's exact f32 value times the scale in f32, rounded once to
//! the dtype — what `w.to_dtype(F32)`, a multiply by the scale and a cast compute, bit for bit.
//! One pass on CUDA (`scale_fp8_e4m3_*` in dequantize.cu); on the CPU a lookup in the 256
//! results, across threads.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use float8::F8E4M3;
use half::{bf16, f16};
use rayon::prelude::*;

/// `w` (float8 e4m3) times `scale`, in `dtype` (F32, BF16 or F16), on `w`'s device.
pub fn scale_fp8(w: &Tensor, scale: f32, dtype: DType) -> Result<Tensor> {
    if w.dtype() != DType::F8E4M3 {
        bail!("scale_fp8: {:?} weights, expected F8E4M3", w.dtype())
    }
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        bail!("scale_fp8: to {dtype:?}, expected F32, BF16 or F16")
    }
    w.contiguous()?.apply_op1_no_bwd(&ScaleFp8 { scale, dtype })
}

#[derive(Debug, Clone, Copy)]
struct ScaleFp8 {
    scale: f32,
    dtype: DType,
}

/// Each byte's weight times `scale` in f32, then `f` of it: a weight's result depends on its
/// byte alone, so a tensor is a lookup in these 256.
fn table<T>(scale: f32, f: impl Fn(f32) -> T) -> [T; 256] {
    std::array::from_fn(|b| f(F8E4M3::from_bits(b as u8).to_f32() * scale))
}

/// Every weight of `w` looked up in `table`, across threads.
fn map<T: Copy + Send + Sync>(w: &[F8E4M3], table: &[T; 256]) -> Vec<T> {
    w.par_iter().map(|x| table[x.to_bits() as usize]).collect()
}

impl CustomOp1 for ScaleFp8 {
    fn name(&self) -> &'static str {
        "klein-scale-fp8"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F8E4M3(w) = s else {
            bail!("scale_fp8: the weights are not F8E4M3")
        };
        let start = l.start_offset();
        let w = &w[start..start + l.shape().elem_count()];
        let scale = self.scale;
        let out = match self.dtype {
            DType::F32 => CpuStorage::F32(map(w, &table(scale, |x| x))),
            DType::BF16 => CpuStorage::BF16(map(w, &table(scale, bf16::from_f32))),
            DType::F16 => CpuStorage::F16(map(w, &table(scale, f16::from_f32))),
            other => bail!("scale_fp8: to {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;

        let dev = s.device().clone();
        let n = l.shape().elem_count();
        let out = match self.dtype {
            DType::F32 => launch::<f32>(&dev, "scale_fp8_e4m3_f32", s, l, self.scale, n)?,
            DType::BF16 => launch::<bf16>(&dev, "scale_fp8_e4m3_bf16", s, l, self.scale, n)?,
            DType::F16 => launch::<f16>(&dev, "scale_fp8_e4m3_f16", s, l, self.scale, n)?,
            other => bail!("scale_fp8: to {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// One thread per weight, grid-stride.
#[cfg(feature = "cuda")]
fn launch<T>(
    dev: &candle_core::CudaDevice,
    name: &str,
    s: &candle_core::CudaStorage,
    l: &Layout,
    scale: f32,
    n: usize,
) -> Result<candle_core::CudaStorage>
where
    T: candle_core::cuda::CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr,
{
    use candle_core::cuda::WrapErr;
    use candle_core::cuda::cudarc::driver::PushKernelArg;

    use crate::cuda::{DEQUANTIZE, grid_stride, view};

    let func = dev.get_or_load_custom_func(name, DEQUANTIZE.name, DEQUANTIZE.ptx)?;
    let w = view::<F8E4M3>(s, l)?;
    let mut out = unsafe { dev.alloc::<T>(n)? };
    let count = n as i64;
    let mut builder = func.builder();
    builder.arg(&w).arg(&scale).arg(&mut out).arg(&count);
    unsafe { builder.launch(grid_stride(n)) }.w()?;
    Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
