//! GroupNorm with an affine weight and bias, optionally followed by SiLU: the VAE's norm. The
//! CUDA path is three kernels (partial sums over each group's share of blocks, per-group
//! statistics in f64, one pass applying the affine) and no temporaries beyond 16 bytes per
//! block.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

/// x (B, C, H, W) contiguous f32 or bf16, weight and bias (C) f32 → (B, C, H, W) in x's dtype.
/// `y = x · (rstd · w) + (b − mean · rstd · w)` in f32, rounded once; with `silu`,
/// `silu(y)` from the rounded `y`, rounded again (torch's order).
#[derive(Debug, Clone, Copy)]
pub struct GroupNorm {
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
}

/// Whether [`group_norm`] runs the CUDA kernels for `x`.
pub fn group_norm_fused(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// [`GroupNorm`] on a CUDA f32 / bf16 tensor, [`reference::group_norm`] otherwise.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if group_norm_fused(x) {
        let op = GroupNorm {
            groups,
            eps: eps as f32,
            silu,
        };
        x.contiguous()?.apply_op3_no_bwd(weight, bias, &op)
    } else {
        reference::group_norm(x, weight, bias, groups, eps, silu)
    }
}

impl GroupNorm {
    /// (B, C, H·W), after checking the layouts.
    fn dims(&self, x: &Layout, w: &Layout, b: &Layout) -> Result<(usize, usize, usize)> {
        let (batch, c, h, wd) = x.shape().dims4()?;
        if !x.is_contiguous() || c % self.groups != 0 {
            bail!(
                "group_norm: x {:?} must be contiguous with channels divisible by {} groups",
                x.shape(),
                self.groups
            );
        }
        for l in [w, b] {
            if l.shape().dims1()? != c || !l.is_contiguous() {
                bail!(
                    "group_norm: affine {:?} does not fit {c} channels",
                    l.shape()
                );
            }
        }
        Ok((batch, c, h * wd))
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "klein-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, hw) = self.dims(xl, wl, bl)?;
        let round = cpu::rounder(cpu::dtype(xs));
        let (x, weight, bias) = (cpu::read(xs, xl)?, cpu::read(ws, wl)?, cpu::read(bs, bl)?);
        let cpg = c / self.groups;
        let mut out = Vec::with_capacity(x.len());
        for (i, group) in x.chunks_exact(cpg * hw).enumerate() {
            let n = group.len() as f64;
            let mean = group.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = group
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            let rstd = (1.0 / (var + f64::from(self.eps)).sqrt()) as f32;
            let mean = mean as f32;
            for (j, channel) in group.chunks_exact(hw).enumerate() {
                let ch = (i % self.groups) * cpg + j;
                let scale = rstd * weight[ch];
                let shift = bias[ch] - mean * scale;
                out.extend(
                    channel
                        .iter()
                        .map(|&v| cpu::affine_silu(v, scale, shift, self.silu, round)),
                );
            }
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
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::WrapErr;
        use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
        use half::bf16;

        use crate::cuda::{ELEMENTWISE, plane_grid, view};

        /// Blocks sharing one group's statistics pass.
        const SPLITS: usize = 64;
        let (b, c, hw) = self.dims(xl, wl, bl)?;
        let dev = xs.device().clone();
        let name = match xs.dtype() {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            other => bail!("group_norm: no kernel for {other:?}"),
        };
        let func = |stage: &str| {
            dev.get_or_load_custom_func(
                &format!("group_norm_{stage}_{name}"),
                ELEMENTWISE.name,
                ELEMENTWISE.ptx,
            )
        };
        let groups_total = b * self.groups;
        let n = (c / self.groups * hw) as i64;
        let total = b * c * hw;
        let partial = dev.alloc_zeros::<f32>(groups_total * SPLITS * 2)?;
        let stats = dev.alloc_zeros::<f32>(groups_total * 2)?;
        let (weight, bias) = (view::<f32>(ws, wl)?, view::<f32>(bs, bl)?);
        let (groups_arg, splits, eps) = (groups_total as i32, SPLITS as i32, self.eps);
        let (channels, cpg, hw_arg) = (c as i32, (c / self.groups) as i32, hw as i64);
        let silu = i32::from(self.silu);
        let partials_cfg = LaunchConfig {
            grid_dim: (groups_total as u32, SPLITS as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let stats_cfg = LaunchConfig {
            grid_dim: (groups_total.div_ceil(128) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! launch {
            ($t:ty) => {{
                let x = view::<$t>(xs, xl)?;
                let out = unsafe { dev.alloc::<$t>(total)? };
                let f = func("partials")?;
                let mut l = f.builder();
                l.arg(&x).arg(&partial).arg(&n);
                unsafe { l.launch(partials_cfg) }.w()?;
                let f = func("stats")?;
                let mut l = f.builder();
                l.arg(&x)
                    .arg(&partial)
                    .arg(&stats)
                    .arg(&groups_arg)
                    .arg(&splits);
                l.arg(&n).arg(&eps);
                unsafe { l.launch(stats_cfg) }.w()?;
                let f = func("apply")?;
                let mut l = f.builder();
                l.arg(&x).arg(&stats).arg(&weight).arg(&bias).arg(&out);
                l.arg(&channels).arg(&cpg).arg(&hw_arg).arg(&silu);
                unsafe { l.launch(plane_grid(b * c, hw)) }.w()?;
                candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match xs.dtype() {
            DType::F32 => launch!(f32),
            _ => launch!(bf16),
        };
        Ok((out, xl.shape().clone()))
    }
}
