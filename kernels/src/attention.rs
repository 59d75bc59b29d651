//! Flash attention: `softmax(q kᵀ · scale) v` per head, the score matrix never materialised.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, bail};

use crate::cpu;

/// q (B, H, S_q, hd), k and v (B, H, S_kv, hd), contiguous → (B, S_q, H·hd) with the heads
/// merged. No mask: every key is attended (the FLUX.2 joint attention, spec §2.6).
#[derive(Debug, Clone, Copy)]
pub struct FlashAttention {
    pub scale: f32,
}

/// Head dims the CUDA kernel is instantiated for.
const HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// Whether [`flash_attention`] runs the CUDA kernel for these queries (B, H, S, hd).
pub fn flash_attention_fused(q: &Tensor) -> bool {
    q.dims()
        .last()
        .is_some_and(|&hd| flash_attention_applies(q.device(), q.dtype(), hd))
}

/// Whether attention with `head_dim` in `dtype` on `device` takes the CUDA kernel (what a
/// memory estimate made before any tensor exists needs to know).
pub fn flash_attention_applies(device: &Device, dtype: DType, head_dim: usize) -> bool {
    cfg!(feature = "cuda")
        && device.is_cuda()
        && dtype == DType::BF16
        && HEAD_DIMS.contains(&head_dim)
}

/// [`FlashAttention`] with `scale = 1/√hd`: the CUDA kernel on a CUDA bf16 tensor, the plain
/// Rust reference on the CPU.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let hd = q.dim(3)?;
    let op = FlashAttention {
        scale: 1.0 / (hd as f32).sqrt(),
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// (B, H, S_q, S_kv, hd), after checking the op's layout contract.
fn dims(q: &Layout, k: &Layout, v: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, h, s_q, hd) = q.shape().dims4()?;
    let (bk, hk, s_kv, hdk) = k.shape().dims4()?;
    if (bk, hk, hdk) != (b, h, hd) || v.shape() != k.shape() {
        bail!(
            "flash attention: q {:?}, k {:?}, v {:?} do not match",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    if !(q.is_contiguous() && k.is_contiguous() && v.is_contiguous()) {
        bail!("flash attention: q, k and v must be contiguous");
    }
    Ok((b, h, s_q, s_kv, hd))
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "klein-flash-attention"
    }

    /// f32 softmax per query row, output rounded once to the input dtype.
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, s_q, s_kv, hd) = dims(ql, kl, vl)?;
        let (q, k, v) = (cpu::read(qs, ql)?, cpu::read(ks, kl)?, cpu::read(vs, vl)?);
        let mut out = vec![0f32; b * s_q * h * hd];
        let mut p = vec![0f32; s_kv];
        for bh in 0..b * h {
            let kb = &k[bh * s_kv * hd..][..s_kv * hd];
            let vb = &v[bh * s_kv * hd..][..s_kv * hd];
            for i in 0..s_q {
                let qi = &q[(bh * s_q + i) * hd..][..hd];
                for (pj, kj) in p.iter_mut().zip(kb.chunks_exact(hd)) {
                    *pj = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * self.scale;
                }
                let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let o = &mut out[((bh / h * s_q + i) * h + bh % h) * hd..][..hd];
                for (pj, vj) in p.iter().zip(vb.chunks_exact(hd)) {
                    for (od, vd) in o.iter_mut().zip(vj) {
                        *od += pj * vd;
                    }
                }
                o.iter_mut().for_each(|od| *od /= sum);
            }
        }
        Ok((
            cpu::write(out, cpu::dtype(qs))?,
            Shape::from((b, s_q, h * hd)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::WrapErr;
        use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg, sys};
        use half::bf16;

        use crate::cuda::{FLASH_ATTENTION, view};

        /// Query rows per block and keys per shared tile (flash_attention.cu).
        const BLOCK_M: usize = 128;
        const BLOCK_N: usize = 32;
        let (b, h, s_q, s_kv, hd) = dims(ql, kl, vl)?;
        if !HEAD_DIMS.contains(&hd) {
            bail!("flash attention: no kernel for head dim {hd}");
        }
        let dev = qs.device().clone();
        let func = dev.get_or_load_custom_func(
            &format!("flash_attention_bf16_hd{hd}"),
            FLASH_ATTENTION.name,
            FLASH_ATTENTION.ptx,
        )?;
        // Q tile + two stages of K and V tiles, bf16.
        let smem = (BLOCK_M + 4 * BLOCK_N) * hd * 2;
        func.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let out = unsafe { dev.alloc::<bf16>(b * s_q * h * hd)? };
        let (q, k, v) = (
            view::<bf16>(qs, ql)?,
            view::<bf16>(ks, kl)?,
            view::<bf16>(vs, vl)?,
        );
        let (s_q_arg, s_kv_arg, heads) = (s_q as i32, s_kv as i32, h as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let (batch_stride, row_stride) = ((s_q * h * hd) as i64, (h * hd) as i64);
        let cfg = LaunchConfig {
            grid_dim: (s_q.div_ceil(BLOCK_M) as u32, (b * h) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut launch = func.builder();
        launch.arg(&q).arg(&k).arg(&v).arg(&out);
        launch
            .arg(&s_q_arg)
            .arg(&s_kv_arg)
            .arg(&heads)
            .arg(&scale_log2);
        launch.arg(&batch_stride).arg(&row_stride);
        unsafe { launch.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, s_q, h * hd)),
        ))
    }
}
