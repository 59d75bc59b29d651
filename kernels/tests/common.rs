//! Random inputs, QK norm set-ups and error measures shared by the CPU reference and GPU parity
//! tests.

#![allow(dead_code)]

use candle_core::{D, DType, Device, Result, Tensor};
use klein_kernels::QNorm;

/// Standard-normal tensor of `shape` as `dtype` (drawn in f32).
pub fn randn(shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype)
}

/// A single block's fused projection `[q k v | gate | up]` of random values, viewed as the model
/// views it: q's raw columns, the heads as strided (B, H, S, hd) views read in place, the MLP's
/// two halves as column ranges.
pub struct SingleProjection {
    pub q_rows: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
}

/// (b, s, 3·h·hd + 2·f) as [`SingleProjection`]; 2·f a multiple of hd (the heads are a reshape
/// of the whole projection, so no copy is made).
pub fn single_projection(
    (b, s): (usize, usize),
    (h, hd, f): (usize, usize, usize),
    dtype: DType,
    dev: &Device,
) -> Result<SingleProjection> {
    let c = 3 * h * hd + 2 * f;
    assert_eq!(c % hd, 0, "2·f must be a multiple of hd");
    let p = randn(&[b, s, c], dtype, dev)?;
    let head = |i: usize| -> Result<Tensor> {
        p.reshape((b, s, c / hd, hd))?
            .narrow(2, i * h, h)?
            .transpose(1, 2)
    };
    Ok(SingleProjection {
        q_rows: p.narrow(D::Minus1, 0, h * hd)?,
        q: head(0)?,
        k: head(1)?,
        v: head(2)?,
        gate: p.narrow(D::Minus1, 3 * h * hd, f)?,
        up: p.narrow(D::Minus1, 3 * h * hd + f, f)?,
    })
}

/// ‖a − b‖ / ‖b‖ in f32.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let den = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(num / den)
}

/// Largest |a − b| over the elements, in units of b's largest magnitude.
pub fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?;
    Ok(diff / scale)
}

/// Modulation chunks as the model makes them: (B, 1, 3·D) split into shift, scale, gate, each a
/// strided view (B, 1, D).
pub fn modulation(b: usize, d: usize, dtype: DType, dev: &Device) -> Result<Vec<Tensor>> {
    (randn(&[b, 1, 3 * d], dtype, dev)? * 0.5)?.chunk(3, D::Minus1)
}

/// RoPE tables (rows, hd/2) of unit-circle pairs at random angles.
pub fn rope_tables(rows: usize, hd: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let angles = (Tensor::rand(0f32, 1.0, (rows, hd / 2), dev)? * std::f64::consts::TAU)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// A QK norm weight (hd) around 1, as `dtype`.
pub fn norm_weight(hd: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    (randn(&[hd], dtype, dev)? * 0.3)? + 1.0
}

/// The query side of the QK norm with `weight`, the RoPE tables from row `rope_offset` on and
/// eps 1e-6, as the attention takes it.
pub fn q_norm(weight: &Tensor, (cos, sin): (&Tensor, &Tensor), rope_offset: usize) -> QNorm {
    QNorm {
        weight: weight.clone(),
        cos: cos.clone(),
        sin: sin.clone(),
        rope_offset,
        eps: 1e-6,
    }
}

/// How many values of `a` and `b` (same shape, any float dtype) differ in their bits; NaNs of
/// any payload count as equal.
pub fn differing_bits(a: &Tensor, b: &Tensor) -> Result<usize> {
    let values = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
    let (a, b) = (values(a)?, values(b)?);
    Ok(a.iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()))
        .count())
}
