//! `x + gate ⊙ y` and the adaptive norm that reads it, in one pass over the rows: every FLUX.2
//! gated residual but the last is followed by a LayerNorm + modulation of its result (the double
//! block's MLP norm, the next block's attention norm, whose modulation the blocks of one kind
//! share).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor, bail};

use crate::{GateResidual, LayerNormModulate, cpu, gate_residual, layer_norm_modulate};

/// x and y (B, S, D) contiguous, gate, `shift` and `scale` (B, 1, D) with unit last stride →
/// (2, B, S, D): `[r; (1 + scale) ⊙ LayerNorm(r) + shift]` with `r = x + gate ⊙ y`, each rounded
/// exactly as [`GateResidual`] and then [`LayerNormModulate`] round it. The CUDA kernel keeps a
/// row in one block's registers: D a multiple of 8, at most 4096, every vector's offset and
/// batch stride multiples of 8 elements ([`gate_residual_norm`] composes the two ops elsewhere).
#[derive(Debug, Clone)]
pub struct GateResidualNorm {
    pub eps: f32,
    pub shift: Tensor,
    pub scale: Tensor,
}

/// The widest row the kernel keeps in registers: four 16-byte vectors for each of a block's
/// 128 threads (`BLOCK_ROW_VECS` in elementwise.cu, `cuda::NORM_ROW_THREADS`).
const MAX_DIM: usize = 4 * 8 * 128;

/// `(x + gate ⊙ y, (1 + scale) ⊙ LayerNorm(x + gate ⊙ y) + shift)`: [`GateResidualNorm`] on CUDA
/// bf16 tensors it takes, [`gate_residual`] then [`layer_norm_modulate`] otherwise.
pub fn gate_residual_norm(
    x: &Tensor,
    y: &Tensor,
    gate: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let d = x.dim(2)?;
    let vectors = [gate, shift, scale]
        .iter()
        .all(|t| vector_layout(t.layout()))
        && shift.stride().first() == scale.stride().first();
    if crate::fused(x) && d.is_multiple_of(8) && d <= MAX_DIM && vectors {
        let op = GateResidualNorm {
            eps: eps as f32,
            shift: shift.clone(),
            scale: scale.clone(),
        };
        let both = x
            .contiguous()?
            .apply_op3_no_bwd(&y.contiguous()?, gate, &op)?;
        return Ok((both.get(0)?, both.get(1)?));
    }
    let r = gate_residual(x, y, gate)?;
    let n = layer_norm_modulate(&r, shift, scale, eps)?;
    Ok((r, n))
}

/// Whether 16-byte vectors reach every batch item's row of a (B, 1, D) modulation vector
/// (D a multiple of 8): its offset and batch stride are multiples of 8 elements.
fn vector_layout(l: &Layout) -> bool {
    l.start_offset().is_multiple_of(8) && l.stride().first().is_some_and(|s| s.is_multiple_of(8))
}

impl GateResidualNorm {
    fn norm(&self) -> LayerNormModulate {
        LayerNormModulate { eps: self.eps }
    }
}

impl CustomOp3 for GateResidualNorm {
    fn name(&self) -> &'static str {
        "klein-gate-residual-norm"
    }

    /// The two ops' CPU forwards, one after the other.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (r, shape) = GateResidual.cpu_fwd(xs, xl, ys, yl, gs, gl)?;
        let (shift, shl) = self.shift.storage_and_layout();
        let (scale, scl) = self.scale.storage_and_layout();
        let (Storage::Cpu(shs), Storage::Cpu(scs)) = (&*shift, &*scale) else {
            bail!("gate_residual_norm: shift and scale are not on the CPU");
        };
        let rl = Layout::contiguous(&shape);
        let (n, _) = self.norm().cpu_fwd(&r, &rl, shs, shl, scs, scl)?;
        let mut both = cpu::read(&r, &rl)?;
        both.extend(cpu::read(&n, &rl)?);
        let mut dims = vec![2];
        dims.extend(shape.dims());
        Ok((cpu::write(both, cpu::dtype(xs))?, Shape::from(dims)))
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

        use crate::cuda::{ELEMENTWISE, norm_block_per_row, view};

        let (shift, shl) = self.shift.storage_and_layout();
        let (scale, scl) = self.scale.storage_and_layout();
        let (Storage::Cuda(shs), Storage::Cuda(scs)) = (&*shift, &*scale) else {
            bail!("gate_residual_norm: shift and scale are not on the GPU");
        };
        let (b, s, d) = crate::residual::dims(xl, yl, gl)?;
        crate::modulate::row_dims(xl, &[shl, scl])?;
        let fits = d.is_multiple_of(8)
            && d <= MAX_DIM
            && [gl, shl, scl].iter().all(|l| vector_layout(l))
            && shl.stride()[0] == scl.stride()[0];
        if !fits {
            bail!(
                "gate_residual_norm: rows of {d} or modulation strides {:?} / {:?} / {:?} do not fit the kernel",
                gl.stride(),
                shl.stride(),
                scl.stride()
            );
        }
        let dev = xs.device().clone();
        let func = dev.get_or_load_custom_func(
            "gate_residual_layer_norm_modulate_bf16",
            ELEMENTWISE.name,
            ELEMENTWISE.ptx,
        )?;
        let out = unsafe { dev.alloc::<bf16>(2 * b * s * d)? };
        let (x, y, gate) = (
            view::<bf16>(xs, xl)?,
            view::<bf16>(ys, yl)?,
            view::<bf16>(gs, gl)?,
        );
        let (shift, scale) = (view::<bf16>(shs, shl)?, view::<bf16>(scs, scl)?);
        let (per_batch, dim) = (s as i32, d as i32);
        let (gate_stride, mod_stride) = (gl.stride()[0] as i64, shl.stride()[0] as i64);
        let mut launch = func.builder();
        launch.arg(&x).arg(&y).arg(&gate).arg(&shift).arg(&scale);
        launch.arg(&out);
        launch.arg(&per_batch).arg(&dim);
        launch.arg(&gate_stride).arg(&mod_stride).arg(&self.eps);
        unsafe { launch.launch(norm_block_per_row(b * s)) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((2, b, s, d)),
        ))
    }
}
