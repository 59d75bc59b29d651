//! Flash attention: `softmax(q kᵀ · scale) v` per head, the score matrix never materialised.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

/// q (B, H, S_q, hd), k and v (B, H_kv, S_kv, hd), contiguous → (B, S_q, H·hd) with the heads
/// merged. Query head h reads key/value head h / (H / H_kv) (grouped-query attention).
/// Without `causal` or `key_mask`, every key is attended (the FLUX.2 joint attention, spec
/// §2.6); `causal` lets query i see keys j ≤ i (S_q = S_kv); `key_mask` (B, S_kv) u32 hides the
/// keys where it is 0 (padding). A query row that sees no key at all comes out as zeros.
#[derive(Debug, Clone)]
pub struct FlashAttention {
    pub scale: f32,
    pub causal: bool,
    pub key_mask: Option<Tensor>,
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

/// Unmasked [`FlashAttention`] with `scale = 1/√hd`: the CUDA kernel on a CUDA bf16 tensor, the
/// plain Rust forward on the CPU.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let op = FlashAttention {
        scale: 1.0 / (q.dim(3)? as f32).sqrt(),
        causal: false,
        key_mask: None,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// Grouped-query attention with `scale = 1/√hd`, a key mask (B, S_kv) u32 (1 = token, 0 =
/// padding) and optionally causal: the CUDA kernel where [`flash_attention_fused`], else
/// [`reference::masked_attention`]. Every query row must see at least one key (the composition
/// makes such a row NaN, the kernel zeros).
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: &Tensor,
    causal: bool,
) -> Result<Tensor> {
    if !flash_attention_fused(q) {
        return reference::masked_attention(q, k, v, key_mask, causal);
    }
    let op = FlashAttention {
        scale: 1.0 / (q.dim(3)? as f32).sqrt(),
        causal,
        key_mask: Some(key_mask.to_dtype(DType::U32)?.contiguous()?),
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// The shapes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    h_kv: usize,
    s_q: usize,
    s_kv: usize,
    hd: usize,
}

impl FlashAttention {
    /// The call's shapes, after checking the op's contract.
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, h, s_q, hd) = q.shape().dims4()?;
        let (bk, h_kv, s_kv, hdk) = k.shape().dims4()?;
        if (bk, hdk) != (b, hd) || h_kv == 0 || !h.is_multiple_of(h_kv) || v.shape() != k.shape() {
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
        if self.causal && s_q != s_kv {
            bail!("flash attention: causal needs as many queries as keys ({s_q} vs {s_kv})");
        }
        if let Some(mask) = &self.key_mask
            && (mask.dims() != [b, s_kv] || mask.dtype() != DType::U32 || !mask.is_contiguous())
        {
            bail!(
                "flash attention: key mask {:?} {:?} is not a contiguous u32 ({b}, {s_kv})",
                mask.shape(),
                mask.dtype()
            );
        }
        Ok(Dims {
            b,
            h,
            h_kv,
            s_q,
            s_kv,
            hd,
        })
    }

    /// Whether query `i` of batch item `b` sees key `j`.
    fn sees(&self, mask: Option<&[u32]>, d: Dims, b: usize, i: usize, j: usize) -> bool {
        (!self.causal || j <= i) && mask.is_none_or(|m| m[b * d.s_kv + j] != 0)
    }
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
        let d = self.dims(ql, kl, vl)?;
        let (q, k, v) = (cpu::read(qs, ql)?, cpu::read(ks, kl)?, cpu::read(vs, vl)?);
        let mask = match &self.key_mask {
            Some(m) => Some(m.flatten_all()?.to_vec1::<u32>()?),
            None => None,
        };
        let (h, hd, s_kv) = (d.h, d.hd, d.s_kv);
        let mut out = vec![0f32; d.b * d.s_q * h * hd];
        let mut p = vec![0f32; s_kv];
        for bh in 0..d.b * h {
            let (b, head) = (bh / h, bh % h);
            let kv = (b * d.h_kv + head / (h / d.h_kv)) * s_kv * hd;
            let (kb, vb) = (&k[kv..][..s_kv * hd], &v[kv..][..s_kv * hd]);
            for i in 0..d.s_q {
                let qi = &q[(bh * d.s_q + i) * hd..][..hd];
                for (j, (pj, kj)) in p.iter_mut().zip(kb.chunks_exact(hd)).enumerate() {
                    *pj = if self.sees(mask.as_deref(), d, b, i, j) {
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * self.scale
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if max == f32::NEG_INFINITY {
                    continue;
                }
                let mut sum = 0f32;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let o = &mut out[((b * d.s_q + i) * h + head) * hd..][..hd];
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
            Shape::from((d.b, d.s_q, h * hd)),
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
        let d = self.dims(ql, kl, vl)?;
        let (b, h, s_q, hd) = (d.b, d.h, d.s_q, d.hd);
        if !HEAD_DIMS.contains(&hd) {
            bail!("flash attention: no kernel for head dim {hd}");
        }
        let masked = self.causal || self.key_mask.is_some() || d.h_kv != h;
        let kernel = if masked {
            format!("flash_attention_masked_bf16_hd{hd}")
        } else {
            format!("flash_attention_bf16_hd{hd}")
        };
        let dev = qs.device().clone();
        let func =
            dev.get_or_load_custom_func(&kernel, FLASH_ATTENTION.name, FLASH_ATTENTION.ptx)?;
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
        let (s_q_arg, s_kv_arg) = (s_q as i32, d.s_kv as i32);
        let (heads, kv_heads) = (h as i32, d.h_kv as i32);
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
            .arg(&kv_heads)
            .arg(&scale_log2);
        launch.arg(&batch_stride).arg(&row_stride);
        let causal = i32::from(self.causal);
        let mask_storage = self.key_mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &mask_storage {
            Some((storage, layout)) => {
                let candle_core::Storage::Cuda(storage) = &**storage else {
                    bail!("flash attention: the key mask is not on the GPU");
                };
                Some(view::<u32>(storage, layout)?)
            }
            None => None,
        };
        // The masked kernel takes a null pointer for "no key mask".
        let no_mask = 0u64;
        if masked {
            launch.arg(&causal);
            match &mask {
                Some(m) => launch.arg(m),
                None => launch.arg(&no_mask),
            };
        }
        unsafe { launch.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, s_q, h * hd)),
        ))
    }
}
