//! The linear primitives of the VAE, written so that no temporary grows past
//! [`Chunking::op_bytes`](super::Chunking):
//! - [`Conv2d`] with explicit (possibly asymmetric) padding, run in bands of output rows so the
//!   im2col buffer of a 3x3 convolution at 1024² never exists whole.
//!
//! candle's CPU backend has no bf16 GEMM, so on the CPU the convolutions (and the attention's
//! projections) of a bf16 model compute in f32 and round once, as torch's CPU kernels do
//! ([`gemm_dtype`]).

use candle_core::{DType, Result, Tensor, conv::CudnnFwdAlgo};
use candle_nn::VarBuilder;
use klein_kernels::{Conv, ConvPrecision, ConvWeights, PadRows, Prologue};

use super::{BandCopies, Config};

/// (B, C, H, W).
type Dims4 = (usize, usize, usize, usize);

/// The dtype a convolution or projection of `x` computes in.
pub fn gemm_dtype(x: &Tensor) -> DType {
    if x.dtype() == DType::BF16 && x.device().is_cpu() {
        DType::F32
    } else {
        x.dtype()
    }
}

/// Zero padding of a convolution input: rows above and below, columns left and right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    /// The same padding on every side.
    pub const fn same(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// Geometry of one convolution call, for band planning and memory estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub in_w: usize,
    pub out_w: usize,
    pub out_h: usize,
    /// Whether the convolution materialises its im2col rows ([`super::Chunking::conv_im2col`]).
    pub im2col: bool,
    /// Copies of its input and output rows alive at once ([`super::Chunking::conv_copies`]).
    pub copies: BandCopies,
}

impl ConvShape {
    /// Elements of the working set per output row: the im2col rows (where the convolution
    /// materialises them) and the copies of the output and padded input rows.
    fn elements_per_row(&self, pad_w: usize) -> u64 {
        let s = self;
        let col = if s.im2col {
            s.out_w * s.c_in * s.kernel * s.kernel
        } else {
            0
        };
        let out = s.copies.output * s.out_w * s.c_out;
        let input = s.copies.input * s.c_in * s.stride * (s.in_w + pad_w);
        (s.batch * (col + out + input)) as u64
    }

    /// Output rows per band so that one band's working set fits `op_bytes` (at least one).
    pub fn band_rows(&self, pad_w: usize, dtype_bytes: u64, op_bytes: u64) -> usize {
        let per_row = self.elements_per_row(pad_w) * dtype_bytes;
        ((op_bytes / per_row.max(1)) as usize).clamp(1, self.out_h.max(1))
    }

    /// Bytes of the temporaries of one band (beyond the output itself).
    pub fn temp_bytes(&self, pad_w: usize, dtype_bytes: u64, op_bytes: u64) -> u64 {
        let rows = self.band_rows(pad_w, dtype_bytes, op_bytes) as u64;
        rows * self.elements_per_row(pad_w) * dtype_bytes
    }
}

/// `algo` where cuDNN implements it for this convolution, else implicit-precomp-gemm: the
/// Winograd algorithms take 3×3 stride-1 convolutions only, the FFT ones stride 1.
fn supported_algo(
    algo: Option<CudnnFwdAlgo>,
    kernel: usize,
    stride: usize,
) -> Option<CudnnFwdAlgo> {
    use CudnnFwdAlgo::{Fft, FftTiling, ImplicitPrecompGemm, Winograd, WinogradNonFused};
    match algo {
        Some(Winograd | WinogradNonFused) if kernel != 3 || stride != 1 => {
            Some(ImplicitPrecompGemm)
        }
        Some(Fft | FftTiling) if stride != 1 => Some(ImplicitPrecompGemm),
        a => a,
    }
}

/// A 2-D convolution with bias, run in bands of output rows.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weights: ConvWeights,
    stride: usize,
    padding: Padding,
    op_bytes: u64,
    algo: Option<CudnnFwdAlgo>,
    precision: ConvPrecision,
    im2col: bool,
    copies: BandCopies,
}

impl Conv2d {
    /// Loads `weight` (out, in, k, k) and `bias` (out).
    pub fn new(
        cfg: &Config,
        (c_in, c_out, kernel): (usize, usize, usize),
        stride: usize,
        padding: Padding,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let precision = cfg.chunking.conv_precision;
        Ok(Self {
            weights: ConvWeights::new(
                vb.get((c_out, c_in, kernel, kernel), "weight")?,
                vb.get(c_out, "bias")?,
                precision,
            )?,
            stride,
            padding,
            op_bytes: cfg.chunking.op_bytes,
            algo: supported_algo(cfg.chunking.conv_algo, kernel, stride),
            precision,
            im2col: cfg.chunking.conv_im2col,
            copies: cfg
                .chunking
                .conv_copies
                .of(stride, padding == Padding::same(padding.top)),
        })
    }

    /// Keeps only output channels `[start, start + len)` (the posterior mean of `quant_conv`).
    pub fn narrow_out(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            weights: self
                .weights
                .map(|t| t.narrow(0, start, len)?.contiguous())?,
            ..self.clone()
        })
    }

    /// The same convolution (the same weights) in one TF32 pass over the TF32 part of its
    /// weights where it runs split TF32; otherwise unchanged.
    pub fn one_tf32_pass(&self) -> Self {
        let precision = match self.precision {
            ConvPrecision::SplitTf32 => ConvPrecision::Tf32,
            own => own,
        };
        Self {
            precision,
            ..self.clone()
        }
    }

    /// (B, C_in, H, W) -> (B, C_out, H_out, W_out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_add(x, None)
    }

    /// `residual + conv(prologue(x))`. Where [`Self::bands_in_place`] the convolution runs in
    /// bands of output rows inside `klein_kernels::conv2d_banded`: the prologue (a group norm's
    /// affine and SiLU) happens in its NHWC transpose, and neither the normalised input nor any
    /// band is a tensor of its own; otherwise the prologue is applied first.
    pub fn forward_prologue(
        &self,
        x: &Tensor,
        prologue: &Prologue,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.bands_in_place(x) {
            return self.banded_in_place(x, prologue, residual);
        }
        self.forward_add(&prologue.apply(x)?, residual)
    }

    /// `klein_kernels::conv2d_banded` with this convolution's band plan.
    fn banded_in_place(
        &self,
        x: &Tensor,
        prologue: &Prologue,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (rows, _) = self.band_plan(x.dims4()?, x.dtype())?;
        let call = self.call(self.padding.top);
        klein_kernels::conv2d_banded(x, &self.weights, residual, call, prologue, rows)
    }

    /// Whether cuDNN runs this convolution over `x` in TF32 arithmetic, stride 1, with the same
    /// padding on every side (`klein_kernels::conv_banded`): there it runs its bands in place
    /// and takes a prologue, and `Upsample2D` runs its phases in bands.
    pub fn bands_in_place(&self, x: &Tensor) -> bool {
        self.padding == Padding::same(self.padding.top)
            && klein_kernels::conv_banded(x, &self.weights, self.call(self.padding.top))
    }

    /// Rows of `x` per band of this convolution over `x` upsampled ×2 as upsampling phases
    /// (`klein_kernels::upsample_conv2d_banded`): half the output rows the band plan gives the
    /// upsampled convolution, whose copies of the 4× larger input rows bound the phases'.
    pub fn upsampled_band_rows(&self, x: &Tensor) -> Result<usize> {
        let (b, c_in, h, w) = x.dims4()?;
        let (rows, _) = self.band_plan((b, c_in, 2 * h, 2 * w), x.dtype())?;
        Ok((rows / 2).max(1))
    }

    /// Output rows per band and the output's (C, H, W) for an input of `dims`.
    fn band_plan(
        &self,
        (b, c_in, h, w): Dims4,
        dtype: DType,
    ) -> Result<(usize, (usize, usize, usize))> {
        let (c_out, k) = self.weights.geometry()?;
        let p = self.padding;
        let (out_h, out_w) = (
            self.out_len(h, p.top + p.bottom, k),
            self.out_len(w, p.left + p.right, k),
        );
        let shape = ConvShape {
            batch: b,
            c_in,
            c_out,
            kernel: k,
            stride: self.stride,
            in_w: w,
            out_w,
            out_h,
            im2col: self.im2col,
            copies: self.copies,
        };
        let rows = shape.band_rows(
            p.left + p.right,
            dtype.size_in_bytes() as u64,
            super::config::op_bytes_in_force(self.op_bytes),
        );
        Ok((rows, (c_out, out_h, out_w)))
    }

    /// `residual + conv(x)`: on cuDNN the residual is added where the bias is (one write).
    pub fn forward_add(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if self.bands_in_place(x) {
            return self.banded_in_place(x, &Prologue::default(), residual);
        }
        let (rows, (c_out, out_h, out_w)) = self.band_plan(x.dims4()?, x.dtype())?;
        let dt = gemm_dtype(x);
        let weights = self.weights.map(|t| t.to_dtype(dt))?;
        if rows >= out_h {
            return self.band(x, (0, out_h), &weights, residual);
        }
        let out = Tensor::zeros((x.dim(0)?, c_out, out_h, out_w), x.dtype(), x.device())?;
        for r0 in (0..out_h).step_by(rows) {
            let r1 = (r0 + rows).min(out_h);
            let residual = residual.map(|r| r.narrow(2, r0, r1 - r0)).transpose()?;
            let y = self.band(x, (r0, r1), &weights, residual.as_ref())?;
            out.slice_set(&y, 2, r0)?;
        }
        Ok(out)
    }

    /// The weights as the convolution runs them.
    pub fn weights(&self) -> &ConvWeights {
        &self.weights
    }

    /// The kernel call's geometry and arithmetic, with `padding` on every side.
    pub fn call(&self, padding: usize) -> Conv {
        Conv {
            padding,
            stride: self.stride,
            precision: self.precision,
            algo: self.algo,
        }
    }

    fn out_len(&self, len: usize, pad: usize, k: usize) -> usize {
        (len + pad).saturating_sub(k) / self.stride + 1
    }

    /// Output rows `[r0, r1)` plus the same rows of `residual`, in `x`'s dtype, contiguous; the
    /// weights are in the compute dtype. The residual joins the bias where the convolution
    /// computes in x's dtype; a bf16 model on the CPU rounds the convolution before the sum, as
    /// torch does.
    fn band(
        &self,
        x: &Tensor,
        (r0, r1): (usize, usize),
        weights: &ConvWeights,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, _, h, _) = x.dims4()?;
        let dt = weights.weight.dtype();
        let (_, k) = weights.geometry()?;
        let p = self.padding;
        let fuse = dt == x.dtype();
        let fused = residual.filter(|_| fuse);
        let y =
            if r0 == 0 && r1 == self.out_len(h, p.top + p.bottom, k) && p == Padding::same(p.top) {
                klein_kernels::conv2d(&x.to_dtype(dt)?, weights, fused, self.call(p.top))?
            } else {
                // Input rows of the band in padded coordinates, then clipped to the real rows.
                let start = r0 * self.stride;
                let end = (r1 - 1) * self.stride + k;
                let lo = start.max(p.top) - p.top;
                let hi = end.min(p.top + h).max(p.top) - p.top;
                let pad_top = p.top.saturating_sub(start);
                let pad_bottom = end.saturating_sub(p.top + h);
                let band = PadRows {
                    row0: lo,
                    rows: hi - lo,
                    top: pad_top,
                    bottom: pad_bottom,
                    left: p.left,
                    right: p.right,
                };
                let rows = klein_kernels::pad_rows(x, band)?.to_dtype(dt)?;
                klein_kernels::conv2d(&rows, weights, fused, self.call(0))?
            };
        let y = y.to_dtype(x.dtype())?;
        match residual.filter(|_| !fuse) {
            Some(r) => r + y,
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::Chunking;

    fn vb_from(tensors: Vec<(&str, Tensor)>) -> VarBuilder<'static> {
        let map = tensors
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
    }

    fn cfg(op_bytes: u64) -> Config {
        Config {
            chunking: Chunking {
                attention_bytes: 1 << 20,
                op_bytes,
                ..Chunking::default()
            },
            ..Config::default()
        }
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

    #[test]
    fn banded_convolution_equals_one_shot_for_every_padding_and_stride() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 5, 13, 11), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (7, 5, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., 7, &dev).unwrap();
        let cases = [
            (1, Padding::same(1)),
            (
                2,
                Padding {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                },
            ),
            (1, Padding::same(0)),
        ];
        for (stride, padding) in cases {
            let vb = vb_from(vec![("weight", w.clone()), ("bias", bias.clone())]);
            let whole = Conv2d::new(&cfg(1 << 30), (5, 7, 3), stride, padding, vb.clone()).unwrap();
            let banded = Conv2d::new(&cfg(1), (5, 7, 3), stride, padding, vb).unwrap();
            let padded = x
                .pad_with_zeros(2, padding.top, padding.bottom)
                .unwrap()
                .pad_with_zeros(3, padding.left, padding.right)
                .unwrap();
            let want = padded
                .conv2d(&w, 0, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 7, 1, 1)).unwrap())
                .unwrap();
            let a = whole.forward(&x).unwrap();
            let b = banded.forward(&x).unwrap();
            assert_eq!(a.dims(), want.dims());
            assert_eq!(b.dims(), want.dims());
            assert!(max_diff(&a, &want) < 1e-5, "stride {stride} {padding:?}");
            assert!(
                max_diff(&b, &want) < 1e-5,
                "banded stride {stride} {padding:?}"
            );
            // The residual joins each band where it is computed.
            let r = Tensor::randn(0f32, 1., want.dims(), &dev).unwrap();
            let want = (&want + &r).unwrap();
            for conv in [&whole, &banded] {
                let got = conv.forward_add(&x, Some(&r)).unwrap();
                assert!(max_diff(&got, &want) < 1e-5, "residual, stride {stride}");
            }
        }
    }

    #[test]
    fn band_plans_respect_the_limit() {
        let s = ConvShape {
            batch: 1,
            c_in: 256,
            c_out: 128,
            kernel: 3,
            stride: 1,
            in_w: 1024,
            out_w: 1024,
            out_h: 1024,
            im2col: true,
            copies: BandCopies::new(false, ConvPrecision::Exact),
        };
        let rows = s.band_rows(2, 4, 128 << 20);
        assert!(rows > 1 && rows < 1024, "{rows}");
        assert!(s.temp_bytes(2, 4, 128 << 20) <= 128 << 20);
        assert_eq!(s.band_rows(2, 4, 1), 1, "at least one row");
        // Without im2col rows (cuDNN) a band of the same budget covers more output rows.
        let direct = ConvShape { im2col: false, ..s };
        assert!(direct.band_rows(2, 4, 128 << 20) > 3 * rows);
        assert!(direct.temp_bytes(2, 4, 128 << 20) <= 128 << 20);
    }

    #[test]
    fn only_split_tf32_convolutions_drop_to_one_tf32_pass() {
        use ConvPrecision::{Exact, SplitTf32, Tf32};
        let w = Tensor::randn(0f32, 1., (7, 5, 3, 3), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1., 7, &Device::Cpu).unwrap();
        for (own, runs) in [(SplitTf32, Tf32), (Exact, Exact), (Tf32, Tf32)] {
            let mut cfg = cfg(1 << 30);
            cfg.chunking.conv_precision = own;
            let vb = vb_from(vec![("weight", w.clone()), ("bias", bias.clone())]);
            let conv = Conv2d::new(&cfg, (5, 7, 3), 1, Padding::same(1), vb).unwrap();
            let at = conv.one_tf32_pass();
            assert_eq!(at.call(1).precision, runs, "{own:?}");
            assert_eq!(
                at.weights.weight.id(),
                conv.weights.weight.id(),
                "the same weights"
            );
        }
    }

    #[test]
    fn winograd_and_fft_fall_back_where_cudnn_lacks_them() {
        use CudnnFwdAlgo::{Fft, ImplicitPrecompGemm, WinogradNonFused};
        let w = Some(WinogradNonFused);
        assert_eq!(supported_algo(w, 3, 1), w);
        assert_eq!(supported_algo(w, 1, 1), Some(ImplicitPrecompGemm));
        assert_eq!(supported_algo(w, 3, 2), Some(ImplicitPrecompGemm));
        assert_eq!(supported_algo(Some(Fft), 1, 1), Some(Fft));
        assert_eq!(supported_algo(Some(Fft), 3, 2), Some(ImplicitPrecompGemm));
        assert_eq!(supported_algo(None, 3, 2), None, "cuDNN's own choice stays");
    }
}
