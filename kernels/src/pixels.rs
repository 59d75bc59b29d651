//! Decoder output to 8-bit RGB, as diffusers' `VaeImageProcessor.postprocess` computes it:
//! `clamp(x / 2 + 0.5, 0, 1)` in the decoder's dtype, then `round(255 · y)` in f32 with ties to
//! even (numpy), stored channel-last. On the GPU this is one pass that hands the host u8, a
//! quarter of the f32 bytes, with no per-element work left for the CPU.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};

/// x (B, 3, H, W) f32 or bf16, contiguous → (B, H, W, 3) u8.
#[derive(Debug, Clone, Copy)]
pub struct RgbU8;

/// [`RgbU8`] of the decoder output `x` (made contiguous first).
pub fn rgb_u8(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&RgbU8)
}

/// One value: the unit-range value in the dtype's precision, scaled in f32, rounded to even.
fn quantize(unit: f32) -> u8 {
    (unit.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
}

fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let (b, c, h, w) = l.shape().dims4()?;
    if c != 3 || !l.is_contiguous() {
        bail!(
            "rgb_u8: {:?} is not a contiguous (B, 3, H, W) image",
            l.shape()
        );
    }
    Ok((b, h, w))
}

impl CustomOp1 for RgbU8 {
    fn name(&self) -> &'static str {
        "klein-rgb-u8"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w) = dims(l)?;
        let plane = h * w;
        let round = crate::cpu::rounder(crate::cpu::dtype(s));
        let unit: Vec<f32> = crate::cpu::read(s, l)?
            .into_iter()
            .map(|x| round(x * 0.5 + 0.5))
            .collect();
        let mut out = Vec::with_capacity(unit.len());
        for image in unit.chunks_exact(3 * plane) {
            for p in 0..plane {
                out.extend((0..3).map(|c| quantize(image[c * plane + p])));
            }
        }
        Ok((CpuStorage::U8(out), Shape::from((b, h, w, 3))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::{DType, backend::BackendStorage};
        use half::bf16;

        let (b, h, w) = dims(l)?;
        let dev = s.device().clone();
        let mut out = unsafe { dev.alloc::<u8>(3 * b * h * w)? };
        match s.dtype() {
            DType::F32 => launch::<f32>(&dev, "rgb_u8_f32", s, l, &mut out)?,
            DType::BF16 => launch::<bf16>(&dev, "rgb_u8_bf16", s, l, &mut out)?,
            other => bail!("rgb_u8: unsupported dtype {other:?}"),
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, h, w, 3)),
        ))
    }
}

/// One thread per pixel of every image.
#[cfg(feature = "cuda")]
fn launch<T>(
    dev: &candle_core::CudaDevice,
    name: &str,
    s: &candle_core::CudaStorage,
    l: &Layout,
    out: &mut candle_core::cuda::cudarc::driver::CudaSlice<u8>,
) -> Result<()>
where
    T: candle_core::cuda::CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr,
{
    use candle_core::cuda::WrapErr;
    use candle_core::cuda::cudarc::driver::PushKernelArg;

    use crate::cuda::{ELEMENTWISE, grid_stride, view};

    let (b, h, w) = dims(l)?;
    let func = dev.get_or_load_custom_func(name, ELEMENTWISE.name, ELEMENTWISE.ptx)?;
    let x = view::<T>(s, l)?;
    let (plane, pixels) = ((h * w) as i64, (b * h * w) as i64);
    let mut builder = func.builder();
    builder.arg(&x).arg(out).arg(&plane).arg(&pixels);
    unsafe { builder.launch(grid_stride(b * h * w)) }.w()?;
    Ok(())
}
