//! RMSNorm over the last axis with a weight, rounded like torch's on bf16 (Qwen3's
//! `input_layernorm` / `post_attention_layernorm`).

use candle_core::{CpuStorage, CustomOp2, D, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

/// x (.., dim) contiguous, weight (dim) → `weight ⊙ dtype(x · rsqrt(mean(x²) + eps))`: the
/// normalised value is rounded before the weight product, and the product rounded.
#[derive(Debug, Clone, Copy)]
pub struct RmsNorm {
    pub eps: f32,
}

/// [`RmsNorm`] on a CUDA bf16 tensor, [`reference::rms_norm`] otherwise.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused(x) && x.dim(D::Minus1)?.is_multiple_of(2) {
        x.contiguous()?
            .apply_op2_no_bwd(weight, &RmsNorm { eps: eps as f32 })
    } else {
        reference::rms_norm(x, weight, eps)
    }
}

/// (rows, dim), after checking the layouts.
fn dims(xl: &Layout, wl: &Layout) -> Result<(usize, usize)> {
    let dim = xl.dims().last().copied().unwrap_or(0);
    if !xl.is_contiguous() || !wl.is_contiguous() || wl.dims() != [dim] || dim == 0 {
        bail!(
            "rms_norm: x {:?} must be contiguous with a weight of its last dim, got {:?}",
            xl.shape(),
            wl.shape()
        );
    }
    Ok((xl.shape().elem_count() / dim, dim))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "klein-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, dim) = dims(xl, wl)?;
        let round = cpu::rounder(cpu::dtype(xs));
        let (x, w) = (cpu::read(xs, xl)?, cpu::read(ws, wl)?);
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(dim) {
            let rstd =
                1.0 / (row.iter().map(|v| v * v).sum::<f32>() / dim as f32 + self.eps).sqrt();
            out.extend(row.iter().zip(&w).map(|(v, w)| round(v * rstd) * w));
        }
        Ok((cpu::write(out, cpu::dtype(xs))?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::WrapErr;
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use half::bf16;

        use crate::cuda::{ELEMENTWISE, view, warp_per_item};

        let (rows, dim) = dims(xl, wl)?;
        let dev = xs.device().clone();
        let func =
            dev.get_or_load_custom_func("rms_norm_bf16", ELEMENTWISE.name, ELEMENTWISE.ptx)?;
        let out = unsafe { dev.alloc::<bf16>(rows * dim)? };
        let (x, w) = (view::<bf16>(xs, xl)?, view::<bf16>(ws, wl)?);
        let (rows_arg, dim_arg) = (rows as i32, dim as i32);
        let mut launch = func.builder();
        launch.arg(&x).arg(&w).arg(&out);
        launch.arg(&rows_arg).arg(&dim_arg).arg(&self.eps);
        unsafe { launch.launch(warp_per_item(rows)) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            xl.shape().clone(),
        ))
    }
}
