//! GroupNorm with an affine weight and bias, optionally followed by SiLU: the VAE's norm. The
//! CUDA path is partial sums over each group's share of blocks, per-group statistics in f64, the
//! per-(batch, channel) affine, then one pass applying it ([`crate::ChannelAffine`]'s kernel);
//! no temporaries beyond 16 bytes per block and 8 per plane. [`GroupNormAffine`] stops before
//! the last pass and returns the affine, for a convolution that applies it on its way in
//! ([`crate::Prologue`]).

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

/// x (B, C, H, W) contiguous f32 or bf16, weight and bias (C) f32 → (2, B, C) f32: `[scale,
/// shift]` with `scale = rstd · w`, `shift = b − mean · scale`, the affine [`GroupNorm`] applies
/// (bit for bit on CUDA: the same kernels and expressions).
#[derive(Debug, Clone, Copy)]
pub struct GroupNormAffine {
    pub groups: usize,
    pub eps: f32,
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

/// [`GroupNormAffine`] on a CUDA f32 / bf16 tensor, [`reference::group_norm_affine`] otherwise:
/// (scale, shift), each (B, C) f32.
pub fn group_norm_affine(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    if !group_norm_fused(x) {
        return reference::group_norm_affine(x, weight, bias, groups, eps);
    }
    let op = GroupNormAffine {
        groups,
        eps: eps as f32,
    };
    let both = x.contiguous()?.apply_op3_no_bwd(weight, bias, &op)?;
    Ok((both.get(0)?, both.get(1)?))
}

/// (B, C, H·W) of a group norm's operands, after checking their layouts.
fn dims(groups: usize, x: &Layout, w: &Layout, b: &Layout) -> Result<(usize, usize, usize)> {
    let (batch, c, h, wd) = x.shape().dims4()?;
    if !x.is_contiguous() || c % groups != 0 {
        bail!(
            "group_norm: x {:?} must be contiguous with channels divisible by {groups} groups",
            x.shape()
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

/// The CPU forwards' statistics: per (batch, channel) plane of x (hw values each, `groups`
/// groups of channels), its affine (scale, shift) from the group's mean and variance in f64.
fn cpu_affine(
    x: &[f32],
    (weight, bias): (&[f32], &[f32]),
    (c, hw, groups): (usize, usize, usize),
    eps: f32,
) -> Vec<(f32, f32)> {
    let cpg = c / groups;
    let mut out = Vec::with_capacity(x.len() / hw.max(1));
    for (i, group) in x.chunks_exact(cpg * hw).enumerate() {
        let n = group.len() as f64;
        let mean = group.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = group
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        let rstd = (1.0 / (var + f64::from(eps)).sqrt()) as f32;
        let mean = mean as f32;
        for j in 0..cpg {
            let ch = (i % groups) * cpg + j;
            let scale = rstd * weight[ch];
            out.push((scale, bias[ch] - mean * scale));
        }
    }
    out
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
        let (_, c, hw) = dims(self.groups, xl, wl, bl)?;
        let round = cpu::rounder(cpu::dtype(xs));
        let (x, weight, bias) = (cpu::read(xs, xl)?, cpu::read(ws, wl)?, cpu::read(bs, bl)?);
        let affine = cpu_affine(&x, (&weight, &bias), (c, hw, self.groups), self.eps);
        let out = x
            .chunks_exact(hw)
            .zip(affine)
            .flat_map(|(plane, (scale, shift))| {
                plane
                    .iter()
                    .map(move |&v| cpu::affine_silu(v, scale, shift, self.silu, round))
            })
            .collect();
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
        let (b, c, hw) = dims(self.groups, xl, wl, bl)?;
        let norm = (self.groups, self.eps);
        let affine = cuda::affine(xs, xl, (ws, wl), (bs, bl), (b, c, hw), norm)?;
        let planes = b * c;
        let (scale, shift) = (affine.slice(..planes), affine.slice(planes..));
        let out =
            crate::group_stats::cuda::channel_affine(xs, xl, (&scale, &shift), hw, self.silu)?;
        Ok((out, xl.shape().clone()))
    }
}

impl CustomOp3 for GroupNormAffine {
    fn name(&self) -> &'static str {
        "klein-group-norm-affine"
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
        let (b, c, hw) = dims(self.groups, xl, wl, bl)?;
        let (x, weight, bias) = (cpu::read(xs, xl)?, cpu::read(ws, wl)?, cpu::read(bs, bl)?);
        let (scale, shift): (Vec<f32>, Vec<f32>) =
            cpu_affine(&x, (&weight, &bias), (c, hw, self.groups), self.eps)
                .into_iter()
                .unzip();
        Ok((
            CpuStorage::F32([scale, shift].concat()),
            Shape::from((2, b, c)),
        ))
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
        let (b, c, hw) = dims(self.groups, xl, wl, bl)?;
        let norm = (self.groups, self.eps);
        let out = cuda::affine(xs, xl, (ws, wl), (bs, bl), (b, c, hw), norm)?;
        let dev = candle_core::backend::BackendStorage::device(xs).clone();
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((2, b, c)),
        ))
    }
}

/// The passes both ops share: the statistics and the per-plane affine.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda::WrapErr;
    use candle_core::cuda::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, DType, Layout, Result, backend::BackendStorage, bail};
    use half::bf16;

    use crate::cuda::{ELEMENTWISE, view};

    /// `[scale | shift]` of each (batch, channel) plane of x (B, C, hw), f32, for `groups` groups
    /// and `eps`: the statistics, then `scale = rstd · w`, `shift = b − mean · scale`.
    pub fn affine(
        xs: &CudaStorage,
        xl: &Layout,
        (ws, wl): (&CudaStorage, &Layout),
        (bs, bl): (&CudaStorage, &Layout),
        (b, c, hw): (usize, usize, usize),
        (groups, eps): (usize, f32),
    ) -> Result<CudaSlice<f32>> {
        let dev = xs.device();
        let stats = stats(xs, xl, b * groups, c / groups * hw, eps)?;
        let (weight, bias) = (view::<f32>(ws, wl)?, view::<f32>(bs, bl)?);
        let planes = b * c;
        let out = dev.alloc_zeros::<f32>(2 * planes)?;
        let (planes_arg, channels, cpg) = (planes as i32, c as i32, (c / groups) as i32);
        let f = dev.get_or_load_custom_func(
            "group_norm_scale_shift",
            ELEMENTWISE.name,
            ELEMENTWISE.ptx,
        )?;
        let mut l = f.builder();
        l.arg(&stats).arg(&weight).arg(&bias).arg(&out);
        l.arg(&planes_arg).arg(&channels).arg(&cpg);
        let cfg = LaunchConfig {
            grid_dim: (planes.div_ceil(128) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { l.launch(cfg) }.w()?;
        Ok(out)
    }

    /// Blocks sharing one group's statistics pass.
    const SPLITS: usize = 64;

    /// Mean and 1/√(var + eps) of each of the `groups_total` groups of `n` contiguous elements
    /// of x: [bg][2] f32 (partial sums per block, then per group in f64).
    fn stats(
        xs: &CudaStorage,
        xl: &Layout,
        groups_total: usize,
        n: usize,
        eps: f32,
    ) -> Result<CudaSlice<f32>> {
        let dev = xs.device();
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
        let partial = dev.alloc_zeros::<f32>(groups_total * SPLITS * 2)?;
        let stats = dev.alloc_zeros::<f32>(groups_total * 2)?;
        let (groups_arg, splits, n) = (groups_total as i32, SPLITS as i32, n as i64);
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
                let f = func("partials")?;
                let mut l = f.builder();
                l.arg(&x).arg(&partial).arg(&n);
                unsafe { l.launch(partials_cfg) }.w()?;
                let f = func("stats")?;
                let mut l = f.builder();
                l.arg(&x).arg(&partial).arg(&stats).arg(&groups_arg);
                l.arg(&splits).arg(&n).arg(&eps);
                unsafe { l.launch(stats_cfg) }.w()?;
            }};
        }
        match xs.dtype() {
            DType::F32 => launch!(f32),
            _ => launch!(bf16),
        }
        Ok(stats)
    }
}
