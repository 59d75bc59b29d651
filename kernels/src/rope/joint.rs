//! The double-stream blocks' q or k over the joint `[txt; img]` sequence: each stream's rows
//! from its own projection and norm weight, normed and rotated straight into one
//! (B, H, S_txt + S_img, hd) buffer, so attention needs no concatenation of the two.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use super::{QkNormRope, RopeStyle, qk_norm_rope, vectorizable};

/// src = the text rows (B, S_txt, H·hd), cos and sin (S_txt + S_img, hd/2) f32 →
/// (B, H, S_txt + S_img, hd); the image rows come from `img` (B, S_img, H·hd). Text token `s`
/// takes RoPE row `s`, image token `s` row `S_txt + s`. Interleaved pairs (FLUX.2).
#[derive(Debug, Clone)]
pub struct JointQkNormRope {
    /// The text stream's RMSNorm weight (hd).
    pub txt_weight: Tensor,
    /// The image stream's projection columns, unit last stride.
    pub img: Tensor,
    /// The image stream's RMSNorm weight (hd).
    pub img_weight: Tensor,
    pub heads: usize,
    pub eps: f32,
}

/// [`JointQkNormRope`] where the head-dim-128 kernel takes both streams in place (CUDA bf16,
/// 16-byte aligned rows), otherwise the two streams' [`qk_norm_rope`] concatenated.
pub fn qk_norm_rope_joint(
    (txt, txt_weight): (&Tensor, &Tensor),
    (img, img_weight): (&Tensor, &Tensor),
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    eps: f64,
) -> Result<Tensor> {
    let fused = crate::fused(txt)
        && crate::fused(img)
        && vectorizable(
            txt_weight.dim(0)?,
            &[
                (txt.layout(), txt_weight.layout()),
                (img.layout(), img_weight.layout()),
            ],
            cos.layout(),
            sin.layout(),
        );
    if fused {
        let op = JointQkNormRope {
            txt_weight: txt_weight.clone(),
            img: img.clone(),
            img_weight: img_weight.clone(),
            heads,
            eps: eps as f32,
        };
        txt.apply_op3_no_bwd(cos, sin, &op)
    } else {
        let style = RopeStyle::Interleaved;
        let t = qk_norm_rope(txt, txt_weight, cos, sin, heads, 0, eps, style)?;
        let i = qk_norm_rope(img, img_weight, cos, sin, heads, txt.dim(1)?, eps, style)?;
        Tensor::cat(&[t, i], 2)
    }
}

impl JointQkNormRope {
    /// One stream's part as its own op.
    fn part(&self, weight: &Tensor, rope_offset: usize) -> QkNormRope {
        QkNormRope {
            weight: weight.clone(),
            heads: self.heads,
            rope_offset,
            eps: self.eps,
            style: RopeStyle::Interleaved,
        }
    }
}

impl CustomOp3 for JointQkNormRope {
    fn name(&self) -> &'static str {
        "klein-joint-qk-norm-rope"
    }

    /// The two streams' [`QkNormRope`] references, concatenated.
    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ns: &CpuStorage,
        nl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dtype = crate::cpu::dtype(ss);
        let tensor = |s: &CpuStorage, l: &Layout, dtype: DType| {
            Tensor::from_vec(crate::cpu::read(s, l)?, l.dims(), &Device::Cpu)?.to_dtype(dtype)
        };
        let (txt, cos, sin) = (
            tensor(ss, sl, dtype)?,
            tensor(cs, cl, DType::F32)?,
            tensor(ns, nl, DType::F32)?,
        );
        let t = txt.apply_op3_no_bwd(&cos, &sin, &self.part(&self.txt_weight, 0))?;
        let i = self.img.to_device(&Device::Cpu)?.apply_op3_no_bwd(
            &cos,
            &sin,
            &self.part(&self.img_weight, txt.dim(1)?),
        )?;
        let out = Tensor::cat(&[t, i], 2)?;
        let values = out.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok((crate::cpu::write(values, dtype)?, out.shape().clone()))
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
        use candle_core::bail;

        use super::interleaved128::{Source, launch};

        let (b, s_txt, hd) = self.part(&self.txt_weight, 0).dims(sl, cl, nl)?;
        let (img, il) = self.img.storage_and_layout();
        let (ib, s_img, iw) = il.shape().dims3()?;
        if ib != b || iw != self.heads * hd || il.stride()[2] != 1 || cl.dims()[0] < s_txt + s_img {
            bail!(
                "joint_qk_norm_rope: img {:?} (strides {:?}) does not join txt {:?}",
                il.shape(),
                il.stride(),
                sl.shape()
            );
        }
        let candle_core::Storage::Cuda(img) = &*img else {
            bail!("joint_qk_norm_rope: the image rows are not on the GPU");
        };
        let (tw, twl) = self.txt_weight.storage_and_layout();
        let (iw, iwl) = self.img_weight.storage_and_layout();
        let (candle_core::Storage::Cuda(tw), candle_core::Storage::Cuda(iw)) = (&*tw, &*iw) else {
            bail!("joint_qk_norm_rope: a norm weight is not on the GPU");
        };
        if !vectorizable(hd, &[(sl, twl), (il, iwl)], cl, nl) {
            bail!("joint_qk_norm_rope: operands not 16-byte aligned or head dim {hd} != 128");
        }
        let sources = [
            Source {
                src: (ss, sl),
                weight: (tw, twl),
            },
            Source {
                src: (img, il),
                weight: (iw, iwl),
            },
        ];
        let out = launch(&sources, (cs, cl), (ns, nl), self.heads, 0, self.eps)?;
        Ok((out, Shape::from((b, self.heads, s_txt + s_img, hd))))
    }
}
