//! A weight plus its low-rank updates on the host, blocks of rows in parallel: neither the f32
//! update matrix nor the weight in f32 is ever made whole (candle's composition,
//! `w.to_dtype(F32) + B.matmul(A)` then back, made both, with one-thread elementwise passes).

use candle_core::{CpuStorage, Device, Result, Storage, Tensor, bail};
use half::{bf16, f16, vec::HalfBitsVecExt};
use rayon::prelude::*;

/// One update: `up` (rows, rank) with the scale folded in, `down` (rank, cols); f32 on the host.
pub(super) struct Product {
    pub up: Tensor,
    pub down: Tensor,
}

/// Rows of the weight one task merges: their f32 update (`rows · cols · 4` bytes, 4 MiB for a
/// klein-9B projection) comes from one product and stays in cache for the add.
const BLOCK_ROWS: usize = 256;

/// `w + Σ up @ down`, summed in f32 and rounded once to `w`'s dtype (f32, bf16 or f16).
pub(super) fn add_products(w: &Tensor, products: &[Product]) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if products.is_empty() {
        return Ok(w.clone());
    }
    for p in products {
        let rank = p.up.dim(1)?;
        if p.up.dims2()? != (rows, rank) || p.down.dims2()? != (rank, cols) {
            bail!(
                "merge: {:?} and {:?} do not update a ({rows}, {cols}) weight",
                p.up.shape(),
                p.down.shape()
            )
        }
    }
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let range = layout.start_offset()..layout.start_offset() + rows * cols;
    let merge = Blocks { products, cols };
    let shape = (rows, cols);
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let out = merge.run(&v[range], 0f32, |w, d| w + d)?;
            Tensor::from_vec(out, shape, &Device::Cpu)
        }
        Storage::Cpu(CpuStorage::BF16(v)) => {
            let out = merge.run(&v[range], 0u16, |w: bf16, d| {
                bf16::from_f32(w.to_f32() + d).to_bits()
            })?;
            Tensor::from_vec(out.reinterpret_into::<bf16>(), shape, &Device::Cpu)
        }
        Storage::Cpu(CpuStorage::F16(v)) => {
            let out = merge.run(&v[range], 0u16, |w: f16, d| {
                f16::from_f32(w.to_f32() + d).to_bits()
            })?;
            Tensor::from_vec(out.reinterpret_into::<f16>(), shape, &Device::Cpu)
        }
        _ => bail!(
            "merge: a {:?} weight on the host (f32, bf16 or f16 only)",
            w.dtype()
        ),
    }
}

/// The updates of a weight with rows of `cols`, merged a block of rows at a time.
struct Blocks<'a> {
    products: &'a [Product],
    cols: usize,
}

impl Blocks<'_> {
    /// The f32 update of the `n` rows from `r0`: each block's own product on the thread that
    /// merges it (one product over the whole weight ran on one core: 12.9 s of klein-9B's
    /// rank-32 merge).
    fn update(&self, r0: usize, n: usize) -> Result<Tensor> {
        let mut sum = self.products[0]
            .up
            .narrow(0, r0, n)?
            .matmul(&self.products[0].down)?;
        for p in &self.products[1..] {
            sum = (sum + p.up.narrow(0, r0, n)?.matmul(&p.down)?)?;
        }
        Ok(sum)
    }

    /// `add(w, update)` for every element of `w`, blocks of rows in parallel, into a buffer of
    /// `zero`s (its pages are mapped by the threads that write them).
    fn run<W: Copy + Sync, O: Copy + Send + Sync>(
        &self,
        w: &[W],
        zero: O,
        add: impl Fn(W, f32) -> O + Sync,
    ) -> Result<Vec<O>> {
        let block = BLOCK_ROWS * self.cols;
        let mut out = vec![zero; w.len()];
        out.par_chunks_mut(block)
            .zip(w.par_chunks(block))
            .enumerate()
            .try_for_each(|(b, (out, w))| -> Result<()> {
                let delta = self.update(b * BLOCK_ROWS, out.len() / self.cols)?;
                let (ds, dl) = delta.storage_and_layout();
                let Storage::Cpu(CpuStorage::F32(d)) = &*ds else {
                    bail!("merge: the update is not f32 on the host")
                };
                let d = &d[dl.start_offset()..dl.start_offset() + out.len()];
                for ((o, w), d) in out.iter_mut().zip(w).zip(d) {
                    *o = add(*w, *d);
                }
                Ok(())
            })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;

    fn product(rows: usize, rank: usize, cols: usize, scale: f64) -> Result<Product> {
        Ok(Product {
            up: (Tensor::randn(0f32, 1.0, (rows, rank), &Device::Cpu)? * scale)?,
            down: Tensor::randn(0f32, 1.0, (rank, cols), &Device::Cpu)?,
        })
    }

    /// The candle composition: `w` in f32 plus each `up @ down`, rounded to `w`'s dtype.
    fn composed(w: &Tensor, products: &[Product]) -> Result<Tensor> {
        let mut sum = w.to_dtype(DType::F32)?;
        for p in products {
            sum = (sum + p.up.matmul(&p.down)?)?;
        }
        sum.to_dtype(w.dtype())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()
    }

    /// Two updates of different ranks on rows of 37 (no vector width), in each dtype: the
    /// composition's values up to f32 summation order (and, rounded, one step of the dtype).
    #[test]
    fn the_updates_are_the_products_added_in_f32() -> Result<()> {
        let base = Tensor::randn(0f32, 1.0, (9, 37), &Device::Cpu)?;
        let products = [product(9, 4, 37, 0.1)?, product(9, 2, 37, 0.05)?];
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let w = base.to_dtype(dtype)?;
            let got = add_products(&w, &products)?;
            assert_eq!((got.dtype(), got.dims()), (dtype, &[9usize, 37][..]));
            let err = max_diff(&got, &composed(&w, &products)?)?;
            assert!(err <= tol, "{dtype:?}: {err}");
        }
        // A weight viewed at an offset (a row range) is read from there.
        let rows = base.narrow(0, 2, 3)?;
        let p = [product(3, 4, 37, 0.1)?];
        assert!(max_diff(&add_products(&rows, &p)?, &composed(&rows, &p)?)? <= 1e-6);
        // Long enough for rayon to split ranges inside rows.
        let big = Tensor::randn(0f32, 1.0, (67, 1001), &Device::Cpu)?;
        let p = [product(67, 3, 1001, 0.1)?];
        assert!(max_diff(&add_products(&big, &p)?, &composed(&big, &p)?)? <= 1e-5);
        assert!(add_products(&base.to_dtype(DType::U8)?, &products).is_err());
        assert!(add_products(&base, &[product(8, 4, 37, 0.1)?]).is_err());
        Ok(())
    }
}
