//! Flash attention: `softmax(q kᵀ · scale) v` per head, the score matrix never materialised.

use candle_core::{CpuStorage, CustomOp3, D, DType, Device, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

#[cfg(feature = "cuda")]
mod f32;
#[cfg(any(feature = "cuda", test))]
mod schedule;
#[cfg(feature = "cuda")]
mod sm90;

/// q (B, H, S_q, hd), k and v (B, H_kv, S_kv, hd) → (B, S_q, H·hd) with the heads merged. The
/// CUDA kernel reads any layout whose last axis is contiguous and whose offset and strides are
/// multiples of 8 elements (e.g. heads viewed in place in a fused projection); the public
/// functions copy other layouts first. Query head h reads key/value head h / (H / H_kv)
/// (grouped-query attention).
/// Without `causal` or `key_mask`, every key is attended (the FLUX.2 joint attention, spec
/// §2.6); `causal` lets query i see keys j ≤ i (S_q = S_kv); `key_mask` (B, S_kv) u32 hides the
/// keys where it is 0 (padding). A query row that sees no key at all comes out as zeros.
/// On a build for Hopper the unmasked head dim 128 runs a wgmma kernel fed by tensor-map copies
/// (`flash_attention_sm90.cu`, same contract); everything else the mma.sync kernels. f32 inputs
/// (the VAE mid block: one head of 512) take the split-fp16 kernel `flash_attention_f32.cu`,
/// unmasked with H_kv = H, where the card gives a block its shared memory (212 KiB at 512).
/// `out_cols` = Some(c) makes the output rows c wide: the heads in the first H·hd columns, the
/// rest left uninitialised for the caller to fill ([`flash_attention_with_swiglu`]).
/// `v_tail` (B, H_kv, S_t, hd) holds the values of the keys past v's rows: the op attends
/// `cat([v, v_tail], 2)` without the concatenation (Hopper's kernel, v's rows a multiple of 16;
/// [`flash_attention_split_v`] concatenates where the kernel does not apply).
/// `q_norm`: q comes as a projection's raw rows (B, S_q, H·128) and Hopper's kernel applies
/// the per-head RMSNorm and interleaved RoPE to each query tile as it lands
/// ([`flash_attention_with_swiglu_norm_q`]; no other kernel takes it). `q_tail` (with
/// `q_norm`): (rows, weight), a second projection's raw q rows (B, S_t, H·128) for the queries
/// after q's (q's rows a multiple of 128), normalised with their own weight and RoPE rows
/// continuing after q's ([`flash_attention_split_v_norm_q`]: the double block's text then image
/// queries).
#[derive(Debug, Clone)]
pub struct FlashAttention {
    pub scale: f32,
    pub causal: bool,
    pub key_mask: Option<Tensor>,
    pub out_cols: Option<usize>,
    pub v_tail: Option<Tensor>,
    pub q_norm: Option<QNorm>,
    pub q_tail: Option<(Tensor, Tensor)>,
}

/// The query side of FLUX.2's QK norm, as [`crate::qk_norm_rope`] takes it with
/// [`crate::RopeStyle::Interleaved`]: the RMSNorm weight (hd, bf16), the RoPE tables (rows of
/// hd / 2 f32; query i at row `rope_offset + i`) and eps.
#[derive(Debug, Clone)]
pub struct QNorm {
    pub weight: Tensor,
    pub cos: Tensor,
    pub sin: Tensor,
    pub rope_offset: usize,
    pub eps: f64,
}

impl QNorm {
    /// Whether Hopper's kernel can take these for `s_q` queries of head dim `hd`: a contiguous
    /// bf16 weight of hd, contiguous f32 tables covering rows `rope_offset..rope_offset + s_q`
    /// (the kernel reads them without bounds).
    fn check(&self, s_q: usize, hd: usize) -> Result<()> {
        let table = |t: &Tensor| {
            t.dtype() == DType::F32
                && t.is_contiguous()
                && t.dims2()
                    .is_ok_and(|(rows, half)| rows >= self.rope_offset + s_q && half == hd / 2)
        };
        let weight = self.weight.dtype() == DType::BF16
            && self.weight.is_contiguous()
            && self.weight.dims() == [hd];
        if !(weight && table(&self.cos) && table(&self.sin)) {
            bail!(
                "flash attention: q's norm weight {:?} {:?} or RoPE tables {:?} / {:?} do not cover {s_q} queries of {hd} from row {}",
                self.weight.shape(),
                self.weight.dtype(),
                self.cos.shape(),
                self.sin.shape(),
                self.rope_offset
            );
        }
        Ok(())
    }
}

/// Head dims the bf16 CUDA kernel is instantiated for.
const HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// Rows of the strips in which Hopper's kernel loads a K/V tile across a split V's two parts
/// (`V_STRIP` in `flash_attention_sm90.cu`): the first part must hold whole strips.
const SM90_V_STRIP: usize = 16;

/// Query rows of a tile of Hopper's kernel (`BLOCK_M` in `flash_attention_sm90.cu`): the queries
/// before a tail must be whole tiles.
const SM90_Q_TILE: usize = 128;

/// Whether [`flash_attention`] runs the CUDA kernel for these queries (B, H, S, hd).
pub fn flash_attention_fused(q: &Tensor) -> bool {
    q.dims()
        .last()
        .is_some_and(|&hd| flash_attention_applies(q.device(), q.dtype(), hd))
}

/// Whether attention with `head_dim` in `dtype` on `device` takes the bf16 CUDA kernels, every
/// mask included (what a memory estimate made before any tensor exists needs to know).
pub fn flash_attention_applies(device: &Device, dtype: DType, head_dim: usize) -> bool {
    cfg!(feature = "cuda")
        && device.is_cuda()
        && dtype == DType::BF16
        && HEAD_DIMS.contains(&head_dim)
}

/// Whether unmasked f32 attention with `head_dim` on `device` takes the split-fp16 kernel (the
/// VAE mid block's single head; [`flash_attention`] runs it). The transformer and the text
/// encoder in f32 keep their compositions: this kernel has no masks or grouped heads.
pub fn flash_attention_f32_applies(device: &Device, head_dim: usize) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return f32::applies(dev, head_dim);
    }
    let _ = (device, head_dim);
    false
}

/// Unmasked [`FlashAttention`] with `scale = 1/√hd`: the CUDA kernel on a CUDA tensor where
/// [`flash_attention_fused`] (bf16) or [`flash_attention_f32_applies`] (f32), the plain Rust
/// forward on the CPU.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let op = FlashAttention::unmasked(q.dim(3)?);
    kernel_layout(q)?.apply_op3_no_bwd(&kernel_layout(k)?, &kernel_layout(v)?, &op)
}

/// [`flash_attention`] over the values `cat([v, v_tail], 2)`, read in place from both where
/// Hopper's kernel applies (the FLUX.2 double block: text then image values, each a strided view
/// of its stream's projection, no concatenation); elsewhere the concatenation.
pub fn flash_attention_split_v(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    v_tail: &Tensor,
) -> Result<Tensor> {
    let hd = q.dim(3)?;
    let in_place = cfg!(klein_sm90a)
        && flash_attention_fused(q)
        && hd == 128
        && q.dim(1)? == v.dim(1)?
        && v.dim(2)?.is_multiple_of(SM90_V_STRIP)
        && [q, k, v, v_tail].iter().all(|t| !t.stride().contains(&0));
    if !in_place {
        return flash_attention(q, k, &Tensor::cat(&[v, v_tail], 2)?);
    }
    let op = FlashAttention {
        v_tail: Some(kernel_layout(v_tail)?),
        ..FlashAttention::unmasked(hd)
    };
    kernel_layout(q)?.apply_op3_no_bwd(&kernel_layout(k)?, &kernel_layout(v)?, &op)
}

/// [`flash_attention_split_v`] of the joint queries `qk_norm_rope_joint((q_rows, norm.weight),
/// (q_tail_rows, tail_weight), norm.cos, norm.sin, H, norm.eps)`: q_rows (B, S, H·hd) and
/// q_tail_rows (B, S_t, H·hd), each a projection's q columns (rows may be strided), take RoPE
/// rows 0..S and S..S + S_t (`norm.rope_offset` must be 0). Hopper's kernel reads both in place
/// and normalises and rotates each query tile as it lands, the same bits as the joint norm
/// kernel's (FLUX.2's double block: the text then the image queries, one pass over q less);
/// elsewhere, or where S is not whole 128-row tiles, the norm kernel runs first.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_split_v_norm_q(
    q_rows: &Tensor,
    norm: &QNorm,
    q_tail_rows: &Tensor,
    tail_weight: &Tensor,
    k: &Tensor,
    v: &Tensor,
    v_tail: &Tensor,
) -> Result<Tensor> {
    if norm.rope_offset != 0 {
        bail!(
            "flash attention: the joint queries take RoPE rows from 0, not {}",
            norm.rope_offset
        );
    }
    let (_, h, _, hd) = k.dims4()?;
    let fits = |rows: &Tensor| {
        rows.dims3().is_ok_and(|(_, _, c)| c == h * hd)
            && q_heads(rows.layout()).is_ok_and(|l| strides(&l).is_some())
            && !rows.stride().contains(&0)
    };
    let (s, s_t) = (q_rows.dim(1)?, q_tail_rows.dim(1)?);
    let tail_norm = QNorm {
        weight: tail_weight.clone(),
        ..norm.clone()
    };
    let in_kernel = cfg!(klein_sm90a)
        && flash_attention_fused(k)
        && hd == Q_HD
        && fits(q_rows)
        && fits(q_tail_rows)
        && s.is_multiple_of(SM90_Q_TILE)
        && norm.check(s + s_t, hd).is_ok()
        && tail_norm.check(s + s_t, hd).is_ok()
        && v.dim(1)? == h
        && v.dim(2)?.is_multiple_of(SM90_V_STRIP)
        && [k, v, v_tail].iter().all(|t| !t.stride().contains(&0));
    if !in_kernel {
        let q = crate::qk_norm_rope_joint(
            (q_rows, &norm.weight),
            (q_tail_rows, tail_weight),
            &norm.cos,
            &norm.sin,
            h,
            norm.eps,
        )?;
        return flash_attention_split_v(&q, k, v, v_tail);
    }
    let op = FlashAttention {
        v_tail: Some(kernel_layout(v_tail)?),
        q_norm: Some(norm.clone()),
        q_tail: Some((q_tail_rows.clone(), tail_weight.clone())),
        ..FlashAttention::unmasked(hd)
    };
    q_rows.apply_op3_no_bwd(&kernel_layout(k)?, &kernel_layout(v)?, &op)
}

/// `cat([flash_attention(q, k, v), swiglu(gate, up)], -1)` without the concatenation: on CUDA
/// bf16 the attention kernel writes the first H·hd columns of one (B, S_q, H·hd + F) buffer and
/// the SwiGLU kernel the last F in place (the FLUX.2 single block's `to_out` input). Elsewhere
/// the compositions, concatenated.
pub fn flash_attention_with_swiglu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> Result<Tensor> {
    let fused = flash_attention_fused(q)
        && crate::fused(gate)
        && crate::swiglu::kernel_layout(gate)
        && crate::swiglu::kernel_layout(up);
    if !fused {
        let o = flash_attention(q, k, v)?;
        return Tensor::cat(&[o, crate::swiglu(gate, up)?], D::Minus1);
    }
    joint_with_swiglu(&kernel_layout(q)?, None, q.dim(1)?, k, v, gate, up)
}

/// The kernel path of [`flash_attention_with_swiglu`]: the attention of `heads` query heads into
/// the first heads·hd columns of one buffer (q as [`FlashAttention`] takes it with `q_norm`), the
/// SwiGLU into the rest in place.
fn joint_with_swiglu(
    q: &Tensor,
    q_norm: Option<QNorm>,
    heads: usize,
    k: &Tensor,
    v: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> Result<Tensor> {
    let (h, hd) = (heads, k.dim(3)?);
    let f = gate.dim(D::Minus1)?;
    let op = FlashAttention {
        out_cols: Some(h * hd + f),
        q_norm,
        ..FlashAttention::unmasked(hd)
    };
    let joint = q.apply_op3_no_bwd(&kernel_layout(k)?, &kernel_layout(v)?, &op)?;
    joint
        .narrow(D::Minus1, h * hd, f)?
        .inplace_op3(gate, up, &crate::SwiGlu)?;
    Ok(joint)
}

/// [`flash_attention_with_swiglu`] of the queries `qk_norm_rope(q_rows, norm, Interleaved)`,
/// q_rows (B, S, H·hd) a projection's q columns (rows may be strided): Hopper's kernel reads
/// them in place and normalises and rotates each query tile as it lands, the same bits as the
/// norm kernel's (FLUX.2's single block: one pass over q less); elsewhere the norm kernel runs
/// first.
pub fn flash_attention_with_swiglu_norm_q(
    q_rows: &Tensor,
    norm: &QNorm,
    k: &Tensor,
    v: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> Result<Tensor> {
    let (_, h, _, hd) = k.dims4()?;
    let in_kernel = cfg!(klein_sm90a)
        && flash_attention_fused(k)
        && hd == Q_HD
        && q_rows.dims3().is_ok_and(|(_, s, c)| {
            c == h * hd
                && norm.check(s, hd).is_ok()
                && q_heads(q_rows.layout()).is_ok_and(|l| strides(&l).is_some())
        })
        && crate::fused(gate)
        && crate::swiglu::kernel_layout(gate)
        && crate::swiglu::kernel_layout(up)
        && [k, v].iter().all(|t| !t.stride().contains(&0));
    if !in_kernel {
        let q = crate::qk_norm_rope(
            q_rows,
            &norm.weight,
            &norm.cos,
            &norm.sin,
            h,
            norm.rope_offset,
            norm.eps,
            crate::RopeStyle::Interleaved,
        )?;
        return flash_attention_with_swiglu(&q, k, v, gate, up);
    }
    joint_with_swiglu(q_rows, Some(norm.clone()), h, k, v, gate, up)
}

/// Q_HD-wide heads of q_rows (B, S, H·Q_HD) as the (B, H, S, Q_HD) layout the kernels read: a
/// view of the same elements ([`strides`] decides whether the kernel can read it).
fn q_heads(q_rows: &Layout) -> Result<Layout> {
    let (b, s, c) = q_rows.shape().dims3()?;
    if !c.is_multiple_of(Q_HD) {
        bail!("flash attention: q rows of {c} columns are not heads of {Q_HD}");
    }
    let st = q_rows.stride();
    Ok(Layout::new(
        Shape::from((b, c / Q_HD, s, Q_HD)),
        vec![st[0], Q_HD * st[2], st[1], st[2]],
        q_rows.start_offset(),
    ))
}

/// The head dim of Hopper's kernel, the only one that takes [`QNorm`].
const Q_HD: usize = 128;

/// `t` itself if the kernel can read its layout in place, else a contiguous copy.
fn kernel_layout(t: &Tensor) -> Result<Tensor> {
    if strides(t.layout()).is_some() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// (batch, head, row) strides of a (B, H, S, hd) layout the kernels read in place: unit last
/// stride, offset and strides multiples of 8 elements (16-byte aligned rows, as `cp.async` and
/// tensor maps need), each below 2³¹.
fn strides(l: &Layout) -> Option<[i32; 3]> {
    let st = l.stride();
    let aligned = st.len() == 4
        && st[3] == 1
        && l.start_offset().is_multiple_of(8)
        && st[..3].iter().all(|s| s.is_multiple_of(8));
    if !aligned {
        return None;
    }
    let narrow = |s: usize| i32::try_from(s).ok();
    Some([narrow(st[0])?, narrow(st[1])?, narrow(st[2])?])
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
        causal,
        key_mask: Some(key_mask.to_dtype(DType::U32)?.contiguous()?),
        ..FlashAttention::unmasked(q.dim(3)?)
    };
    kernel_layout(q)?.apply_op3_no_bwd(&kernel_layout(k)?, &kernel_layout(v)?, &op)
}

/// The CUDA storage behind a tensor's storage guard (`what` names the tensor in the error).
#[cfg(feature = "cuda")]
fn on_gpu<'a>(
    storage: &'a candle_core::Storage,
    what: &str,
) -> Result<&'a candle_core::CudaStorage> {
    match storage {
        candle_core::Storage::Cuda(s) => Ok(s),
        _ => bail!("flash attention: {what} is not on the GPU"),
    }
}

/// One input's (batch, head, row) strides, as the kernels' `Strides`.
#[cfg(feature = "cuda")]
#[repr(C)]
struct KernelStrides([i32; 3]);
// SAFETY: three i32, laid out as the kernels' struct of three ints.
#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda::cudarc::driver::DeviceRepr for KernelStrides {}

/// The shapes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    h_kv: usize,
    s_q: usize,
    s_kv: usize,
    hd: usize,
    /// Output row width.
    cols: usize,
}

impl FlashAttention {
    /// Every key attended with `scale = 1/√head_dim`, the output as the heads alone, nothing
    /// split or normalised: the base the public functions set their options on.
    pub fn unmasked(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f32).sqrt(),
            causal: false,
            key_mask: None,
            out_cols: None,
            v_tail: None,
            q_norm: None,
            q_tail: None,
        }
    }

    /// The call's shapes, after checking the op's contract.
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, h, s_q, hd) = q.shape().dims4()?;
        let (bk, h_kv, s_kv, hdk) = k.shape().dims4()?;
        let v_rows = v.dims().get(2).copied().unwrap_or(0)
            + self
                .v_tail
                .as_ref()
                .map_or(0, |t| t.dims().get(2).copied().unwrap_or(0));
        let values =
            |dims: &[usize]| dims.len() == 4 && (dims[0], dims[1], dims[3]) == (b, h_kv, hd);
        let values_match = values(v.dims())
            && self.v_tail.as_ref().is_none_or(|t| values(t.dims()))
            && v_rows == s_kv;
        if (bk, hdk) != (b, hd) || h_kv == 0 || !h.is_multiple_of(h_kv) || !values_match {
            bail!(
                "flash attention: q {:?}, k {:?}, v {:?} (tail {:?}) do not match",
                q.shape(),
                k.shape(),
                v.shape(),
                self.v_tail.as_ref().map(Tensor::shape)
            );
        }
        if s_kv == 0 {
            bail!("flash attention: no keys to attend");
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
        let cols = self.out_cols.unwrap_or(h * hd);
        if cols < h * hd || !cols.is_multiple_of(2) {
            bail!("flash attention: output rows of {cols} columns cannot hold {h} heads of {hd}");
        }
        Ok(Dims {
            b,
            h,
            h_kv,
            s_q,
            s_kv,
            hd,
            cols,
        })
    }

    /// v's values in (B, H_kv, S_kv, hd) order, its tail's rows after its own.
    fn values(&self, vs: &CpuStorage, vl: &Layout) -> Result<Vec<f32>> {
        let v = cpu::read(vs, vl)?;
        let Some(tail) = &self.v_tail else {
            return Ok(v);
        };
        let tail = tail.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (b, h_kv, s_v, hd) = vl.shape().dims4()?;
        let s_t = tail.len() / (b * h_kv * hd);
        let mut out = Vec::with_capacity(v.len() + tail.len());
        for (head, rest) in v.chunks_exact(s_v * hd).zip(tail.chunks_exact(s_t * hd)) {
            out.extend_from_slice(head);
            out.extend_from_slice(rest);
        }
        Ok(out)
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
        if self.q_norm.is_some() || self.q_tail.is_some() {
            bail!(
                "flash attention: only Hopper's kernel normalises q or reads its tail (q_norm, q_tail)"
            );
        }
        let d = self.dims(ql, kl, vl)?;
        let (q, k) = (cpu::read(qs, ql)?, cpu::read(ks, kl)?);
        let v = self.values(vs, vl)?;
        let mask = match &self.key_mask {
            Some(m) => Some(m.flatten_all()?.to_vec1::<u32>()?),
            None => None,
        };
        let (h, hd, s_kv) = (d.h, d.hd, d.s_kv);
        let mut out = vec![0f32; d.b * d.s_q * d.cols];
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
                let o = &mut out[(b * d.s_q + i) * d.cols + head * hd..][..hd];
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
            Shape::from((d.b, d.s_q, d.cols)),
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
        let heads_of_rows;
        let ql = match &self.q_norm {
            Some(_) => {
                heads_of_rows = q_heads(ql)?;
                &heads_of_rows
            }
            None => ql,
        };
        let q_tail_storage = self
            .q_tail
            .as_ref()
            .map(|(rows, weight)| (rows.storage_and_layout(), weight));
        let q_tail = match (&q_tail_storage, &self.q_norm) {
            (Some(((storage, rows), weight)), Some(_)) => {
                let storage = on_gpu(storage, "q's tail")?;
                let heads = q_heads(rows)?;
                let (b, h, _, _) = ql.shape().dims4()?;
                if heads.dims()[..2] != [b, h]
                    || strides(&heads).is_none()
                    || heads.stride().contains(&0)
                    || weight.dtype() != DType::BF16
                    || !weight.is_contiguous()
                    || weight.dims() != [Q_HD]
                {
                    bail!(
                        "flash attention: the kernel cannot read q's tail {:?} (weight {:?}) with q {:?}",
                        rows.shape(),
                        weight.shape(),
                        ql.shape()
                    );
                }
                Some((storage, heads))
            }
            (Some(_), None) => bail!("flash attention: q's tail comes with q's norm"),
            (None, _) => None,
        };
        let mut d = self.dims(ql, kl, vl)?;
        d.s_q += q_tail.as_ref().map_or(0, |(_, l)| l.dims()[2]);
        if let Some(norm) = &self.q_norm {
            norm.check(d.s_q, Q_HD)?;
        }
        let (b, h, s_q, hd) = (d.b, d.h, d.s_q, d.hd);
        let layout = |l: &Layout| match strides(l) {
            Some(s) => Ok(KernelStrides(s)),
            None => bail!(
                "flash attention: the kernel cannot read {:?} with strides {:?} in place",
                l.shape(),
                l.stride()
            ),
        };
        let (q_strides, k_strides, v_strides) = (layout(ql)?, layout(kl)?, layout(vl)?);
        let masked = self.causal || self.key_mask.is_some() || d.h_kv != h;
        let dev = qs.device().clone();
        if qs.dtype() == DType::F32 {
            if !f32::applies(&dev, hd) || masked || self.out_cols.is_some() || self.v_tail.is_some()
            {
                bail!(
                    "flash attention: the f32 kernel attends every key with head dims {:?} (head dim {hd}, masked {masked})",
                    f32::HEAD_DIMS
                );
            }
            let strides = [q_strides, k_strides, v_strides];
            let out = f32::forward(&dev, (qs, ql), (ks, kl), (vs, vl), strides, d, self.scale)?;
            return Ok((
                candle_core::CudaStorage::wrap_cuda_slice(out, dev),
                Shape::from((b, s_q, d.cols)),
            ));
        }
        if !HEAD_DIMS.contains(&hd) {
            bail!("flash attention: no kernel for head dim {hd}");
        }
        // A build for Hopper runs the unmasked head dim 128 (the FLUX.2 joint attention) on its
        // wgmma / tensor-map kernel; tensor maps take no zero (broadcast) strides.
        let broadcast = [ql, kl, vl].iter().any(|l| l.stride().contains(&0));
        let tail_storage = self.v_tail.as_ref().map(Tensor::storage_and_layout);
        let tail = match &tail_storage {
            Some((storage, layout)) => {
                let storage = on_gpu(storage, "v's tail")?;
                if strides(layout).is_none() || layout.stride().contains(&0) {
                    bail!(
                        "flash attention: the kernel cannot read v's tail {:?} in place",
                        layout.shape()
                    );
                }
                Some((storage, *layout))
            }
            None => None,
        };
        let tail_weight_storage = self
            .q_tail
            .as_ref()
            .map(|(_, weight)| weight.storage_and_layout());
        let norm_storage = self.q_norm.as_ref().map(|n| {
            (
                n,
                [&n.weight, &n.cos, &n.sin].map(Tensor::storage_and_layout),
            )
        });
        let q_norm = match &norm_storage {
            Some((n, [(w, wl), (c, cl), (s, sl)])) => {
                let (
                    candle_core::Storage::Cuda(w),
                    candle_core::Storage::Cuda(c),
                    candle_core::Storage::Cuda(s),
                ) = (&**w, &**c, &**s)
                else {
                    bail!("flash attention: q's norm weight or RoPE tables are not on the GPU");
                };
                let tail_weight = match &tail_weight_storage {
                    Some((ts, tl)) => Some(view::<bf16>(on_gpu(ts, "q's tail weight")?, tl)?),
                    None => None,
                };
                Some(sm90::QNormArgs {
                    weight: view::<bf16>(w, wl)?,
                    tail_weight,
                    cos: view::<f32>(c, cl)?,
                    sin: view::<f32>(s, sl)?,
                    rope_offset: n.rope_offset as i32,
                    eps: n.eps as f32,
                })
            }
            None => None,
        };
        if cfg!(klein_sm90a) && !masked && hd == 128 && !broadcast {
            let out = sm90::forward(
                &dev,
                (qs, ql),
                (ks, kl),
                (vs, vl),
                tail,
                q_tail.as_ref().map(|(storage, l)| (*storage, l)),
                q_norm,
                d,
                self.scale,
            )?;
            return Ok((
                candle_core::CudaStorage::wrap_cuda_slice(out, dev),
                Shape::from((b, s_q, d.cols)),
            ));
        }
        if tail.is_some() || q_norm.is_some() {
            bail!(
                "flash attention: only Hopper's kernel reads a split v or normalises q (flash_attention_split_v, flash_attention_with_swiglu_norm_q)"
            );
        }
        let kernel = if masked {
            format!("flash_attention_masked_bf16_hd{hd}")
        } else {
            format!("flash_attention_bf16_hd{hd}")
        };
        let func =
            dev.get_or_load_custom_func(&kernel, FLASH_ATTENTION.name, FLASH_ATTENTION.ptx)?;
        // Q tile + two stages of K and V tiles, bf16.
        let smem = (BLOCK_M + 4 * BLOCK_N) * hd * 2;
        func.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let out = unsafe { dev.alloc::<bf16>(b * s_q * d.cols)? };
        let (q, k, v) = (
            view::<bf16>(qs, ql)?,
            view::<bf16>(ks, kl)?,
            view::<bf16>(vs, vl)?,
        );
        let (s_q_arg, s_kv_arg) = (s_q as i32, d.s_kv as i32);
        let (heads, kv_heads) = (h as i32, d.h_kv as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let (batch_stride, row_stride) = ((s_q * d.cols) as i64, d.cols as i64);
        let cfg = LaunchConfig {
            grid_dim: (s_q.div_ceil(BLOCK_M) as u32, (b * h) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut launch = func.builder();
        launch.arg(&q).arg(&k).arg(&v).arg(&out);
        launch.arg(&q_strides).arg(&k_strides).arg(&v_strides);
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
            Some((storage, layout)) => Some(view::<u32>(on_gpu(storage, "the key mask")?, layout)?),
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
            Shape::from((b, s_q, d.cols)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    /// The heads q_heads makes of a projection's q columns are the view the model's strided
    /// heads take (same shape, strides and offset), one the kernels read in place; rows whose
    /// columns are not unit-strided are not.
    #[test]
    fn q_heads_view_the_projections_q_columns() -> Result<()> {
        let dev = Device::Cpu;
        let (b, s, h) = (2, 5, 3);
        let c = (3 * h + 2) * Q_HD;
        let p = Tensor::zeros((b, s, c), DType::F32, &dev)?;
        let rows = p.i((.., .., Q_HD * h..2 * Q_HD * h))?;
        let want = p
            .reshape((b, s, c / Q_HD, Q_HD))?
            .narrow(2, h, h)?
            .transpose(1, 2)?;
        let got = q_heads(rows.layout())?;
        assert_eq!(got.dims(), want.dims());
        assert_eq!(got.stride(), want.stride());
        assert_eq!(got.start_offset(), want.layout().start_offset());
        assert!(strides(&got).is_some());
        let transposed = Tensor::zeros((b, h * Q_HD, s), DType::F32, &dev)?.transpose(1, 2)?;
        assert!(strides(&q_heads(transposed.layout())?).is_none());
        assert!(q_heads(&Layout::contiguous((b, s, Q_HD + 8))).is_err());
        Ok(())
    }

    /// Q's norm inputs are checked before the kernel reads them without bounds: tables that do
    /// not reach the last query's row, or a weight of the wrong dtype, are refused.
    #[test]
    fn q_norm_inputs_must_cover_every_query() -> Result<()> {
        let dev = Device::Cpu;
        let table = |rows: usize| Tensor::zeros((rows, Q_HD / 2), DType::F32, &dev);
        let norm = |rows: usize, weight: DType| -> Result<QNorm> {
            Ok(QNorm {
                weight: Tensor::ones(Q_HD, weight, &dev)?,
                cos: table(rows)?,
                sin: table(rows)?,
                rope_offset: 3,
                eps: 1e-6,
            })
        };
        assert!(norm(3 + 10, DType::BF16)?.check(10, Q_HD).is_ok());
        let short = norm(3 + 9, DType::BF16)?.check(10, Q_HD).unwrap_err();
        assert!(
            short.to_string().contains("do not cover 10 queries"),
            "{short}"
        );
        assert!(norm(3 + 10, DType::F32)?.check(10, Q_HD).is_err());
        Ok(())
    }
}
