//! Helpers of the `cpu_fwd` references: read any-layout storage as f32, round like the dtype.

use candle_core::{CpuStorage, DType, Layout, Result, backend::BackendStorage, bail};
use half::bf16;

/// Storage offsets of the elements of `l` in logical (row-major) order.
fn offsets(l: &Layout) -> Vec<usize> {
    let mut out = vec![l.start_offset()];
    for (&dim, &stride) in l.dims().iter().zip(l.stride()) {
        out = out
            .iter()
            .flat_map(|&base| (0..dim).map(move |i| base + i * stride))
            .collect();
    }
    out
}

/// The elements of `s` in the logical order of `l`, as f32.
pub fn read(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let offsets = offsets(l);
    Ok(match s {
        CpuStorage::F32(v) => offsets.iter().map(|&i| v[i]).collect(),
        CpuStorage::BF16(v) => offsets.iter().map(|&i| v[i].to_f32()).collect(),
        other => bail!("klein-kernels: unsupported dtype {:?}", other.dtype()),
    })
}

/// Stores `values` (logical order of `l`) into `s` at the positions of `l`, rounded to its dtype.
pub fn write_into(s: &mut CpuStorage, l: &Layout, values: &[f32]) -> Result<()> {
    let offsets = offsets(l);
    match s {
        CpuStorage::F32(v) => offsets.iter().zip(values).for_each(|(&i, &x)| v[i] = x),
        CpuStorage::BF16(v) => offsets
            .iter()
            .zip(values)
            .for_each(|(&i, &x)| v[i] = bf16::from_f32(x)),
        other => bail!("klein-kernels: unsupported dtype {:?}", other.dtype()),
    }
    Ok(())
}

/// The dtype of a CPU storage.
pub fn dtype(s: &CpuStorage) -> DType {
    s.dtype()
}

/// Rounds an f32 to the precision of `dtype` (bf16 or f32), as a kernel storing it would.
pub fn rounder(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::BF16 => |v| bf16::from_f32(v).to_f32(),
        _ => |v| v,
    }
}

/// `values` stored as `dtype` (bf16 or f32).
pub fn write(values: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        other => bail!("klein-kernels: unsupported dtype {other:?}"),
    })
}

/// A norm's output `v · scale + shift`, rounded by `round`; with `silu`, SiLU of the rounded
/// value, rounded again (torch's order).
pub fn affine_silu(v: f32, scale: f32, shift: f32, silu: bool, round: fn(f32) -> f32) -> f32 {
    let y = round(v * scale + shift);
    if silu {
        round(y / (1.0 + (-y).exp()))
    } else {
        y
    }
}
