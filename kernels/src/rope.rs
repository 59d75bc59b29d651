//! Per-head QK RMSNorm and RoPE in one pass, from a projection straight into the (B, H, S, hd)
//! layout attention reads.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

mod joint;

pub use joint::{JointQkNormRope, qk_norm_rope_joint};

/// Which elements RoPE rotates together, and in what arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2j, 2j+1), rotated in f32 and rounded once (FLUX.2 applies RoPE in f32).
    Interleaved,
    /// Pairs (j, j + hd/2) in the model dtype's arithmetic, every product and the sum rounded
    /// (transformers' `rotate_half` on bf16: Qwen3). The tables hold model-dtype values.
    RotateHalf,
}

/// Whether FLUX.2's head-dim-128 kernel (16-byte accesses) takes these operands: each
/// source's projection rows (start and batch / row strides) and norm weight 16-byte aligned as
/// bf16, and the f32 tables' rows too.
fn vectorizable(hd: usize, sources: &[(&Layout, &Layout)], cos: &Layout, sin: &Layout) -> bool {
    let rows = |l: &Layout| {
        let stride = l.stride();
        stride.len() == 3
            && [l.start_offset(), stride[0], stride[1]]
                .iter()
                .all(|v| v % 8 == 0)
    };
    hd == 128
        && sources
            .iter()
            .all(|(src, weight)| rows(src) && weight.start_offset() % 8 == 0)
        && [cos, sin].iter().all(|l| l.start_offset() % 4 == 0)
}

/// src (B, S, H·hd) with unit last stride (e.g. the q columns of a fused projection), cos and
/// sin (S_rope, hd/2) f32 → (B, H, S, hd). Token `s` takes RoPE row `rope_offset + s`. Rounds
/// like the composition: normalised value, weight product, then as `style` rotates.
#[derive(Debug, Clone)]
pub struct QkNormRope {
    /// The RMSNorm weight (hd), the dtype of src.
    pub weight: Tensor,
    pub heads: usize,
    pub rope_offset: usize,
    pub eps: f32,
    pub style: RopeStyle,
}

/// [`QkNormRope`] on a CUDA bf16 tensor, [`reference::qk_norm_rope`] otherwise.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope(
    src: &Tensor,
    weight: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    rope_offset: usize,
    eps: f64,
    style: RopeStyle,
) -> Result<Tensor> {
    let hd = weight.dim(0)?;
    if crate::fused(src) && hd.is_multiple_of(2) && hd <= 256 {
        let op = QkNormRope {
            weight: weight.clone(),
            heads,
            rope_offset,
            eps: eps as f32,
            style,
        };
        src.apply_op3_no_bwd(cos, sin, &op)
    } else {
        reference::qk_norm_rope(src, weight, cos, sin, heads, rope_offset, eps, style)
    }
}

impl QkNormRope {
    /// (B, S, hd), after checking the layouts.
    fn dims(&self, src: &Layout, cos: &Layout, sin: &Layout) -> Result<(usize, usize, usize)> {
        let (b, s, width) = src.shape().dims3()?;
        let hd = self.weight.dim(0)?;
        if width != self.heads * hd || src.stride()[2] != 1 {
            bail!(
                "qk_norm_rope: src {:?} (strides {:?}) is not {} heads of {hd}",
                src.shape(),
                src.stride(),
                self.heads
            );
        }
        let rope = (self.rope_offset + s, hd / 2);
        for l in [cos, sin] {
            let (rows, half) = l.shape().dims2()?;
            if rows < rope.0 || half != rope.1 || !l.is_contiguous() {
                bail!(
                    "qk_norm_rope: rope table {:?} does not cover {rope:?}",
                    l.shape()
                );
            }
        }
        Ok((b, s, hd))
    }
}

impl CustomOp3 for QkNormRope {
    fn name(&self) -> &'static str {
        "klein-qk-norm-rope"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ns: &CpuStorage,
        nl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, hd) = self.dims(sl, cl, nl)?;
        let h = self.heads;
        let round = cpu::rounder(cpu::dtype(ss));
        let weight = self
            .weight
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let (src, cos, sin) = (cpu::read(ss, sl)?, cpu::read(cs, cl)?, cpu::read(ns, nl)?);
        let mut out = vec![0f32; src.len()];
        for (i, x) in src.chunks_exact(hd).enumerate() {
            let (bi, si, hi) = (i / (s * h), i / h % s, i % h);
            let rstd = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / hd as f32 + self.eps).sqrt();
            let row = (self.rope_offset + si) * hd / 2;
            let o = &mut out[((bi * h + hi) * s + si) * hd..][..hd];
            // Pair p's members.
            let (first, second) = match self.style {
                RopeStyle::Interleaved => (2, 1),
                RopeStyle::RotateHalf => (1, hd / 2),
            };
            for p in 0..hd / 2 {
                let (i0, i1) = (first * p, first * p + second);
                let y0 = round(round(x[i0] * rstd) * weight[i0]);
                let y1 = round(round(x[i1] * rstd) * weight[i1]);
                let (c, sn) = (cos[row + p], sin[row + p]);
                (o[i0], o[i1]) = match self.style {
                    RopeStyle::Interleaved => (y0 * c - y1 * sn, y1 * c + y0 * sn),
                    RopeStyle::RotateHalf => (
                        round(round(y0 * c) - round(y1 * sn)),
                        round(round(y1 * c) + round(y0 * sn)),
                    ),
                };
            }
        }
        Ok((cpu::write(out, cpu::dtype(ss))?, Shape::from((b, h, s, hd))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
        cs: &candle_core::CudaStorage,
        cl: &Layout,
        ns: &candle_core::CudaStorage,
        nl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::WrapErr;
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use half::bf16;

        use crate::cuda::{ELEMENTWISE, view, warp_per_item};

        let (b, s, hd) = self.dims(sl, cl, nl)?;
        let shape = Shape::from((b, self.heads, s, hd));
        let (weight, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(weight) = &*weight else {
            bail!("qk_norm_rope: the weight is not on the GPU");
        };
        if self.style == RopeStyle::Interleaved && vectorizable(hd, &[(sl, wl)], cl, nl) {
            let source = interleaved128::Source {
                src: (ss, sl),
                weight: (weight, wl),
            };
            let out = interleaved128::launch(
                &[source],
                (cs, cl),
                (ns, nl),
                self.heads,
                self.rope_offset,
                self.eps,
            )?;
            return Ok((out, shape));
        }
        let dev = ss.device().clone();
        let func =
            dev.get_or_load_custom_func("qk_norm_rope_bf16", ELEMENTWISE.name, ELEMENTWISE.ptx)?;
        let out = unsafe { dev.alloc::<bf16>(b * s * self.heads * hd)? };
        let (src, w) = (view::<bf16>(ss, sl)?, view::<bf16>(weight, wl)?);
        let (cos, sin) = (view::<f32>(cs, cl)?, view::<f32>(ns, nl)?);
        let (batch, seq, heads, head_dim) = (b as i32, s as i32, self.heads as i32, hd as i32);
        let (batch_stride, row_stride) = (sl.stride()[0] as i64, sl.stride()[1] as i64);
        let offset = self.rope_offset as i32;
        let rotate_half = i32::from(self.style == RopeStyle::RotateHalf);
        let mut launch = func.builder();
        launch.arg(&src).arg(&w).arg(&cos).arg(&sin).arg(&out);
        launch.arg(&batch).arg(&seq).arg(&heads).arg(&head_dim);
        launch
            .arg(&batch_stride)
            .arg(&row_stride)
            .arg(&offset)
            .arg(&self.eps)
            .arg(&rotate_half);
        unsafe { launch.launch(warp_per_item(b * s * self.heads)) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

/// FLUX.2's case (head dim 128, interleaved pairs) in 16-byte accesses, from one projection or
/// from two streams' joined (`qk_norm_rope_interleaved128_bf16` in elementwise.cu).
#[cfg(feature = "cuda")]
mod interleaved128 {
    use candle_core::{CudaStorage, Layout, Result, bail, cuda::WrapErr};

    /// One stream's projection columns (B, S, H·128) and its norm weight.
    pub struct Source<'a> {
        pub src: (&'a CudaStorage, &'a Layout),
        pub weight: (&'a CudaStorage, &'a Layout),
    }

    /// Heads a warp takes (`QK_HEADS_PER_WARP` in elementwise.cu).
    const HEADS_PER_WARP: usize = 8;

    /// (B, H, ΣS, 128): the sources' tokens in order, token `s` of the joint sequence taking
    /// RoPE row `rope_offset + s`.
    pub fn launch(
        sources: &[Source<'_>],
        cos: (&CudaStorage, &Layout),
        sin: (&CudaStorage, &Layout),
        heads: usize,
        rope_offset: usize,
        eps: f32,
    ) -> Result<CudaStorage> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use half::bf16;

        use crate::cuda::{ELEMENTWISE, view, warp_per_item};

        let (a, b) = match sources {
            [a] => (a, a),
            [a, b] => (a, b),
            _ => bail!("qk_norm_rope: one or two sources, not {}", sources.len()),
        };
        let (batch, seq_a, _) = a.src.1.shape().dims3()?;
        let seq: usize = sources.iter().map(|s| s.src.1.dims()[1]).sum();
        let dev = a.src.0.device().clone();
        let func = dev.get_or_load_custom_func(
            "qk_norm_rope_interleaved128_bf16",
            ELEMENTWISE.name,
            ELEMENTWISE.ptx,
        )?;
        let out = unsafe { dev.alloc::<bf16>(batch * heads * seq * 128)? };
        let (src_a, w_a) = (
            view::<bf16>(a.src.0, a.src.1)?,
            view::<bf16>(a.weight.0, a.weight.1)?,
        );
        let (src_b, w_b) = (
            view::<bf16>(b.src.0, b.src.1)?,
            view::<bf16>(b.weight.0, b.weight.1)?,
        );
        let (cos, sin) = (view::<f32>(cos.0, cos.1)?, view::<f32>(sin.0, sin.1)?);
        let [batch_arg, seq_a_arg, seq_arg, heads_arg, offset] =
            [batch, seq_a, seq, heads, rope_offset].map(|v| v as i32);
        let strides = |l: &Layout| [l.stride()[0] as i64, l.stride()[1] as i64];
        let ([a_bs, a_rs], [b_bs, b_rs]) = (strides(a.src.1), strides(b.src.1));
        let mut launch = func.builder();
        launch.arg(&src_a).arg(&w_a).arg(&src_b).arg(&w_b);
        launch.arg(&cos).arg(&sin).arg(&out);
        launch
            .arg(&batch_arg)
            .arg(&seq_a_arg)
            .arg(&seq_arg)
            .arg(&heads_arg);
        launch.arg(&a_bs).arg(&a_rs).arg(&b_bs).arg(&b_rs);
        launch.arg(&offset).arg(&eps);
        let warps = batch * seq * heads.div_ceil(HEADS_PER_WARP);
        unsafe { launch.launch(warp_per_item(warps)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
