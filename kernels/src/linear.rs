//! `x Wᵀ`, the transformer's linear layers without bias. On CUDA bf16 the product runs on
//! cuBLASLt with an algorithm chosen per shape: the heuristic's first choice, or, for a shape
//! first met inside [`tune_linear`], the fastest of its candidates at the card's power cap whose
//! output is bit-identical to the first choice's (`linear/cublaslt.rs`). Elsewhere it is
//! candle_nn's `Linear`.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp2, DType, Device, Layout, Module, Result, Shape, Tensor, bail,
    quantized::{GgmlDType, QTensor},
};
use candle_nn::VarBuilder;

use crate::{
    cpu,
    quant::{Quantize, StoredRows, quantize_mapped, quantize_rows, stack_rows},
};

#[cfg(feature = "cuda")]
mod cublaslt;
mod tuning;

pub use tuning::{MIN_GAIN, TUNED_FLOP, Tuned, TuningCache, tune_linear};

/// A linear layer without bias: `weight` (N, K), x (…, K) → (…, N). The weight is dense, or
/// block-quantized (ggml) and dequantized to x's dtype for each call
/// ([`crate::dequantize`]): weight-only quantization, so a quantized layer computes exactly
/// what the dense layer computes with the dequantized weight, activations unquantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
}

#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight: Weight::Dense(weight),
        }
    }

    /// A layer whose (N, K) weight stays in ggml blocks.
    pub fn quantized(weight: QTensor) -> Self {
        Self {
            weight: Weight::Quantized(Arc::new(weight)),
        }
    }

    /// The layer cut along its output rows into consecutive parts of `rows[i]` rows each
    /// (summing to N), each a dense layer over a view of the weight: a quantized layer's
    /// weight dequantized to `dtype` once for all the parts, as [`Module::forward`] would
    /// for the whole. Each part computes exactly its columns of the whole layer's product.
    pub fn split_rows(&self, dtype: DType, rows: &[usize]) -> Result<Vec<Linear>> {
        let weight = match &self.weight {
            Weight::Dense(w) => w.clone(),
            Weight::Quantized(q) => crate::dequantize(q, dtype)?,
        };
        let n = weight.dim(0)?;
        if rows.iter().sum::<usize>() != n {
            bail!("linear: parts of {rows:?} rows do not cut a weight of {n}");
        }
        let mut start = 0;
        rows.iter()
            .map(|&len| {
                let part = weight.narrow(0, start, len)?;
                start += len;
                Ok(Linear::new(part))
            })
            .collect()
    }
}

/// `linear_no_bias` of candle_nn, as a [`Linear`].
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder<'_>) -> Result<Linear> {
    Ok(Linear::new(vb.get((out_dim, in_dim), "weight")?))
}

/// Projection weights a checkpoint stores in ggml blocks (a GGUF file), looked up under the
/// names a [`VarBuilder`] would read them by.
pub trait BlockSource: Send + Sync {
    /// Tensor `name`'s rows in their stored blocks; `None` where it is stored dense (F32, F16,
    /// BF16) or not at all.
    fn blocks(&self, name: &str) -> Result<Option<StoredRows<'_>>>;

    /// (rows, width, type) of every projection tensor it stores in blocks, for accounting.
    fn stored(&self) -> Vec<(usize, usize, GgmlDType)>;
}

/// A shared [`BlockSource`]: what a model configuration carries to its projections.
#[derive(Clone)]
pub struct StoredBlocks(pub Arc<dyn BlockSource>);

impl std::fmt::Debug for StoredBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredBlocks")
    }
}

/// Two handles are equal when they share their source.
impl PartialEq for StoredBlocks {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The (`out_dim`, `in_dim`) weights named `weight` under each of `vbs`, stacked along the
/// output rows into one (`vbs.len()·out_dim`, `in_dim`) layer:
/// - where `stored` holds every part in blocks of one type: those blocks, stacked and moved
///   to the builders' device as they are ([`stack_rows`]);
/// - dense, with a `quantize` format whose block divides `in_dim` (or its block-32 fallback,
///   [`crate::quant::QuantFormat::for_width`]): on a CUDA device inside
///   [`crate::quant::with_mapped`], quantized there from the checkpoint's bytes
///   ([`crate::quant::quantize_mapped`]); otherwise read on the host, quantized there or on
///   the device in parts, and the blocks moved to the device. Either way the dense weights
///   never occupy device memory beyond one upload part;
/// - otherwise dense, in the builders' dtype on their device.
pub fn stacked_linear(
    vbs: &[VarBuilder<'_>],
    (out_dim, in_dim): (usize, usize),
    quantize: Quantize,
    stored: Option<&StoredBlocks>,
) -> Result<Linear> {
    let Some(first) = vbs.first() else {
        bail!("a projection of no weights")
    };
    if let Some(source) = stored {
        let parts = vbs
            .iter()
            .map(|vb| source.0.blocks(&format!("{}.weight", vb.prefix())))
            .collect::<Result<Vec<_>>>()?;
        if parts.iter().any(Option::is_some) {
            let parts = parts.into_iter().zip(vbs).map(|(part, vb)| match part {
                Some(q) if (q.rows.len(), q.width) == (out_dim, in_dim) => Ok(q),
                Some(q) => bail!(
                    "{}.weight: shape ({}, {}), expected ({out_dim}, {in_dim})",
                    vb.prefix(),
                    q.rows.len(),
                    q.width
                ),
                None => bail!(
                    "{}.weight is stored dense, the rest of its projection in blocks",
                    vb.prefix()
                ),
            });
            let parts = parts.collect::<Result<Vec<_>>>()?;
            return Ok(Linear::quantized(stack_rows(&parts, first.device())?));
        }
    }
    let stack = |vbs: Vec<VarBuilder<'_>>| -> Result<Tensor> {
        let parts = vbs
            .iter()
            .map(|vb| vb.get((out_dim, in_dim), "weight"))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    };
    let Some(format) = quantize.format().and_then(|f| f.for_width(in_dim)) else {
        return Ok(Linear::new(stack(vbs.to_vec())?));
    };
    let names: Vec<String> = vbs
        .iter()
        .map(|vb| format!("{}.weight", vb.prefix()))
        .collect();
    let shape = (out_dim, in_dim);
    if let Some(q) = quantize_mapped(&names, first.dtype(), shape, format.ggml(), first.device())? {
        return Ok(Linear::quantized(q));
    }
    // Read in the builders' dtype: `quantize_rows` converts to f32 in its threads.
    let host = stack(
        vbs.iter()
            .map(|vb| vb.clone().set_device(Device::Cpu))
            .collect(),
    )?;
    Ok(Linear::quantized(quantize_rows(
        &host,
        format.ggml(),
        first.device(),
    )?))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => x_wt(x, w),
            Weight::Quantized(q) => x_wt(x, &crate::dequantize(q, x.dtype())?),
        }
    }
}

impl Linear {
    /// `x Wᵀ + c`, c shaped like the product: on cuBLASLt (CUDA bf16) one product that reads c
    /// in its epilogue and rounds the sum once, elsewhere the product, then the sum.
    pub fn forward_add(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => x_wt_add(x, w, c),
            Weight::Quantized(q) => x_wt_add(x, &crate::dequantize(q, x.dtype())?, c),
        }
    }
}

/// `x Wᵀ + c`: the op where it applies, the composition elsewhere.
fn x_wt_add(x: &Tensor, w: &Tensor, c: &Tensor) -> Result<Tensor> {
    if crate::fused(x) && crate::fused(w) && crate::fused(c) && matches!(x.rank(), 2 | 3) {
        let c = c.contiguous()?;
        x.apply_op3_no_bwd(w, &c, &XWtAdd)
    } else {
        x_wt(x, w)? + c
    }
}

/// `x Wᵀ`: the op where it applies, candle_nn's `Linear` elsewhere.
fn x_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if crate::fused(x) && crate::fused(w) && matches!(x.rank(), 2 | 3) {
        x.apply_op2_no_bwd(w, &XWt)
    } else {
        candle_nn::Linear::new(w.clone(), None).forward(x)
    }
}

/// x (B, S, K) or (S, K) with unit last stride, W (N, K) contiguous → x Wᵀ (B, S, N) or (S, N),
/// accumulated in f32 and rounded once to the dtype.
#[derive(Debug, Clone, Copy)]
pub struct XWt;

/// The product's dimensions from the layouts: (batch, rows, K, N, row stride, batch stride) of x.
pub(crate) fn dims(xl: &Layout, wl: &Layout) -> Result<[usize; 6]> {
    let (n, k) = wl.shape().dims2()?;
    if !wl.is_contiguous() {
        bail!("linear: the weight {:?} must be contiguous", wl.shape());
    }
    let (b, s, xk, sb, sr, sk) = match (xl.dims(), xl.stride()) {
        (&[s, k], &[sr, sk]) => (1, s, k, s * sr, sr, sk),
        (&[b, s, k], &[sb, sr, sk]) => (b, s, k, sb, sr, sk),
        _ => bail!("linear: x {:?} must be (B, S, K) or (S, K)", xl.shape()),
    };
    if xk != k || (sk != 1 && k > 1) {
        bail!(
            "linear: x {:?} (strides {:?}) must end in K = {k} with unit stride",
            xl.shape(),
            xl.stride()
        );
    }
    // A single row's or batch item's stride is free: take the packed one.
    let sr = if s == 1 { k } else { sr };
    let sb = if b == 1 { s * sr } else { sb };
    Ok([b, s, k, n, sr, sb])
}

fn out_shape(xl: &Layout, n: usize) -> Shape {
    let mut dims = xl.dims().to_vec();
    *dims.last_mut().expect("rank 2 or 3") = n;
    Shape::from(dims)
}

impl CustomOp2 for XWt {
    fn name(&self) -> &'static str {
        "klein-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        reference((xs, xl), (ws, wl), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = dims(xl, wl)?;
        let out = cublaslt::x_wt(xs, xl, ws, wl, d)?;
        Ok((out, out_shape(xl, d[3])))
    }
}

/// The CPU reference of [`XWt`] (and, with c, [`XWtAdd`]): each output the f32 sum of its
/// products (plus c's element), rounded once to the dtype.
fn reference(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    c: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let [b, s, k, n, _, _] = dims(xl, wl)?;
    let shape = out_shape(xl, n);
    let c = match c {
        Some((cs, cl)) => {
            check_addend(cl, &shape)?;
            Some(cpu::read(cs, cl)?)
        }
        None => None,
    };
    let (x, w) = (cpu::read(xs, xl)?, cpu::read(ws, wl)?);
    let round = cpu::rounder(cpu::dtype(xs));
    let out = (0..b * s)
        .flat_map(|r| {
            let (x, w, c) = (&x[r * k..(r + 1) * k], &w, c.as_deref());
            (0..n).map(move |j| {
                let row = &w[j * k..(j + 1) * k];
                let sum: f32 = x.iter().zip(row).map(|(a, b)| a * b).sum();
                round(match c {
                    Some(c) => sum + c[r * n + j],
                    None => sum,
                })
            })
        })
        .collect();
    Ok((cpu::write(out, cpu::dtype(xs))?, shape))
}

/// x Wᵀ + c: [`XWt`]'s operands and c (contiguous, the product's shape), accumulated in f32
/// with c and rounded once to the dtype.
#[derive(Debug, Clone, Copy)]
pub struct XWtAdd;

impl candle_core::CustomOp3 for XWtAdd {
    fn name(&self) -> &'static str {
        "klein-linear-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        reference((xs, xl), (ws, wl), Some((cs, cl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        cs: &candle_core::CudaStorage,
        cl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = dims(xl, wl)?;
        let shape = out_shape(xl, d[3]);
        check_addend(cl, &shape)?;
        let out = cublaslt::x_wt_add(xs, xl, ws, wl, (cs, cl), d)?;
        Ok((out, shape))
    }
}

/// The addend of [`XWtAdd`]: contiguous, in the product's shape.
fn check_addend(cl: &Layout, shape: &Shape) -> Result<()> {
    if cl.shape() != shape || !cl.is_contiguous() {
        bail!(
            "linear: the addend {:?} must be contiguous and shaped as the product {shape:?}",
            cl.shape()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::IndexOp;

    use super::*;

    /// The op's CPU reference against candle's matmul, on a strided batch (a narrowed
    /// sequence, as the double block's output projections take).
    #[test]
    fn reference_matches_candle_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 40), &dev)?;
        let full = Tensor::randn(0f32, 1.0, (2, 9, 40), &dev)?;
        let x = full.i((.., 2..9, ..))?;
        let got = x.apply_op2_no_bwd(&w, &XWt)?;
        let want = x.broadcast_matmul(&w.t()?)?;
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "max |diff| {diff}");
        let bf = x
            .to_dtype(DType::BF16)?
            .apply_op2_no_bwd(&w.to_dtype(DType::BF16)?, &XWt)?;
        assert_eq!(bf.dims(), &[2, 7, 24]);
        assert_eq!(bf.dtype(), DType::BF16);
        Ok(())
    }

    /// The accumulating op's CPU reference: the product plus c, on a strided batch; a c of
    /// another shape is refused.
    #[test]
    fn the_addend_is_summed_into_the_product() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 40), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 9, 40), &dev)?.i((.., 2..9, ..))?;
        let c = Tensor::randn(0f32, 1.0, (2, 7, 24), &dev)?;
        let got = x.apply_op3_no_bwd(&w, &c, &XWtAdd)?;
        let want = (x.broadcast_matmul(&w.t()?)? + &c)?;
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "max |diff| {diff}");
        let composed = Linear::new(w.clone()).forward_add(&x, &c)?;
        assert_eq!(composed.dims(), &[2, 7, 24]);
        assert!(
            x.apply_op3_no_bwd(&w, &c.i((.., 1.., ..))?, &XWtAdd)
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn dims_take_packed_strides_where_free() -> Result<()> {
        let w = Layout::contiguous((24, 40));
        let one_row = Layout::new((3, 1, 40).into(), vec![400, 7, 1], 0);
        assert_eq!(dims(&one_row, &w)?, [3, 1, 40, 24, 40, 400]);
        let narrowed = Layout::new((1, 7, 40).into(), vec![360, 40, 1], 80);
        assert_eq!(dims(&narrowed, &w)?, [1, 7, 40, 24, 40, 280]);
        let bad = Layout::new((7, 40).into(), vec![1, 7], 0);
        assert!(dims(&bad, &w).is_err());
        Ok(())
    }

    #[test]
    fn module_falls_back_to_candle_on_the_cpu() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 40), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 40), &dev)?;
        let got = Linear::new(w.clone()).forward(&x)?;
        let want = candle_nn::Linear::new(w, None).forward(&x)?;
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    /// A quantized layer is the dense layer with the dequantized weight, exactly; stacking
    /// concatenates the rows; a width no block divides stays dense.
    #[test]
    fn quantized_layers_compute_the_dense_product_of_their_dequantized_weight() -> Result<()> {
        use std::collections::HashMap;

        use crate::quant::QuantFormat;

        let dev = Device::Cpu;
        let (a, b) = (
            Tensor::randn(0f32, 1.0, (16, 256), &dev)?,
            Tensor::randn(0f32, 1.0, (16, 256), &dev)?,
        );
        let tensors = HashMap::from([("a.weight".to_owned(), a), ("b.weight".to_owned(), b)]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let vbs = [vb.pp("a"), vb.pp("b")];
        let x = Tensor::randn(0f32, 1.0, (2, 5, 256), &dev)?;
        for format in [QuantFormat::Q4K, QuantFormat::Q8_0] {
            let q = stacked_linear(&vbs, (16, 256), Quantize::Format(format), None)?;
            let Weight::Quantized(blocks) = &q.weight else {
                panic!("{format}: a dense weight")
            };
            assert_eq!(blocks.dtype(), format.ggml());
            let dense = Linear::new(blocks.dequantize(&dev)?);
            let (got, want) = (q.forward(&x)?, dense.forward(&x)?);
            assert_eq!(got.dims(), &[2, 5, 32]);
            let diff = (&got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{format}");
            let exact = stacked_linear(&vbs, (16, 256), Quantize::None, None)?.forward(&x)?;
            let err = (&got - &exact)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?
                .sqrt()
                / exact.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
            assert!(
                err > 0.0 && err < 0.1,
                "{format}: rel-L2 {err} against the dense layer"
            );
        }
        let narrow = HashMap::from([(
            "c.weight".to_owned(),
            Tensor::randn(0f32, 1.0, (4, 48), &dev)?,
        )]);
        let vb = VarBuilder::from_tensors(narrow, DType::F32, &dev);
        let c = stacked_linear(
            &[vb.pp("c")],
            (4, 48),
            Quantize::Format(QuantFormat::Q4K),
            None,
        )?;
        assert!(
            matches!(c.weight, Weight::Dense(_)),
            "48 is no multiple of a block"
        );
        Ok(())
    }

    /// The parts of a split layer compute the whole layer's columns, bit for bit, dense or
    /// quantized; parts that do not add up to the rows are refused.
    #[test]
    fn split_parts_compute_their_columns_of_the_whole() -> Result<()> {
        use crate::quant::QuantFormat;

        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 256), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (12, 256), &dev)?;
        let q4 = quantize_rows(&w, QuantFormat::Q4K.ggml(), &dev)?;
        for layer in [Linear::new(w), Linear::quantized(q4)] {
            let whole = layer.forward(&x)?;
            let parts = layer.split_rows(DType::F32, &[3, 7, 2])?;
            let mut col = 0;
            for (part, n) in parts.iter().zip([3, 7, 2]) {
                let got = part.forward(&x)?;
                let want = whole.narrow(2, col, n)?;
                let diff = (got - want)?.abs()?.flatten_all()?.max(0)?;
                assert_eq!(diff.to_scalar::<f32>()?, 0.0, "rows {col}..{}", col + n);
                col += n;
            }
            assert!(layer.split_rows(DType::F32, &[3, 7]).is_err());
        }
        Ok(())
    }

    /// Stored blocks are taken as they are (stacked, whatever `quantize` says); a projection
    /// stored partly dense is refused; one with no stored part is read from the builders.
    #[test]
    fn stored_blocks_are_used_as_stored() -> Result<()> {
        use std::collections::HashMap;

        use crate::quant::QuantFormat;

        struct Blocks(HashMap<String, Tensor>);
        impl BlockSource for Blocks {
            fn blocks(&self, name: &str) -> Result<Option<StoredRows<'_>>> {
                let Some(t) = self.0.get(name) else {
                    return Ok(None);
                };
                let (rows, width) = t.dims2()?;
                Ok(Some(StoredRows {
                    dtype: GgmlDType::Q8_0,
                    width,
                    whole: QTensor::quantize(t, GgmlDType::Q8_0)?
                        .data()?
                        .into_owned()
                        .into(),
                    rows: 0..rows,
                }))
            }
            fn stored(&self) -> Vec<(usize, usize, GgmlDType)> {
                Vec::new()
            }
        }

        let dev = Device::Cpu;
        let w = |rows| Tensor::randn(0f32, 1.0, (rows, 64), &dev);
        let (a, b, c) = (w(4)?, w(4)?, w(4)?);
        let stored = StoredBlocks(Arc::new(Blocks(HashMap::from([
            ("p.a.weight".to_owned(), a.clone()),
            ("p.b.weight".to_owned(), b.clone()),
        ]))));
        let tensors = HashMap::from([
            ("p.a.weight".to_owned(), a.clone()),
            ("p.b.weight".to_owned(), b.clone()),
            ("p.c.weight".to_owned(), c),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev).pp("p");
        let q4 = Quantize::Format(QuantFormat::Q4_0);
        let ab = stacked_linear(&[vb.pp("a"), vb.pp("b")], (4, 64), q4, Some(&stored))?;
        let Weight::Quantized(blocks) = &ab.weight else {
            panic!("stored blocks came back dense")
        };
        let want = QTensor::quantize(&Tensor::cat(&[a, b], 0)?, GgmlDType::Q8_0)?;
        assert_eq!(
            (blocks.dtype(), blocks.shape()),
            (want.dtype(), want.shape())
        );
        assert_eq!(blocks.data()?, want.data()?);
        let mixed = stacked_linear(&[vb.pp("a"), vb.pp("c")], (4, 64), q4, Some(&stored));
        assert!(
            mixed
                .unwrap_err()
                .to_string()
                .contains("p.c.weight is stored dense")
        );
        let dense = stacked_linear(&[vb.pp("c")], (4, 64), Quantize::None, Some(&stored))?;
        assert!(matches!(dense.weight, Weight::Dense(_)));
        assert_eq!(stored, stored.clone());
        Ok(())
    }
}
