//! A group norm in two halves, for a tiled decode whose norms take image-wide statistics: the
//! moments of each (batch, group) over the part of a tile it owns ([`GroupMoments`]), and the
//! normalisation with statistics from elsewhere as a per-channel affine ([`ChannelAffine`],
//! optionally followed by SiLU).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, bail};

use crate::{cpu, reference};

/// x (B, C, H, W) contiguous f32 or bf16 → (B·groups, 2) f64: Σx and Σx² of each (batch, group)
/// over rows `rows.0..rows.1` and columns `cols.0..cols.1` of its channels' planes.
#[derive(Debug, Clone, Copy)]
pub struct GroupMoments {
    pub groups: usize,
    pub rows: (usize, usize),
    pub cols: (usize, usize),
}

/// x (B, C, H, W) contiguous f32 or bf16, scale and shift (B, C) f32 → (B, C, H, W) in x's
/// dtype: `y = x · scale + shift` in f32, rounded once; with `silu`, `silu(y)` from the rounded
/// `y`, rounded again (torch's order, as [`crate::GroupNorm`]).
#[derive(Debug, Clone, Copy)]
pub struct ChannelAffine {
    pub silu: bool,
}

/// [`GroupMoments`] on a CUDA f32 / bf16 tensor, [`reference::group_moments`] otherwise.
pub fn group_moments(
    x: &Tensor,
    groups: usize,
    rows: (usize, usize),
    cols: (usize, usize),
) -> Result<Tensor> {
    if crate::group_norm_fused(x) {
        x.contiguous()?
            .apply_op1_no_bwd(&GroupMoments { groups, rows, cols })
    } else {
        reference::group_moments(x, groups, rows, cols)
    }
}

/// [`ChannelAffine`] on a CUDA f32 / bf16 tensor, [`reference::channel_affine`] otherwise.
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor, silu: bool) -> Result<Tensor> {
    if crate::group_norm_fused(x) {
        x.contiguous()?
            .apply_op3_no_bwd(scale, shift, &ChannelAffine { silu })
    } else {
        reference::channel_affine(x, scale, shift, silu)
    }
}

impl GroupMoments {
    /// (B, C, H, W), after checking the layout, the groups and the region.
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let (rows, cols) = (self.rows, self.cols);
        if !l.is_contiguous() || c % self.groups != 0 {
            bail!(
                "group_moments: x {:?} must be contiguous with channels divisible by {} groups",
                l.shape(),
                self.groups
            );
        }
        if rows.0 >= rows.1 || rows.1 > h || cols.0 >= cols.1 || cols.1 > w {
            bail!(
                "group_moments: rows {rows:?} and columns {cols:?} are not a region of {h} × {w}"
            );
        }
        Ok((b, c, h, w))
    }
}

impl CustomOp1 for GroupMoments {
    fn name(&self) -> &'static str {
        "klein-group-moments"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = self.dims(l)?;
        let x = cpu::read(s, l)?;
        let cpg = c / self.groups;
        let mut out = Vec::with_capacity(b * self.groups * 2);
        for group in x.chunks_exact(cpg * h * w) {
            let (mut sum, mut sq) = (0f64, 0f64);
            for plane in group.chunks_exact(h * w) {
                for row in plane.chunks_exact(w).take(self.rows.1).skip(self.rows.0) {
                    for &v in &row[self.cols.0..self.cols.1] {
                        sum += f64::from(v);
                        sq += f64::from(v) * f64::from(v);
                    }
                }
            }
            out.extend([sum, sq]);
        }
        Ok((CpuStorage::F64(out), Shape::from((b * self.groups, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::DType;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::WrapErr;
        use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
        use half::bf16;

        use crate::cuda::{ELEMENTWISE, view};

        /// Blocks sharing one group's region.
        const SPLITS: usize = 64;
        let (b, c, h, w) = self.dims(l)?;
        let dev = s.device().clone();
        let groups_total = b * self.groups;
        let partial = dev.alloc_zeros::<f32>(groups_total * SPLITS * 2)?;
        let out = dev.alloc_zeros::<f64>(groups_total * 2)?;
        let (cpg, h_arg, w_arg) = ((c / self.groups) as i32, h as i32, w as i32);
        let (r0, rows) = (self.rows.0 as i32, (self.rows.1 - self.rows.0) as i32);
        let (c0, cols) = (self.cols.0 as i32, (self.cols.1 - self.cols.0) as i32);
        let partials_cfg = LaunchConfig {
            grid_dim: (groups_total as u32, SPLITS as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! partials {
            ($t:ty, $name:literal) => {{
                let x = view::<$t>(s, l)?;
                let f = dev.get_or_load_custom_func($name, ELEMENTWISE.name, ELEMENTWISE.ptx)?;
                let mut launch = f.builder();
                launch
                    .arg(&x)
                    .arg(&partial)
                    .arg(&cpg)
                    .arg(&h_arg)
                    .arg(&w_arg);
                launch.arg(&r0).arg(&rows).arg(&c0).arg(&cols);
                unsafe { launch.launch(partials_cfg) }.w()?;
            }};
        }
        match s.dtype() {
            DType::F32 => partials!(f32, "group_region_partials_f32"),
            DType::BF16 => partials!(bf16, "group_region_partials_bf16"),
            other => bail!("group_moments: no kernel for {other:?}"),
        }
        let f =
            dev.get_or_load_custom_func("group_region_totals", ELEMENTWISE.name, ELEMENTWISE.ptx)?;
        let (groups_arg, splits) = (groups_total as i32, SPLITS as i32);
        let mut launch = f.builder();
        launch.arg(&partial).arg(&out).arg(&groups_arg).arg(&splits);
        let totals_cfg = LaunchConfig {
            grid_dim: (groups_total.div_ceil(128) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(totals_cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((groups_total, 2)),
        ))
    }
}

impl ChannelAffine {
    /// (B·C, H·W), after checking the layouts.
    fn dims(&self, x: &Layout, scale: &Layout, shift: &Layout) -> Result<(usize, usize)> {
        let (b, c, h, w) = x.shape().dims4()?;
        if !x.is_contiguous() {
            bail!("channel_affine: x {:?} must be contiguous", x.shape());
        }
        for l in [scale, shift] {
            if l.dims() != [b, c] || !l.is_contiguous() {
                bail!(
                    "channel_affine: scale / shift {:?} must be a contiguous ({b}, {c})",
                    l.shape()
                );
            }
        }
        Ok((b * c, h * w))
    }
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "klein-channel-affine"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        scs: &CpuStorage,
        scl: &Layout,
        shs: &CpuStorage,
        shl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, hw) = self.dims(xl, scl, shl)?;
        let round = cpu::rounder(cpu::dtype(xs));
        let (x, scale, shift) = (
            cpu::read(xs, xl)?,
            cpu::read(scs, scl)?,
            cpu::read(shs, shl)?,
        );
        let out = x
            .chunks_exact(hw)
            .zip(scale.iter().zip(&shift))
            .flat_map(|(plane, (&a, &b))| {
                plane
                    .iter()
                    .map(move |&v| cpu::affine_silu(v, a, b, self.silu, round))
            })
            .collect();
        Ok((cpu::write(out, cpu::dtype(xs))?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        scs: &candle_core::CudaStorage,
        scl: &Layout,
        shs: &candle_core::CudaStorage,
        shl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, hw) = self.dims(xl, scl, shl)?;
        let scale = crate::cuda::view::<f32>(scs, scl)?;
        let shift = crate::cuda::view::<f32>(shs, shl)?;
        let out = cuda::channel_affine(xs, xl, (&scale, &shift), hw, self.silu)?;
        Ok((out, xl.shape().clone()))
    }
}

/// The per-plane affine pass, shared with [`crate::GroupNorm`].
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::cuda::WrapErr;
    use candle_core::cuda::cudarc::driver::{CudaView, PushKernelArg};
    use candle_core::{CudaStorage, DType, Layout, Result, backend::BackendStorage, bail};
    use half::bf16;

    use crate::cuda::{ELEMENTWISE, plane_grid, view};

    /// x (planes of `hw` values) · scale + shift per plane, then SiLU where `silu`, in x's
    /// dtype ([`super::ChannelAffine`]).
    pub fn channel_affine(
        xs: &CudaStorage,
        xl: &Layout,
        (scale, shift): (&CudaView<'_, f32>, &CudaView<'_, f32>),
        hw: usize,
        silu: bool,
    ) -> Result<CudaStorage> {
        let dev = xs.device().clone();
        let total = xl.shape().elem_count();
        let planes = total.checked_div(hw).unwrap_or(0);
        let (hw_arg, silu) = (hw as i64, i32::from(silu));
        macro_rules! launch {
            ($t:ty, $name:literal) => {{
                let x = view::<$t>(xs, xl)?;
                let out = unsafe { dev.alloc::<$t>(total)? };
                let f = dev.get_or_load_custom_func($name, ELEMENTWISE.name, ELEMENTWISE.ptx)?;
                let mut launch = f.builder();
                launch.arg(&x).arg(scale).arg(shift).arg(&out);
                launch.arg(&hw_arg).arg(&silu);
                unsafe { launch.launch(plane_grid(planes, hw)) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match xs.dtype() {
            DType::F32 => launch!(f32, "channel_affine_f32"),
            DType::BF16 => launch!(bf16, "channel_affine_bf16"),
            other => bail!("channel_affine: no kernel for {other:?}"),
        })
    }
}
