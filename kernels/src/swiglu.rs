//! SwiGLU: `silu(gate) ⊙ up`, from two projections or two column ranges of one.

use candle_core::{CpuStorage, CustomOp2, D, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

/// gate and up (.., width), each with unit last stride and evenly spaced rows (contiguous
/// tensors, or column ranges of one fused projection) → (.., width) contiguous; silu is
/// rounded to the dtype before the product.
#[derive(Debug, Clone, Copy)]
pub struct SwiGlu;

/// [`SwiGlu`] on CUDA bf16 tensors, [`reference::swiglu`] otherwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let even = |t: &Tensor| {
        t.dims().len() >= 2
            && t.dim(D::Minus1).is_ok_and(|w| w.is_multiple_of(2))
            && row_stride(t.layout()).is_some_and(|s| s.is_multiple_of(2))
            && t.layout().start_offset().is_multiple_of(2)
    };
    if crate::fused(gate) && even(gate) && even(up) {
        gate.apply_op2_no_bwd(up, &SwiGlu)
    } else {
        reference::swiglu(gate, up)
    }
}

/// Distance between rows of a (.., width) layout with unit last stride, if its rows are evenly
/// spaced.
fn row_stride(l: &Layout) -> Option<usize> {
    let (dims, stride) = (l.dims(), l.stride());
    let n = dims.len();
    if n < 2 || stride[n - 1] != 1 {
        return None;
    }
    let evenly = (0..n - 2).all(|i| dims[i] == 1 || stride[i] == stride[i + 1] * dims[i + 1]);
    evenly.then_some(stride[n - 2])
}

impl SwiGlu {
    /// (rows, width, gate row stride, up row stride), after checking the layouts.
    fn dims(gate: &Layout, up: &Layout) -> Result<(usize, usize, usize, usize)> {
        let strides = (row_stride(gate), row_stride(up));
        let (Some(gs), Some(us)) = strides else {
            bail!(
                "swiglu: gate {:?} (strides {:?}) or up {:?} (strides {:?}) is not evenly spaced rows",
                gate.shape(),
                gate.stride(),
                up.shape(),
                up.stride()
            );
        };
        if gate.shape() != up.shape() {
            bail!(
                "swiglu: gate {:?} and up {:?} do not match",
                gate.shape(),
                up.shape()
            );
        }
        let width = gate.dims()[gate.dims().len() - 1];
        Ok((gate.shape().elem_count() / width.max(1), width, gs, us))
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "klein-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::dims(gl, ul)?;
        let round = cpu::rounder(cpu::dtype(gs));
        let (gate, up) = (cpu::read(gs, gl)?, cpu::read(us, ul)?);
        let out = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| round(g / (1.0 + (-g).exp())) * u)
            .collect();
        Ok((cpu::write(out, cpu::dtype(gs))?, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::WrapErr;
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use half::bf16;

        use crate::cuda::{ELEMENTWISE, grid_stride, view};

        let (rows, width, gate_stride, up_stride) = Self::dims(gl, ul)?;
        let dev = gs.device().clone();
        let func = dev.get_or_load_custom_func("swiglu_bf16", ELEMENTWISE.name, ELEMENTWISE.ptx)?;
        let out = unsafe { dev.alloc::<bf16>(rows * width)? };
        let (gate, up) = (view::<bf16>(gs, gl)?, view::<bf16>(us, ul)?);
        let (rows_arg, width_arg) = (rows as i32, width as i32);
        let (gate_stride, up_stride) = (gate_stride as i64, up_stride as i64);
        let mut launch = func.builder();
        launch.arg(&gate).arg(&up).arg(&out);
        launch
            .arg(&rows_arg)
            .arg(&width_arg)
            .arg(&gate_stride)
            .arg(&up_stride);
        unsafe { launch.launch(grid_stride(rows * width / 2)) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            gl.shape().clone(),
        ))
    }
}
