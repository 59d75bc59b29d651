//! A band of rows of an NCHW tensor with zero padding around it, in one pass: the input of one
//! band of a convolution (the VAE runs its large convolutions in bands of output rows).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

/// Rows `[row0, row0 + rows)` of x (B, C, H, W) with `top` / `bottom` zero rows and `left` /
/// `right` zero columns → (B, C, top + rows + bottom, left + W + right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PadRows {
    pub row0: usize,
    pub rows: usize,
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

/// [`PadRows`] on a CUDA f32 / bf16 tensor, [`reference::pad_rows`] otherwise.
pub fn pad_rows(x: &Tensor, pad: PadRows) -> Result<Tensor> {
    let kernel = cfg!(feature = "cuda")
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16);
    if kernel {
        x.contiguous()?.apply_op1_no_bwd(&pad)
    } else {
        reference::pad_rows(x, pad)
    }
}

impl PadRows {
    /// (planes B·C, H, W) and the output shape, after checking the layout.
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        if !l.is_contiguous() || self.row0 + self.rows > h {
            bail!(
                "pad_rows: rows {}..{} of {:?}",
                self.row0,
                self.row0 + self.rows,
                l.shape()
            );
        }
        let out = (
            b,
            c,
            self.top + self.rows + self.bottom,
            self.left + w + self.right,
        );
        Ok((b * c, h, w, Shape::from(out)))
    }
}

impl CustomOp1 for PadRows {
    fn name(&self) -> &'static str {
        "klein-pad-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h, w, shape) = self.dims(l)?;
        let x = cpu::read(s, l)?;
        let ow = self.left + w + self.right;
        let mut out = vec![0f32; shape.elem_count()];
        for (p, plane) in out.chunks_exact_mut(shape.dims()[2] * ow).enumerate() {
            for r in 0..self.rows {
                let src = (p * h + self.row0 + r) * w;
                let dst = (self.top + r) * ow + self.left;
                plane[dst..dst + w].copy_from_slice(&x[src..src + w]);
            }
        }
        Ok((cpu::write(out, cpu::dtype(s))?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::WrapErr;
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use half::bf16;

        use crate::cuda::{ELEMENTWISE, grid_stride, view};

        let (planes, h, w, shape) = self.dims(l)?;
        let dev = s.device().clone();
        let total = shape.elem_count();
        let int = |v: usize| v as i32;
        let args = [
            int(h),
            int(w),
            int(self.row0),
            int(self.rows),
            int(self.top),
            int(self.bottom),
            int(self.left),
            int(self.right),
        ];
        let planes = planes as i64;
        macro_rules! launch {
            ($t:ty, $name:literal) => {{
                let x = view::<$t>(s, l)?;
                let mut out = unsafe { dev.alloc::<$t>(total)? };
                let f = dev.get_or_load_custom_func($name, ELEMENTWISE.name, ELEMENTWISE.ptx)?;
                let mut b = f.builder();
                b.arg(&x).arg(&mut out).arg(&planes);
                for a in &args {
                    b.arg(a);
                }
                unsafe { b.launch(grid_stride(total)) }.w()?;
                candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::F32 => launch!(f32, "pad_rows_f32"),
            DType::BF16 => launch!(bf16, "pad_rows_bf16"),
            other => bail!("pad_rows: no kernel for {other:?}"),
        };
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn the_op_equals_the_composition() {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 7, 5), &Device::Cpu).unwrap();
        for pad in [
            PadRows {
                row0: 0,
                rows: 3,
                top: 1,
                bottom: 0,
                left: 1,
                right: 1,
            },
            PadRows {
                row0: 2,
                rows: 5,
                top: 0,
                bottom: 2,
                left: 0,
                right: 1,
            },
            PadRows {
                row0: 1,
                rows: 4,
                top: 0,
                bottom: 0,
                left: 0,
                right: 0,
            },
        ] {
            let got = x.apply_op1_no_bwd(&pad).unwrap();
            let want = reference::pad_rows(&x, pad).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{pad:?}");
        }
    }
}
