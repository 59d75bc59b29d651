//! SwiGLU: `silu(gate) ⊙ up`, from two projections or two column ranges of one, into a new
//! tensor or into a view of an existing one.

use candle_core::{CpuStorage, CustomOp2, D, InplaceOp3, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

/// gate and up (.., width), each with unit last stride and evenly spaced rows (contiguous
/// tensors, or column ranges of one fused projection) → (.., width); silu is rounded to the
/// dtype before the product. As a [`CustomOp2`] it returns a new contiguous tensor; as an
/// [`InplaceOp3`] it writes into its destination, a view laid out like the inputs (e.g. the
/// last columns of a wider buffer).
#[derive(Debug, Clone, Copy)]
pub struct SwiGlu;

/// [`SwiGlu`] on CUDA bf16 tensors, [`reference::swiglu`] otherwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::fused(gate) && kernel_layout(gate) && kernel_layout(up) {
        gate.apply_op2_no_bwd(up, &SwiGlu)
    } else {
        reference::swiglu(gate, up)
    }
}

/// Whether the kernel's bf16x2 accesses can read or write `t` in place: evenly spaced rows,
/// even width, even row stride and offset.
pub(crate) fn kernel_layout(t: &Tensor) -> bool {
    t.dims().len() >= 2
        && t.dim(D::Minus1).is_ok_and(|w| w.is_multiple_of(2))
        && row_stride(t.layout()).is_some_and(|s| s.is_multiple_of(2))
        && t.layout().start_offset().is_multiple_of(2)
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

/// (rows, width, row strides of each layout), after checking that they have one shape and
/// evenly spaced rows.
fn dims(layouts: &[&Layout]) -> Result<(usize, usize, Vec<usize>)> {
    let shape = layouts[0].shape();
    let mut strides = Vec::with_capacity(layouts.len());
    for l in layouts {
        match row_stride(l) {
            Some(s) if l.shape() == shape => strides.push(s),
            _ => bail!(
                "swiglu: {:?} (strides {:?}) is not evenly spaced rows shaped like {shape:?}, or they do not match",
                l.shape(),
                l.stride()
            ),
        }
    }
    let width = shape.dims()[shape.rank() - 1];
    Ok((shape.elem_count() / width.max(1), width, strides))
}

/// The plain-Rust forward: silu rounded to the dtype, times up.
fn cpu_values(gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<Vec<f32>> {
    let round = cpu::rounder(cpu::dtype(gs));
    let (gate, up) = (cpu::read(gs, gl)?, cpu::read(us, ul)?);
    Ok(gate
        .iter()
        .zip(&up)
        .map(|(g, u)| round(g / (1.0 + (-g).exp())) * u)
        .collect())
}

/// Launches the kernel for gate and up into `out` (offset by its layout's start).
#[cfg(feature = "cuda")]
fn launch(
    dev: &candle_core::CudaDevice,
    (gs, gl): (&candle_core::CudaStorage, &Layout),
    (us, ul): (&candle_core::CudaStorage, &Layout),
    out: &mut candle_core::cuda::cudarc::driver::CudaViewMut<'_, half::bf16>,
    out_l: &Layout,
) -> Result<()> {
    use candle_core::cuda::WrapErr;
    use candle_core::cuda::cudarc::driver::PushKernelArg;
    use half::bf16;

    use crate::cuda::{ELEMENTWISE, block_per_row, view};

    let (rows, width, strides) = dims(&[gl, ul, out_l])?;
    let func = dev.get_or_load_custom_func("swiglu_bf16", ELEMENTWISE.name, ELEMENTWISE.ptx)?;
    let (gate, up) = (view::<bf16>(gs, gl)?, view::<bf16>(us, ul)?);
    let width_arg = width as i32;
    let [gate_stride, up_stride, out_stride] =
        [strides[0], strides[1], strides[2]].map(|s| s as i64);
    let mut builder = func.builder();
    builder.arg(&gate).arg(&up).arg(out);
    builder.arg(&width_arg);
    builder.arg(&gate_stride).arg(&up_stride).arg(&out_stride);
    unsafe { builder.launch(block_per_row(rows, width)) }.w()?;
    Ok(())
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
        dims(&[gl, ul])?;
        let out = cpu_values(gs, gl, us, ul)?;
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

        let n = gl.shape().elem_count();
        let dev = gs.device().clone();
        let mut out = unsafe { dev.alloc::<half::bf16>(n)? };
        let out_l = Layout::contiguous(gl.shape());
        launch(&dev, (gs, gl), (us, ul), &mut out.slice_mut(..), &out_l)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            gl.shape().clone(),
        ))
    }
}

impl InplaceOp3 for SwiGlu {
    fn name(&self) -> &'static str {
        "klein-swiglu-into"
    }

    fn cpu_fwd(
        &self,
        ds: &mut CpuStorage,
        dl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<()> {
        dims(&[gl, ul, dl])?;
        let values = cpu_values(gs, gl, us, ul)?;
        cpu::write_into(ds, dl, &values)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ds: &mut candle_core::CudaStorage,
        dl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;

        let dev = gs.device().clone();
        let dst = ds.as_cuda_slice_mut::<half::bf16>()?;
        launch(
            &dev,
            (gs, gl),
            (us, ul),
            &mut dst.slice_mut(dl.start_offset()..),
            dl,
        )
    }
}
