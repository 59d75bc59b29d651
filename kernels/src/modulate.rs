//! `(1 + scale) ⊙ LayerNorm(x) + shift`: the adaptive norm in front of every FLUX.2 attention
//! and MLP (LayerNorm without affine, eps from the config).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

/// x (B, S, D) contiguous, shift and scale (B, 1, D) with unit last stride → (B, S, D).
/// Rounds like the composition: norm, `1 + scale`, the product and the sum each to the dtype.
#[derive(Debug, Clone, Copy)]
pub struct LayerNormModulate {
    pub eps: f32,
}

/// [`LayerNormModulate`] on a CUDA bf16 tensor, [`reference::layer_norm_modulate`] otherwise.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused(x) && x.dim(2)?.is_multiple_of(2) {
        let op = LayerNormModulate { eps: eps as f32 };
        x.contiguous()?.apply_op3_no_bwd(shift, scale, &op)
    } else {
        reference::layer_norm_modulate(x, shift, scale, eps)
    }
}

/// (B, S, D) after checking x against the modulation vectors' layouts.
pub(crate) fn row_dims(x: &Layout, vectors: &[&Layout]) -> Result<(usize, usize, usize)> {
    let (b, s, d) = x.shape().dims3()?;
    if !x.is_contiguous() {
        bail!("klein-kernels: x must be contiguous");
    }
    for l in vectors {
        if l.shape().dims3()? != (b, 1, d) || l.stride()[2] != 1 {
            bail!(
                "klein-kernels: modulation {:?} (strides {:?}) does not fit x {:?}",
                l.shape(),
                l.stride(),
                x.shape()
            );
        }
    }
    Ok((b, s, d))
}

impl CustomOp3 for LayerNormModulate {
    fn name(&self) -> &'static str {
        "klein-layer-norm-modulate"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        shs: &CpuStorage,
        shl: &Layout,
        scs: &CpuStorage,
        scl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, s, d) = row_dims(xl, &[shl, scl])?;
        let round = cpu::rounder(cpu::dtype(xs));
        let (x, shift, scale) = (
            cpu::read(xs, xl)?,
            cpu::read(shs, shl)?,
            cpu::read(scs, scl)?,
        );
        let mut out = Vec::with_capacity(x.len());
        for (row, xr) in x.chunks_exact(d).enumerate() {
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let rstd = 1.0 / (var + self.eps).sqrt();
            let m = row / s * d;
            out.extend(xr.iter().enumerate().map(|(c, v)| {
                let n = round((v - mean) * rstd);
                round(round(round(1.0 + scale[m + c]) * n) + shift[m + c])
            }));
        }
        Ok((cpu::write(out, cpu::dtype(xs))?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        shs: &candle_core::CudaStorage,
        shl: &Layout,
        scs: &candle_core::CudaStorage,
        scl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::WrapErr;
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use half::bf16;

        use crate::cuda::{ELEMENTWISE, norm_block_per_row, view};

        let (b, s, d) = row_dims(xl, &[shl, scl])?;
        if shl.stride()[0] != scl.stride()[0] {
            bail!("layer_norm_modulate: shift and scale must share a batch stride");
        }
        let dev = xs.device().clone();
        let func = dev.get_or_load_custom_func(
            "layer_norm_modulate_bf16",
            ELEMENTWISE.name,
            ELEMENTWISE.ptx,
        )?;
        let out = unsafe { dev.alloc::<bf16>(b * s * d)? };
        let (x, shift, scale) = (
            view::<bf16>(xs, xl)?,
            view::<bf16>(shs, shl)?,
            view::<bf16>(scs, scl)?,
        );
        let (per_batch, dim) = (s as i32, d as i32);
        let mod_stride = shl.stride()[0] as i64;
        let mut launch = func.builder();
        launch.arg(&x).arg(&shift).arg(&scale).arg(&out);
        launch
            .arg(&per_batch)
            .arg(&dim)
            .arg(&mod_stride)
            .arg(&self.eps);
        unsafe { launch.launch(norm_block_per_row(b * s)) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            xl.shape().clone(),
        ))
    }
}
