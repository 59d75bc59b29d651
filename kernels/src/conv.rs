//! The VAE's 2-D convolution with its bias (and, in a ResNet block, the residual added to it):
//! through cuDNN on a CUDA f32 tensor in a `cudnn` build, with the arithmetic chosen per call
//! ([`ConvPrecision`]); the stock-candle composition ([`reference::conv2d`]) everywhere else.
//!
//! On cuDNN the bias and the residual cost no pass of their own. Exact f32 runs NCHW: the output
//! starts as `bias (+ residual)` (one fill kernel) and cuDNN accumulates into it (β = 1). TF32
//! runs NHWC, the layout of cuDNN's tensor-core kernels (which would otherwise transpose every
//! operand on every call): the weights are stored (C_out, k, k, C_in), x is transposed (and
//! split) once, the passes accumulate in an NHWC buffer, and one transpose back to NCHW adds the
//! bias and the residual. Where memory is short, TF32 runs in bands of output rows
//! ([`conv2d_banded`]) whose buffers cover one band, straight from x into the output.
//!
//! Split TF32 runs the tensor cores on f32 data without TF32's error: with `x = x_hi + x_lo` and
//! `w = w_hi + w_lo` ([`tf32_split`]: hi keeps the top 19 bits, exact in TF32; lo is the exact
//! remainder, below 2⁻¹⁰ of the value),
//! `conv(x, w) = conv(x_hi, w_hi) + conv(x_lo, w_hi) + conv(x_hi, w_lo) + conv(x_lo, w_lo)`.
//! The first term is one TF32 pass with f32 output, its products exact. The low terms are
//! ~2⁻¹⁰ of the result, so they run on fp16 tensor cores, twice TF32's rate, with an fp16
//! output: fp16 has TF32's 10-bit mantissa (`w_hi` and `x_hi` are exact in it), and x_lo's and
//! the output's fp16 roundings are ~2⁻²² of the result, as lo's TF32 rounding was in three TF32
//! passes; the last term is dropped (~2⁻²⁰). The transpose back adds the fp16 output. Weights
//! trained in bf16 (the released VAE) are exact in TF32: their `w_lo` is zero and one low pass
//! does. fp16's range bounds x_lo, not x: |x| < 6·10⁷.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, bail,
    conv::CudnnFwdAlgo,
};

use crate::reference;

/// The arithmetic of an f32 convolution on cuDNN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvPrecision {
    /// f32 fused multiply-adds: the reference's arithmetic.
    #[default]
    Exact,
    /// One TF32 tensor-core pass (products of 10-bit mantissas; torch's cuDNN default).
    Tf32,
    /// A TF32 pass over the high parts and fp16 passes over the low ones: f32-class results on
    /// the tensor cores.
    SplitTf32,
}

/// A convolution's parameters, prepared for its precision.
#[derive(Debug, Clone)]
pub struct ConvWeights {
    /// (C_out, C_in, k, k); (C_out, k, k, C_in) where [`Self::nhwc`]; under split TF32 on cuDNN
    /// its TF32 part `w_hi`.
    pub weight: Tensor,
    /// Under split TF32 on cuDNN, `w − w_hi` (laid out as `weight`) where it is not all zero.
    pub weight_lo: Option<Tensor>,
    /// (C_out)
    pub bias: Tensor,
    /// Whether the weights are stored (C_out, k, k, C_in): TF32 arithmetic on cuDNN, whose
    /// tensor-core kernels run NHWC.
    pub nhwc: bool,
}

impl ConvWeights {
    /// `weight` (C_out, C_in, k, k) and `bias` as [`conv2d`] runs them at `precision` on their
    /// device.
    pub fn new(weight: Tensor, bias: Tensor, precision: ConvPrecision) -> Result<Self> {
        if precision == ConvPrecision::Exact || !conv_fused(&weight) {
            return Ok(Self {
                weight,
                weight_lo: None,
                bias,
                nhwc: false,
            });
        }
        let krsc = |t: &Tensor| t.permute((0, 2, 3, 1))?.contiguous();
        let (weight, weight_lo) = match precision {
            ConvPrecision::SplitTf32 => {
                let (hi, lo) = tf32_parts(&weight)?;
                (krsc(&hi)?, lo.as_ref().map(krsc).transpose()?)
            }
            _ => (krsc(&weight)?, None),
        };
        Ok(Self {
            weight,
            weight_lo,
            bias,
            nhwc: true,
        })
    }

    /// Bytes of the low part [`Self::new`] keeps for `weight` at `precision` on its device
    /// (a model's resident bytes are those read plus these).
    pub fn derived_bytes(weight: &Tensor, precision: ConvPrecision) -> Result<u64> {
        if precision != ConvPrecision::SplitTf32 || !conv_fused(weight) {
            return Ok(0);
        }
        Ok(match tf32_parts(weight)?.1 {
            Some(lo) => (lo.elem_count() * lo.dtype().size_in_bytes()) as u64,
            None => 0,
        })
    }

    /// The same weights with `f` applied to every tensor (a dtype change, an output-channel
    /// slice: axis 0 is C_out in both layouts).
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            weight: f(&self.weight)?,
            weight_lo: self.weight_lo.as_ref().map(&f).transpose()?,
            bias: f(&self.bias)?,
            nhwc: self.nhwc,
        })
    }

    /// The weights of [`upsample_conv2d`] for this 3×3 convolution (padding 1): its phase
    /// filters ([`phase_filters`]) in the same layout, with its bias four times. NHWC weights
    /// are split again ([`tf32_split`] of `weight + weight_lo`), their low part kept whatever
    /// its values: the summed taps are rarely exact in TF32, and checking would wait for the
    /// device. Built per call, a few small operations, so that no second copy of the filters
    /// stays resident.
    pub fn upsampling_phases(&self) -> Result<Self> {
        let whole = match &self.weight_lo {
            Some(lo) => (&self.weight + lo)?,
            None => self.weight.clone(),
        };
        let axes = if self.nhwc { (1, 2) } else { (2, 3) };
        let phases = phase_filters(&whole, axes)?;
        let bias = Tensor::cat(&[&self.bias; 4], 0)?;
        if !self.nhwc {
            return Ok(Self {
                weight: phases,
                weight_lo: None,
                bias,
                nhwc: false,
            });
        }
        let parts = tf32_split(&phases)?;
        Ok(Self {
            weight: parts.get(0)?,
            weight_lo: Some(parts.get(1)?),
            bias,
            nhwc: true,
        })
    }

    /// (C_out, k): the output channels and the kernel side.
    pub fn geometry(&self) -> Result<(usize, usize)> {
        let (c_out, a, b, _) = self.weight.dims4()?;
        Ok((c_out, if self.nhwc { a } else { b }))
    }
}

/// Geometry and arithmetic of one [`conv2d`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv {
    /// Zero padding on every side.
    pub padding: usize,
    pub stride: usize,
    pub precision: ConvPrecision,
    /// cuDNN's forward algorithm; `None` = its heuristic pick.
    pub algo: Option<CudnnFwdAlgo>,
}

/// Whether [`conv2d`] runs cuDNN for `x`: f32 on CUDA in a `cudnn` build.
pub fn conv_fused(x: &Tensor) -> bool {
    cfg!(feature = "cudnn") && x.device().is_cuda() && x.dtype() == DType::F32
}

/// What a convolution's input goes through first, elementwise: a per-(batch, channel) affine (a
/// group norm's, [`crate::group_norm_affine`]), optionally followed by SiLU. cuDNN's TF32 paths
/// apply it inside their NHWC transpose, so the normalised input never exists as a tensor;
/// elsewhere [`Self::apply`] runs first, with the same rounding.
#[derive(Debug, Clone, Default)]
pub struct Prologue {
    /// (scale, shift), each (B, C_in) f32, and whether SiLU follows.
    pub affine: Option<(Tensor, Tensor, bool)>,
}

impl Prologue {
    /// x with the prologue applied: [`crate::channel_affine`].
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match &self.affine {
            Some((scale, shift, silu)) => crate::channel_affine(x, scale, shift, *silu),
            None => Ok(x.clone()),
        }
    }

    /// Whether the prologue changes nothing.
    pub fn is_identity(&self) -> bool {
        self.affine.is_none()
    }
}

/// `conv(x, weight) + bias (+ residual)`: x (B, C_in, H, W), residual (B, C_out, H_out, W_out)
/// → (B, C_out, H_out, W_out). x, the weights and the residual share one dtype.
pub fn conv2d(
    x: &Tensor,
    w: &ConvWeights,
    residual: Option<&Tensor>,
    conv: Conv,
) -> Result<Tensor> {
    conv2d_with(x, w, residual, conv, &Prologue::default())
}

/// [`conv2d`] of `prologue.apply(x)`, fused where cuDNN runs TF32 arithmetic.
pub fn conv2d_with(
    x: &Tensor,
    w: &ConvWeights,
    residual: Option<&Tensor>,
    conv: Conv,
    prologue: &Prologue,
) -> Result<Tensor> {
    conv2d_banded(x, w, residual, conv, prologue, usize::MAX)
}

/// Whether [`conv2d_banded`] runs `conv` over `x` with `w` in bands: cuDNN with TF32
/// arithmetic (NHWC weights) and stride 1.
pub fn conv_banded(x: &Tensor, w: &ConvWeights, conv: Conv) -> bool {
    conv_fused(x) && w.nhwc && conv.stride == 1
}

/// [`conv2d_with`] in bands of `band_rows` output rows where [`conv_banded`]: each band
/// transposes (and splits) only the input rows it reads, through the prologue, and writes its
/// rows of the one output, adding the bias and the residual's rows; no band's input or output
/// is a tensor of its own. Elsewhere the whole output at once.
pub fn conv2d_banded(
    x: &Tensor,
    w: &ConvWeights,
    residual: Option<&Tensor>,
    conv: Conv,
    prologue: &Prologue,
    band_rows: usize,
) -> Result<Tensor> {
    let tf32_on_cudnn = conv_fused(x) && w.nhwc;
    if !tf32_on_cudnn && !prologue.is_identity() {
        return conv2d(&prologue.apply(x)?, w, residual, conv);
    }
    if !conv_fused(x) {
        if w.nhwc {
            bail!(
                "conv2d: NHWC weights (TF32 on cuDNN) for a {:?} input",
                x.dtype()
            );
        }
        return reference::conv2d(x, &w.weight, &w.bias, residual, conv);
    }
    let affine = match &prologue.affine {
        Some((scale, shift, silu)) => Some((scale.contiguous()?, shift.contiguous()?, *silu)),
        None => None,
    };
    let op = CudnnConv {
        conv,
        nhwc: w.nhwc,
        half_weights: half_weights(w, conv)?,
        residual: residual.map(Tensor::contiguous).transpose()?,
        prologue: Prologue { affine },
        subpixel: false,
        band_rows,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&w.weight.contiguous()?, &w.bias.contiguous()?, &op)
}

/// Under split TF32 on cuDNN, the low-part passes' fp16 weights: `w_hi`, and `w_lo` ·
/// [`W_LO_SCALE`] where not zero.
fn half_weights(w: &ConvWeights, conv: Conv) -> Result<Option<(Tensor, Option<Tensor>)>> {
    if !(w.nhwc && conv.precision == ConvPrecision::SplitTf32) {
        return Ok(None);
    }
    let lo = |t: &Tensor| t.affine(W_LO_SCALE, 0.0)?.to_dtype(DType::F16);
    Ok(Some((
        w.weight.to_dtype(DType::F16)?,
        w.weight_lo.as_ref().map(lo).transpose()?,
    )))
}

/// Which rows of a 3×3 filter fall on row r of phase a's 2×2 filter, `PHASE_TAPS[a][r]` (and
/// the same for columns): output row 2i + a of a ×2 nearest upsampling followed by a 3×3
/// convolution (padding 1) reads upsampled rows 2i + a − 1 ..= 2i + a + 1, which are x's rows
/// i − 1, i, i (a = 0) or i, i, i + 1 (a = 1).
const PHASE_TAPS: [[&[usize]; 2]; 2] = [[&[0], &[1, 2]], [&[0, 1], &[2]]];

/// The filters of [`upsample_conv2d`] from a 3×3 convolution's `weight`, whose kernel rows and
/// columns lie on `axes` (2, 3 for (C_out, C_in, k, k); 1, 2 for NHWC's (C_out, k, k, C_in)):
/// the same layout with 4 · C_out output channels and 2×2 taps, phase (a, b)'s filter at
/// output channels `(2a + b) · C_out ..`, each of its taps the sum of the 3×3 taps that the
/// upsampling puts on one input pixel.
fn phase_filters(weight: &Tensor, (row_axis, col_axis): (usize, usize)) -> Result<Tensor> {
    let (kh, kw) = (weight.dim(row_axis)?, weight.dim(col_axis)?);
    if (kh, kw) != (3, 3) {
        bail!("upsampling phases: a 3×3 filter, not {kh}×{kw}");
    }
    let taps = |t: &Tensor, axis: usize, rows: &[usize]| -> Result<Tensor> {
        let mut sum = t.narrow(axis, rows[0], 1)?;
        for &r in &rows[1..] {
            sum = (sum + t.narrow(axis, r, 1)?)?;
        }
        Ok(sum)
    };
    let mut phases = Vec::with_capacity(4);
    for row_taps in PHASE_TAPS {
        let rows = row_taps
            .iter()
            .map(|r| taps(weight, row_axis, r))
            .collect::<Result<Vec<_>>>()?;
        let rows = Tensor::cat(&rows, row_axis)?;
        for col_taps in PHASE_TAPS {
            let cols = col_taps
                .iter()
                .map(|c| taps(&rows, col_axis, c))
                .collect::<Result<Vec<_>>>()?;
            phases.push(Tensor::cat(&cols, col_axis)?);
        }
    }
    Tensor::cat(&phases, 0)?.contiguous()
}

/// A ×2 nearest upsampling of x (B, C_in, H, W) followed by the 3×3 convolution (padding 1)
/// whose [`ConvWeights::upsampling_phases`] `w` holds → (B, C_out, 2H, 2W):
/// one 2×2 convolution with padding 1 over x, (H + 1) × (W + 1) pixels of 4 · C_out phases,
/// of which output pixel (2i + a, 2j + b) is phase (a, b) at (i + a, j + b). 16 products an
/// output where the upsampled convolution takes 36, and x is read at its own size. On cuDNN
/// (TF32 arithmetic, C_out even) the transpose back to NCHW interleaves the phases; elsewhere
/// the composition.
pub fn upsample_conv2d(x: &Tensor, w: &ConvWeights, conv: Conv) -> Result<Tensor> {
    upsample_conv2d_banded(x, w, conv, usize::MAX)
}

/// [`upsample_conv2d`] in bands of `band_rows` rows of x (2 · `band_rows` output rows) on
/// cuDNN: each band transposes the window of x's rows it reads and writes its output rows,
/// so neither the upsampled x nor a band's output is a tensor of its own.
pub fn upsample_conv2d_banded(
    x: &Tensor,
    w: &ConvWeights,
    conv: Conv,
    band_rows: usize,
) -> Result<Tensor> {
    let (phases, k) = w.geometry()?;
    if k != 2 || phases % 4 != 0 {
        bail!("upsample_conv2d: 2×2 filters of 4 phases, not {phases} of {k}×{k}");
    }
    let c_out = phases / 4;
    let conv = Conv {
        padding: 1,
        stride: 1,
        ..conv
    };
    if conv_fused(x) && w.nhwc && c_out % 2 == 0 {
        let op = CudnnConv {
            conv,
            nhwc: true,
            half_weights: half_weights(w, conv)?,
            residual: None,
            prologue: Prologue::default(),
            subpixel: true,
            band_rows,
        };
        return x.contiguous()?.apply_op3_no_bwd(
            &w.weight.contiguous()?,
            &w.bias.contiguous()?,
            &op,
        );
    }
    let (n, _, h, wd) = x.dims4()?;
    let y = conv2d(x, w, None, conv)?;
    let phase = |a: usize, b: usize| {
        y.narrow(1, (2 * a + b) * c_out, c_out)?
            .narrow(2, a, h)?
            .narrow(3, b, wd)
    };
    // Output row 2i + a interleaves phases (a, 0) and (a, 1); the rows interleave a = 0, 1.
    let rows = (0..2)
        .map(|a| Tensor::stack(&[phase(a, 0)?, phase(a, 1)?], 4)?.reshape((n, c_out, h, 2 * wd)))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&rows, 3)?.reshape((n, c_out, 2 * h, 2 * wd))
}

/// `x` (any shape, f32) → (2, ..x's shape): `[x_hi, x_lo]`, `x_hi` = x with the low 13 mantissa
/// bits cleared (exact in TF32), `x_lo = x − x_hi` (exact in f32).
pub fn tf32_split(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Tf32Split)
}

/// `w`'s TF32 high part and, unless it is all zero (`w` exact in TF32: the high part is `w`),
/// its low part `w − w_hi`.
fn tf32_parts(w: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let parts = tf32_split(w)?;
    let lo = parts.get(1)?;
    if lo.abs()?.max_all()?.to_scalar::<f32>()? == 0.0 {
        Ok((w.clone(), None))
    } else {
        Ok((parts.get(0)?, Some(lo)))
    }
}

/// The [`tf32_split`] op.
#[derive(Debug, Clone, Copy)]
pub struct Tf32Split;

/// The high part of `v`: its sign, exponent and top 10 mantissa bits.
fn tf32_high(v: f32) -> f32 {
    f32::from_bits(v.to_bits() & 0xffff_e000)
}

impl CustomOp1 for Tf32Split {
    fn name(&self) -> &'static str {
        "klein-tf32-split"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            bail!("tf32_split: f32 only, got {:?}", crate::cpu::dtype(s));
        };
        let x = &v[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let hi: Vec<f32> = x.iter().map(|&v| tf32_high(v)).collect();
        let lo: Vec<f32> = x.iter().zip(&hi).map(|(&v, &h)| v - h).collect();
        Ok((CpuStorage::F32([hi, lo].concat()), split_shape(l)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;

        let n = l.shape().elem_count();
        let dev = s.device().clone();
        let mut out = unsafe { dev.alloc::<f32>(2 * n)? };
        let x = crate::cuda::view::<f32>(s, l)?;
        cuda::split(&dev, &x, &mut out, n)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            split_shape(l),
        ))
    }
}

fn split_shape(l: &Layout) -> Shape {
    Shape::from([&[2], l.dims()].concat())
}

/// Split TF32's scale of `w_lo` in fp16 (below 2⁻¹⁰ of the weight).
const W_LO_SCALE: f64 = 1024.0;

/// The cuDNN convolution: x, weight (`w_hi` under split TF32; NHWC under TF32 arithmetic),
/// bias; a prologue only with TF32 arithmetic (its NHWC transpose applies it).
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
struct CudnnConv {
    conv: Conv,
    nhwc: bool,
    /// Under split TF32, the low-part passes' fp16 weights: `w_hi`, and `w_lo` · [`W_LO_SCALE`]
    /// where not zero.
    half_weights: Option<(Tensor, Option<Tensor>)>,
    residual: Option<Tensor>,
    prologue: Prologue,
    /// The weights are [`upsample_conv2d`]'s phases: the output interleaves them.
    subpixel: bool,
    /// Output rows per cuDNN call (TF32 arithmetic, stride 1; upsampling phases: rows of x),
    /// each call's temporaries covering only its rows and the input rows they read; other
    /// strides run whole.
    band_rows: usize,
}

impl CustomOp3 for CudnnConv {
    fn name(&self) -> &'static str {
        "klein-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("klein-cudnn-conv2d runs on cuDNN only; conv2d takes reference::conv2d elsewhere")
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cudnn::conv_forward(self, (xs, xl), (ws, wl), (bs, bl))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda::WrapErr;
    use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
    use candle_core::{CudaDevice, Result};

    use crate::cuda::{ELEMENTWISE, grid_stride};

    /// `out[..n] = hi(x)`, `out[n..] = x − hi(x)`.
    pub fn split(
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
        out: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        let f = dev.get_or_load_custom_func("tf32_split_f32", ELEMENTWISE.name, ELEMENTWISE.ptx)?;
        let (mut hi, mut lo) = out.split_at_mut(n);
        let n_arg = n as i64;
        let mut l = f.builder();
        l.arg(x).arg(&mut hi).arg(&mut lo).arg(&n_arg);
        unsafe { l.launch(grid_stride(n)) }.w()?;
        Ok(())
    }
}

#[cfg(feature = "cudnn")]
mod cudnn;

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn tf32_split_is_exact_and_its_high_part_has_ten_mantissa_bits() {
        let x = Tensor::randn(0f32, 3.0, (3, 5, 7), &Device::Cpu).unwrap();
        let parts = tf32_split(&x).unwrap();
        assert_eq!(parts.dims(), &[2, 3, 5, 7]);
        let (hi, lo) = (parts.get(0).unwrap(), parts.get(1).unwrap());
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let hi = hi.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let lo = lo.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for ((&x, &h), &l) in x.iter().zip(&hi).zip(&lo) {
            assert_eq!(h + l, x, "hi + lo must give x back exactly");
            assert_eq!(
                h.to_bits() & 0x1fff,
                0,
                "hi has only TF32's 10 mantissa bits"
            );
            assert!(
                l.abs() <= x.abs() * 2f32.powi(-10),
                "lo is below hi's last bit"
            );
        }
        assert!(
            lo.iter().any(|&l| l != 0.0),
            "random f32 values have a low part"
        );
    }

    #[test]
    fn bf16_values_have_no_low_part() {
        let x = Tensor::randn(0f32, 1.0, 64, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let lo = tf32_split(&x).unwrap().get(1).unwrap();
        assert_eq!(
            lo.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn the_split_sum_of_products_is_the_convolution() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.3, (4, 3, 3, 3), &dev).unwrap();
        let conv = |x: &Tensor, w: &Tensor| x.conv2d(w, 1, 1, 1, 1).unwrap();
        let (xs, ws) = (tf32_split(&x).unwrap(), tf32_split(&w).unwrap());
        let (x_hi, x_lo) = (xs.get(0).unwrap(), xs.get(1).unwrap());
        let (w_hi, w_lo) = (ws.get(0).unwrap(), ws.get(1).unwrap());
        let three =
            ((conv(&x_hi, &w_hi) + conv(&x_lo, &w_hi)).unwrap() + conv(&x_hi, &w_lo)).unwrap();
        let want = conv(&x, &w);
        let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let err = (norm(&(three - &want).unwrap()) / norm(&want))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            err < 1e-6,
            "three passes leave only x_lo·w_lo: rel-L2 {err:e}"
        );
    }

    #[test]
    fn nhwc_weights_are_refused_off_cudnn() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let w = ConvWeights {
            weight: Tensor::zeros((2, 3, 3, 3), DType::F32, &dev).unwrap(),
            weight_lo: None,
            bias: Tensor::zeros(2, DType::F32, &dev).unwrap(),
            nhwc: true,
        };
        let conv = Conv {
            padding: 1,
            stride: 1,
            precision: ConvPrecision::Tf32,
            algo: None,
        };
        let err = conv2d(&x, &w, None, conv).unwrap_err().to_string();
        assert!(err.contains("NHWC weights"), "{err}");
    }

    #[test]
    fn conv2d_off_cudnn_is_the_composition_with_bias_and_residual() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 3, 6, 6), &dev).unwrap();
        let w = ConvWeights::new(
            Tensor::randn(0f32, 0.3, (4, 3, 3, 3), &dev).unwrap(),
            Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &dev).unwrap(),
            ConvPrecision::SplitTf32,
        )
        .unwrap();
        assert!(
            w.weight_lo.is_none() && !w.nhwc,
            "the CPU keeps the whole weight"
        );
        let r = Tensor::randn(0f32, 1.0, (1, 4, 3, 3), &dev).unwrap();
        let conv = Conv {
            padding: 1,
            stride: 2,
            precision: ConvPrecision::SplitTf32,
            algo: None,
        };
        let got = conv2d(&x, &w, Some(&r), conv).unwrap();
        let want = ((x.conv2d(&w.weight, 1, 2, 1, 1).unwrap()
            + w.bias
                .reshape((1, 4, 1, 1))
                .unwrap()
                .broadcast_as((1, 4, 3, 3))
                .unwrap())
        .unwrap()
            + &r)
            .unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    /// The phases are the upsampled convolution, in f64 to the last bits; odd sizes included.
    #[test]
    fn upsampling_phases_are_the_upsampled_convolution() {
        let dev = Device::Cpu;
        for (c_in, c_out, h, w) in [(3, 4, 5, 7), (2, 6, 1, 1), (4, 2, 6, 3)] {
            let x = Tensor::randn(0f32, 1.0, (2, c_in, h, w), &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let bias = Tensor::randn(0f32, 1.0, c_out, &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let conv = Conv {
                padding: 1,
                stride: 1,
                precision: ConvPrecision::SplitTf32,
                algo: None,
            };
            let whole = ConvWeights::new(weight, bias, ConvPrecision::SplitTf32).unwrap();
            let phases = whole.upsampling_phases().unwrap();
            assert_eq!(phases.weight.dims(), [4 * c_out, c_in, 2, 2]);
            let got = upsample_conv2d(&x, &phases, conv).unwrap();
            let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
            let want = conv2d(&up, &whole, None, conv).unwrap();
            assert_eq!(got.dims(), [2, c_out, 2 * h, 2 * w]);
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f64>().unwrap();
            assert!(diff < 1e-12, "{c_in} → {c_out}, {h} × {w}: {diff}");
        }
    }
}
