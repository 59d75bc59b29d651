//! `x + gate ⊙ y`: the gated residual after every FLUX.2 attention and MLP.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, modulate::row_dims, reference};

/// x and y (B, S, D) contiguous, gate (B, 1, D) with unit last stride → (B, S, D); the product
/// is rounded to the dtype before the sum, as in the composition.
#[derive(Debug, Clone, Copy)]
pub struct GateResidual;

/// [`GateResidual`] on CUDA bf16 tensors, [`reference::gate_residual`] otherwise.
pub fn gate_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if crate::fused(x) && x.dim(2)?.is_multiple_of(2) {
        let (x, y) = (batches_contiguous(x)?, y.contiguous()?);
        x.apply_op3_no_bwd(&y, gate, &GateResidual)
    } else {
        reference::gate_residual(x, y, gate)
    }
}

/// `x` contiguous. Rows of a batch (`x.narrow(1, ..)` with B > 1: each batch item contiguous,
/// the items apart) are copied item by item with candle's 2-D copy: its strided copy would
/// upload x's dims and strides from the host first, which a CUDA graph refuses.
fn batches_contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        return Ok(x.clone());
    }
    let items = (0..x.dim(0)?)
        .map(|b| x.narrow(0, b, 1))
        .collect::<Result<Vec<_>>>()?;
    if items.iter().all(Tensor::is_contiguous) {
        Tensor::cat(&items, 0)
    } else {
        x.contiguous()
    }
}

/// (B, S, D) after checking y and the gate against x.
pub(crate) fn dims(xl: &Layout, yl: &Layout, gl: &Layout) -> Result<(usize, usize, usize)> {
    if xl.shape() != yl.shape() || !yl.is_contiguous() {
        bail!(
            "gate_residual: y {:?} must be contiguous and shaped like x {:?}",
            yl.shape(),
            xl.shape()
        );
    }
    row_dims(xl, &[gl])
}

impl CustomOp3 for GateResidual {
    fn name(&self) -> &'static str {
        "klein-gate-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, s, d) = dims(xl, yl, gl)?;
        let round = cpu::rounder(cpu::dtype(xs));
        let (x, y, gate) = (cpu::read(xs, xl)?, cpu::read(ys, yl)?, cpu::read(gs, gl)?);
        let out = x
            .iter()
            .zip(&y)
            .enumerate()
            .map(|(i, (xv, yv))| xv + round(yv * gate[i / (s * d) * d + i % d]))
            .collect();
        Ok((cpu::write(out, cpu::dtype(xs))?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::WrapErr;
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use half::bf16;

        use crate::cuda::{ELEMENTWISE, block_per_row, view};

        let (b, s, d) = dims(xl, yl, gl)?;
        let dev = xs.device().clone();
        let func =
            dev.get_or_load_custom_func("gate_residual_bf16", ELEMENTWISE.name, ELEMENTWISE.ptx)?;
        let out = unsafe { dev.alloc::<bf16>(b * s * d)? };
        let (x, y, gate) = (
            view::<bf16>(xs, xl)?,
            view::<bf16>(ys, yl)?,
            view::<bf16>(gs, gl)?,
        );
        let (per_batch, dim) = (s as i32, d as i32);
        let gate_stride = gl.stride()[0] as i64;
        let mut launch = func.builder();
        launch.arg(&x).arg(&y).arg(&gate).arg(&out);
        launch.arg(&per_batch).arg(&dim).arg(&gate_stride);
        unsafe { launch.launch(block_per_row(b * s, d)) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            xl.shape().clone(),
        ))
    }
}
