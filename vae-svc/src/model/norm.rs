//! GroupNorm (affine, eps 1e-6), optionally fused with SiLU, computed in f32 and applied a
//! few groups at a time into a preallocated output so that its temporaries stay within
//! [`Chunking::op_bytes`](super::Chunking).
//!
//! For tiled decoding the statistics can come from elsewhere ([`NormStats`]). On a CUDA device
//! the kernels of `klein_kernels` run instead, with no temporaries: `group_norm` with the
//! input's own statistics, and in a tiled decode `group_moments` (what a tile records) and
//! `channel_affine` (normalising with the statistics it is given).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use klein_kernels::Prologue;

use super::{
    Config,
    layers::Conv2d,
    norm_stats::{CallStats, NormStats},
};

/// Bytes per element of the f32 temporaries of a group-norm chunk, times the most of them
/// alive at once (the f32 input copy, the centred or scaled value, its square or the shifted
/// value, and the SiLU output).
const TEMP_BYTES_PER_ELEMENT: u64 = 4 * 4;

/// How many groups one chunk covers so that its temporaries stay within `op_bytes` (at least
/// one group).
pub fn groups_per_chunk(elements_per_group: u64, groups: usize, op_bytes: u64) -> usize {
    let per_group = elements_per_group.max(1) * TEMP_BYTES_PER_ELEMENT;
    ((op_bytes / per_group) as usize).clamp(1, groups)
}

/// Bytes of the temporaries of one chunk.
pub fn temp_bytes(elements_per_group: u64, groups: usize, op_bytes: u64) -> u64 {
    let n = groups_per_chunk(elements_per_group, groups, op_bytes) as u64;
    n * elements_per_group * TEMP_BYTES_PER_ELEMENT
}

/// `residual + conv(silu(norm(x)))`, the statistics from `stats`. Where the convolution takes
/// the norm as its prologue (cuDNN, TF32 arithmetic) the normalised tensor never exists;
/// otherwise the norm runs first and `x` is dropped as soon as its output exists (a caller that
/// still needs `x` passes a clone: the tensor stays alive through it). Holding `x` through the
/// convolution kept one more activation alive than the memory plan counts: the 16 GB plan's
/// tiled 1024² decodes ran out of memory.
pub fn silu_conv(
    norm: &GroupNorm,
    conv: &Conv2d,
    x: Tensor,
    stats: &mut NormStats,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if conv.bands_in_place(&x) {
        let prologue = norm.silu_prologue(&x, stats)?;
        return conv.forward_prologue(&x, &prologue, residual);
    }
    let h = norm.forward_silu(&x, stats)?;
    drop(x);
    conv.forward_add(&h, residual)
}

/// GroupNorm with an affine weight and bias (`norm1`, `norm2`, `group_norm`, `conv_norm_out`).
///
/// Statistics and the affine are computed in f32 as torch does for every dtype:
/// `y = x * (rstd * weight) + (bias - mean * rstd * weight)`, rounded once to the input dtype.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
    op_bytes: u64,
}

impl GroupNorm {
    pub fn new(cfg: &Config, channels: usize, eps: f64, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(channels, "bias")?.to_dtype(DType::F32)?,
            num_groups: cfg.norm_num_groups,
            eps,
            op_bytes: cfg.chunking.op_bytes,
        })
    }

    /// (B, C, H, W) -> (B, C, H, W)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false, &mut NormStats::Local)
    }

    /// `silu(group_norm(x))`, rounding between the two as torch does in bf16, with the
    /// statistics from `stats`. (B, C, H, W) -> (B, C, H, W)
    pub fn forward_silu(&self, x: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        self.apply(x, true, stats)
    }

    /// This call's statistics for x (B, C, H, W), after checking that its channels split into
    /// the groups.
    fn begin_call<'s>(&self, x: &Tensor, stats: &'s mut NormStats) -> Result<CallStats<'s>> {
        let groups = self.num_groups;
        let (_, c, h, w) = x.dims4()?;
        if c % groups != 0 {
            candle_core::bail!("group norm: {c} channels are not divisible by {groups} groups");
        }
        stats.begin_call((h, w), c / groups, self.eps)
    }

    fn apply(&self, x: &Tensor, silu: bool, stats: &mut NormStats) -> Result<Tensor> {
        let mut call = self.begin_call(x, stats)?;
        if klein_kernels::group_norm_fused(x) {
            return self.apply_fused(x, silu, call);
        }
        let groups = self.num_groups;
        let (b, c, h, w) = x.dims4()?;
        let cpg = c / groups;
        let op_bytes = super::config::op_bytes_in_force(self.op_bytes);
        let step = groups_per_chunk((b * cpg * h * w) as u64, groups, op_bytes);
        if step == groups {
            return self.chunk(x, 0, groups, silu, &mut call);
        }
        let out = Tensor::zeros((b, c, h, w), x.dtype(), x.device())?;
        for g0 in (0..groups).step_by(step) {
            let n = step.min(groups - g0);
            let part = x.narrow(1, g0 * cpg, n * cpg)?;
            let y = self.chunk(&part, g0, n, silu, &mut call)?;
            out.slice_set(&y, 1, g0 * cpg)?;
        }
        Ok(out)
    }

    /// The CUDA kernels: the fused norm with the input's own statistics; in a tiled decode, the
    /// moments of the tile's own part (`klein_kernels::group_moments`) and the per-channel
    /// affine with the statistics the call is given (`klein_kernels::channel_affine`).
    fn apply_fused(&self, x: &Tensor, silu: bool, call: CallStats<'_>) -> Result<Tensor> {
        match self.record_and_replay(x, call)? {
            None => klein_kernels::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.num_groups,
                self.eps,
                silu,
            ),
            Some((scale, shift)) => klein_kernels::channel_affine(x, &scale, &shift, silu),
        }
    }

    /// `silu(group_norm(x))` as a convolution's prologue (its per-(batch, channel) affine, for
    /// `Conv2d::forward_prologue`), with the statistics from `stats`.
    pub fn silu_prologue(&self, x: &Tensor, stats: &mut NormStats) -> Result<Prologue> {
        let call = self.begin_call(x, stats)?;
        let (scale, shift) = match self.record_and_replay(x, call)? {
            Some(affine) => affine,
            None => klein_kernels::group_norm_affine(
                x,
                &self.weight,
                &self.bias,
                self.num_groups,
                self.eps,
            )?,
        };
        Ok(Prologue {
            affine: Some((scale, shift, true)),
        })
    }

    /// A tiled decode's statistics on the CUDA path: records the tile's moments where the call
    /// records, and returns the per-channel affine ((B, C) scale and shift) where it replays;
    /// `None` where the input's own statistics apply.
    fn record_and_replay(
        &self,
        x: &Tensor,
        mut call: CallStats<'_>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let groups = self.num_groups;
        if let Some(target) = call.record.as_mut() {
            target.add(&klein_kernels::group_moments(
                x,
                groups,
                target.rows,
                target.cols,
            )?)?;
        }
        let Some(stats) = call.replay else {
            return Ok(None);
        };
        let b = x.dim(0)?;
        let stat = |t: &Tensor| t.reshape((b, groups, 1, 1));
        self.scale_shift(&stat(&stats.mean)?, &stat(&stats.rstd)?, 0, groups)
            .map(Some)
    }

    /// Per (batch, channel) of groups `[g0, g0 + n)`: `scale = rstd · weight`, `shift = bias −
    /// mean · scale` in f32, from mean and rstd (B, n, 1, 1). → ((B, n · cpg), (B, n · cpg))
    fn scale_shift(
        &self,
        mean: &Tensor,
        rstd: &Tensor,
        g0: usize,
        n: usize,
    ) -> Result<(Tensor, Tensor)> {
        let b = mean.dim(0)?;
        let cpg = self.weight.dim(0)? / self.num_groups;
        let per_channel = |t: &Tensor| -> Result<Tensor> {
            t.reshape((b, n, 1))?
                .broadcast_as((b, n, cpg))?
                .reshape((b, n * cpg))
        };
        let weight = self.weight.narrow(0, g0 * cpg, n * cpg)?;
        let bias = self.bias.narrow(0, g0 * cpg, n * cpg)?;
        let scale = per_channel(rstd)?.broadcast_mul(&weight)?;
        let shift = bias.broadcast_sub(&(per_channel(mean)? * &scale)?)?;
        Ok((scale, shift))
    }

    /// Normalises channels `[g0 * cpg, (g0 + n) * cpg)` of the full tensor, given as `x`.
    fn chunk(
        &self,
        x: &Tensor,
        g0: usize,
        n: usize,
        silu: bool,
        call: &mut CallStats<'_>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let cpg = c / n;
        let groups = self.num_groups;
        let xf = x.to_dtype(DType::F32)?;
        if let Some(target) = call.record.as_mut() {
            let (rows, cols) = (target.rows, target.cols);
            let part = xf
                .narrow(2, rows.0, rows.1 - rows.0)?
                .narrow(3, cols.0, cols.1 - cols.0)?;
            // Per group of the chunk, Σ over f32 then added up in f64: (B, n, 1).
            let per_group = |t: Tensor| -> Result<Tensor> {
                t.sum_keepdim(3)?
                    .sum_keepdim(2)?
                    .reshape((b, n, cpg))?
                    .sum_keepdim(2)?
                    .to_dtype(DType::F64)
            };
            let sums = Tensor::cat(&[per_group(part.clone())?, per_group(part.sqr()?)?], 2)?
                .pad_with_zeros(1, g0, groups - g0 - n)?
                .reshape((b * groups, 2))?;
            target.add(&sums)?;
        }
        let (mean, rstd) = match &call.replay {
            Some(stats) => {
                let pick = |t: &Tensor| -> Result<Tensor> {
                    t.reshape((b, groups))?
                        .narrow(1, g0, n)?
                        .reshape((b, n, 1, 1))
                };
                (pick(&stats.mean)?, pick(&stats.rstd)?)
            }
            None => {
                let count = (cpg * h * w) as f64;
                // Two-level sums (over W, then over the rest) keep f32 accumulation error small.
                let grouped = xf.reshape((b, n, cpg * h, w))?;
                let mean = (grouped.sum_keepdim(3)?.sum_keepdim(2)? / count)?;
                let var = {
                    let centred = grouped.broadcast_sub(&mean)?;
                    (centred.sqr()?.sum_keepdim(3)?.sum_keepdim(2)? / count)?
                };
                (mean, (var + self.eps)?.sqrt()?.recip()?)
            }
        };
        let (scale, shift) = self.scale_shift(&mean, &rstd, g0, n)?;
        let scale = scale.reshape((b, c, 1, 1))?;
        let shift = shift.reshape((b, c, 1, 1))?;
        let mut y = xf.broadcast_mul(&scale)?;
        drop(xf);
        y = y.broadcast_add(&shift)?;
        if !silu {
            return y.to_dtype(x.dtype());
        }
        // torch rounds the norm output to the model dtype before the activation.
        y = y.to_dtype(x.dtype())?.to_dtype(DType::F32)?;
        y.silu()?.to_dtype(x.dtype())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::{Chunking, norm_stats::Region};

    fn norm(op_bytes: u64, w: &Tensor, b: &Tensor) -> GroupNorm {
        let cfg = Config {
            norm_num_groups: 4,
            chunking: Chunking {
                attention_bytes: 1 << 20,
                op_bytes,
                ..Chunking::default()
            },
            ..Config::default()
        };
        let map = [
            ("weight".to_owned(), w.clone()),
            ("bias".to_owned(), b.clone()),
        ]
        .into();
        GroupNorm::new(
            &cfg,
            8,
            1e-6,
            VarBuilder::from_tensors(map, DType::F32, &Device::Cpu),
        )
        .unwrap()
    }

    fn naive(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let (n, c, h, wd) = x.dims4().unwrap();
        let g = x.reshape((n, 4, (c / 4) * h * wd)).unwrap();
        let mean = g.mean_keepdim(2).unwrap();
        let centred = g.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(2).unwrap();
        let normed = centred
            .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
            .unwrap();
        normed
            .reshape((n, c, h, wd))
            .unwrap()
            .broadcast_mul(&w.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn inputs() -> (Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2., (2, 8, 6, 4), &dev).unwrap() + 3.0).unwrap();
        let w = Tensor::randn(1f32, 0.3, 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 8, &dev).unwrap();
        (x, w, b)
    }

    #[test]
    fn chunked_group_norm_equals_the_textbook_formula() {
        let (x, w, b) = inputs();
        let want = naive(&x, &w, &b);
        for op_bytes in [1 << 30, 1] {
            let norm = norm(op_bytes, &w, &b);
            assert!(
                max_diff(&norm.forward(&x).unwrap(), &want) < 1e-5,
                "op_bytes {op_bytes}"
            );
            let silu = norm.forward_silu(&x, &mut NormStats::Local).unwrap();
            assert!(
                max_diff(&silu, &want.silu().unwrap()) < 1e-5,
                "silu, op_bytes {op_bytes}"
            );
        }
    }

    /// The norm as a convolution's prologue (`silu_prologue`, its affine applied by
    /// `Prologue::apply` where the convolution does not fuse it) is the norm.
    #[test]
    fn the_norm_as_a_prologue_is_the_norm() {
        let (x, w, b) = inputs();
        let norm = norm(1 << 30, &w, &b);
        let prologue = norm.silu_prologue(&x, &mut NormStats::Local).unwrap();
        let want = norm.forward_silu(&x, &mut NormStats::Local).unwrap();
        assert!(max_diff(&prologue.apply(&x).unwrap(), &want) < 1e-5);
    }

    /// The chunked composition (two chunk sizes) and the CUDA path's halves (`apply_fused`,
    /// whose `klein_kernels` calls take their compositions on the CPU).
    #[test]
    fn recorded_moments_over_a_partition_replay_the_whole_tensor_statistics() {
        let (x, w, b) = inputs();
        let want = naive(&x, &w, &b).silu().unwrap();
        for (op_bytes, fused) in [(1 << 30, false), (1, false), (1 << 30, true)] {
            let norm = norm(op_bytes, &w, &b);
            let forward = |x: &Tensor, stats: &mut NormStats| {
                if !fused {
                    return norm.forward_silu(x, stats).unwrap();
                }
                let call = norm.begin_call(x, stats).unwrap();
                norm.apply_fused(x, true, call).unwrap()
            };
            // Two "tiles": the top 2 and the bottom 4 of 6 token rows (one token = one row here).
            let mut stats = NormStats::record();
            for (rows, tile) in [
                ((0, 2), x.narrow(2, 0, 2).unwrap()),
                ((2, 6), x.narrow(2, 2, 4).unwrap()),
            ] {
                let h = rows.1 - rows.0;
                stats.start_tile(Region {
                    tokens: (h, 4),
                    rows: (0, h),
                    cols: (0, 4),
                });
                forward(&tile, &mut stats);
            }
            let mut stats = stats.into_replay().unwrap();
            stats.start_tile(Region {
                tokens: (6, 4),
                rows: (0, 6),
                cols: (0, 4),
            });
            let got = forward(&x, &mut stats);
            assert!(
                max_diff(&got, &want) < 1e-4,
                "op_bytes {op_bytes}, fused {fused}"
            );
        }
    }
}
