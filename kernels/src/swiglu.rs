//! SwiGLU from one projection: `silu(u[.., gate..gate+F]) ⊙ u[.., up..up+F]`.

use candle_core::{CpuStorage, CustomOp1, D, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

/// src (B, S, C) contiguous → (B, S, width); silu is rounded to the dtype before the product.
#[derive(Debug, Clone, Copy)]
pub struct SwiGlu {
    /// First column of the gate half.
    pub gate: usize,
    /// First column of the up half.
    pub up: usize,
    pub width: usize,
}

/// [`SwiGlu`] on a CUDA bf16 tensor, [`reference::swiglu`] otherwise.
pub fn swiglu(src: &Tensor, gate: usize, up: usize, width: usize) -> Result<Tensor> {
    let even = [gate, up, width, src.dim(D::Minus1)?]
        .iter()
        .all(|n| n.is_multiple_of(2));
    if crate::fused(src) && even {
        src.contiguous()?
            .apply_op1_no_bwd(&SwiGlu { gate, up, width })
    } else {
        reference::swiglu(
            &src.narrow(D::Minus1, gate, width)?,
            &src.narrow(D::Minus1, up, width)?,
        )
    }
}

impl SwiGlu {
    /// (rows, C, output shape).
    fn dims(&self, l: &Layout) -> Result<(usize, usize, Shape)> {
        let (b, s, c) = l.shape().dims3()?;
        if !l.is_contiguous() || self.gate.max(self.up) + self.width > c {
            bail!("swiglu: {self:?} does not fit a contiguous {:?}", l.shape());
        }
        Ok((b * s, c, Shape::from((b, s, self.width))))
    }
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "klein-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c, shape) = self.dims(l)?;
        let round = cpu::rounder(cpu::dtype(s));
        let src = cpu::read(s, l)?;
        let mut out = Vec::with_capacity(shape.elem_count());
        for row in src.chunks_exact(c) {
            let gate = &row[self.gate..][..self.width];
            let up = &row[self.up..][..self.width];
            out.extend(
                gate.iter()
                    .zip(up)
                    .map(|(g, u)| round(g / (1.0 + (-g).exp())) * u),
            );
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

        let (rows, c, shape) = self.dims(l)?;
        let dev = s.device().clone();
        let func = dev.get_or_load_custom_func("swiglu_bf16", ELEMENTWISE.name, ELEMENTWISE.ptx)?;
        let out = unsafe { dev.alloc::<bf16>(shape.elem_count())? };
        let src = view::<bf16>(s, l)?;
        let (rows_arg, width, stride) = (rows as i32, self.width as i32, c as i64);
        let (gate, up) = (self.gate as i32, self.up as i32);
        let mut launch = func.builder();
        launch
            .arg(&src)
            .arg(&out)
            .arg(&rows_arg)
            .arg(&width)
            .arg(&stride);
        launch.arg(&gate).arg(&up);
        unsafe { launch.launch(grid_stride(rows * self.width / 2)) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}
