//! cuDNN's side of [`super::conv2d`]. Exact: the NCHW output filled with `bias (+ residual)`,
//! then one FMA pass accumulating into it (β = 1). TF32: x transposed to NHWC (and split), one
//! tensor-core pass into an NHWC buffer (split TF32: the high parts; the low parts' one or two
//! fp16 passes into an fp16 buffer), then back to NCHW with the low parts, the bias and the
//! residual. TF32 may run in bands of output rows (stride 1, [`super::conv2d_banded`]): each band
//! transposes only the window of input rows it reads and writes its rows of the one output, so
//! its buffers cover the band alone and no band is copied out or in.

use std::{cell::RefCell, collections::HashMap, sync::Arc};

use candle_core::backend::BackendStorage;
use candle_core::conv::CudnnFwdAlgo;
use candle_core::cuda::CudaDType;
use candle_core::cuda::cudarc::cudnn::{
    ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor, TensorDescriptor, sys,
};
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor, bail};
use half::f16;

use super::{Conv, ConvPrecision, CudnnConv, W_LO_SCALE};
use crate::cuda::{ELEMENTWISE, plane_grid, view};

/// Split TF32's scale of the low parts in fp16 (x_lo and the low passes' output; x_hi is
/// divided by it), a power of two: x_lo, below 2⁻¹⁰ of x, stays clear of fp16's subnormals.
const LO_SCALE: f32 = 256.0;

thread_local! {
    /// cuDNN handles are neither Send nor Sync: one per thread and device, bound to the
    /// device's stream.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

/// What a convolution's workspace size depends on: device, operand type, layout and math type
/// (cuDNN's enums), x, the filter (C_out, k_h, k_w), padding, stride, algorithm.
type WorkspaceKey = (
    DeviceId,
    [u32; 3],
    [usize; 4],
    [usize; 3],
    usize,
    usize,
    u32,
);

thread_local! {
    /// cuDNN's workspace query costs ~0.15 ms of host time a call on an H200, as much as the
    /// convolution's launch: a banded decode makes ~500 calls. The answers, per shape.
    static WORKSPACES: RefCell<HashMap<WorkspaceKey, usize>> = RefCell::new(HashMap::new());
}

/// Shapes whose workspace size a thread remembers (a 1024² decode has ~60).
const MAX_WORKSPACE_SHAPES: usize = 4096;

/// The workspace of `key`'s convolution, from the cache or from `query`.
fn workspace_bytes(
    key: WorkspaceKey,
    query: impl FnOnce() -> std::result::Result<usize, candle_core::cuda::cudarc::cudnn::CudnnError>,
) -> Result<usize> {
    if let Some(bytes) = WORKSPACES.with(|w| w.borrow().get(&key).copied()) {
        return Ok(bytes);
    }
    let bytes = query().map_err(candle_core::Error::wrap)?.max(1);
    WORKSPACES.with(|w| {
        let mut w = w.borrow_mut();
        // Every image size and band height is a shape: bound the cache, start over when full.
        if w.len() >= MAX_WORKSPACE_SHAPES {
            w.clear();
        }
        w.insert(key, bytes);
    });
    Ok(bytes)
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

fn algorithm(a: CudnnFwdAlgo) -> sys::cudnnConvolutionFwdAlgo_t {
    use sys::cudnnConvolutionFwdAlgo_t as A;
    match a {
        CudnnFwdAlgo::ImplicitGemm => A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        CudnnFwdAlgo::ImplicitPrecompGemm => A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        CudnnFwdAlgo::Gemm => A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        CudnnFwdAlgo::Direct => A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        CudnnFwdAlgo::Fft => A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        CudnnFwdAlgo::FftTiling => A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        CudnnFwdAlgo::Winograd => A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        CudnnFwdAlgo::WinogradNonFused => A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        CudnnFwdAlgo::Count => A::CUDNN_CONVOLUTION_FWD_ALGO_COUNT,
    }
}

/// The elements of a contiguous CUDA tensor's storage.
fn device_view<'a, T: CudaDType + DeviceRepr>(
    s: &'a Storage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    match s {
        Storage::Cuda(c) if l.is_contiguous() => view::<T>(c, l),
        _ => bail!(
            "cudnn conv2d: {:?} must be a contiguous CUDA tensor",
            l.shape()
        ),
    }
}

pub fn conv_forward(
    op: &CudnnConv,
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (n, c_in, h, w) = xl.shape().dims4()?;
    let (c_out, w_in, kh, kw) = match (op.nhwc, wl.shape().dims4()?) {
        (true, (k, r, s, c)) => (k, c, r, s),
        (false, dims) => dims,
    };
    let (p, s) = (op.conv.padding, op.conv.stride);
    if w_in != c_in
        || op.nhwc != (op.conv.precision != ConvPrecision::Exact)
        || bl.shape().dims1()? != c_out
        || !(xl.is_contiguous() && wl.is_contiguous() && bl.is_contiguous())
        || h + 2 * p < kh
        || w + 2 * p < kw
        || s == 0
    {
        bail!(
            "cudnn conv2d: x {:?}, weight {:?} (nhwc {}), bias {:?}, padding {p}, stride {s}, {:?} do not fit",
            xl.shape(),
            wl.shape(),
            op.nhwc,
            bl.shape(),
            op.conv.precision
        );
    }
    if op.subpixel
        && (!op.nhwc
            || !op.prologue.is_identity()
            || op.residual.is_some()
            || (kh, kw, p, s) != (2, 2, 1, 1)
            || c_out % 8 != 0)
    {
        bail!(
            "cudnn conv2d: upsampling phases need TF32 arithmetic, 2×2 filters with padding 1, \
             4 phases of an even channel count ({c_out}), no prologue and no residual"
        );
    }
    if !op.prologue.is_identity() && !op.nhwc {
        bail!("cudnn conv2d: a prologue needs TF32 arithmetic");
    }
    let affine_storage = op.prologue.affine.as_ref().map(|(scale, shift, silu)| {
        (
            scale.storage_and_layout(),
            shift.storage_and_layout(),
            *silu,
        )
    });
    let affine = match &affine_storage {
        Some(((ss, sl), (hs, hl), silu)) => {
            if sl.shape().dims() != [n, c_in] || hl.shape().dims() != [n, c_in] {
                bail!(
                    "cudnn conv2d: prologue affine {:?} / {:?} for x {:?}",
                    sl.shape(),
                    hl.shape(),
                    xl.shape()
                );
            }
            Some((
                device_view::<f32>(ss, sl)?,
                device_view::<f32>(hs, hl)?,
                *silu,
            ))
        }
        None => None,
    };
    let (oh, ow) = ((h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1);
    let shape = match op.subpixel {
        true => Shape::from((n, c_out / 4, 2 * h, 2 * w)),
        false => Shape::from((n, c_out, oh, ow)),
    };
    let residual = op.residual.as_ref().map(Tensor::storage_and_layout);
    if let Some((_, rl)) = &residual
        && rl.shape() != &shape
    {
        bail!("cudnn conv2d: residual {:?}, output {shape:?}", rl.shape());
    }
    let residual = residual
        .as_ref()
        .map(|(r, rl)| device_view::<f32>(r, rl))
        .transpose()?;
    let dev = xs.device().clone();
    let cudnn = handle(&dev)?;
    let (format, math) = if op.nhwc {
        let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        (nhwc, sys::cudnnMathType_t::CUDNN_DEFAULT_MATH)
    } else {
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        (nchw, sys::cudnnMathType_t::CUDNN_FMA_MATH)
    };
    let x = view::<f32>(xs, xl)?;
    let weight = view::<f32>(ws, wl)?;
    let bias = view::<f32>(bs, bl)?;
    let mut out = unsafe { dev.alloc::<f32>(shape.elem_count())? };
    if !op.nhwc {
        let geometry = ([n, c_in, h, w], [c_out, kh, kw]);
        let mut plan = ConvPlan::<f32>::new(&dev, &cudnn, &op.conv, (format, math), geometry)?;
        fill(&dev, &bias, residual.as_ref(), &mut out, c_out, oh * ow)?;
        plan.pass(&x, &weight, (1.0, 1.0), &mut out)?;
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    // Upsampling phases band x's (the output's low-resolution) rows.
    let out_rows = if op.subpixel { h } else { oh };
    let rows = if s == 1 {
        op.band_rows.clamp(1, out_rows)
    } else {
        out_rows
    };
    let bands = Bands {
        dev: &dev,
        cudnn: &cudnn,
        format,
        math,
        x: (&x, xl.start_offset()),
        weight: &weight,
        bias: &bias,
        affine: affine.as_ref(),
        residual: residual.as_ref(),
        dims: (n, c_in, h, w),
        filter: (c_out, kh, kw),
        out_w: ow,
    };
    for r0 in (0..out_rows).step_by(rows) {
        bands.run(op, (r0, (r0 + rows).min(out_rows)), oh, &mut out)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// The operands of a TF32 convolution run in bands of output rows.
struct Bands<'a> {
    dev: &'a CudaDevice,
    cudnn: &'a Arc<Cudnn>,
    format: sys::cudnnTensorFormat_t,
    math: sys::cudnnMathType_t,
    /// x from its first element, and that element's offset in its storage.
    x: (&'a CudaView<'a, f32>, usize),
    weight: &'a CudaView<'a, f32>,
    bias: &'a CudaView<'a, f32>,
    affine: Option<&'a Affine<'a>>,
    residual: Option<&'a CudaView<'a, f32>>,
    /// x's (N, C_in, H, W).
    dims: (usize, usize, usize, usize),
    /// (C_out, k_h, k_w).
    filter: (usize, usize, usize),
    out_w: usize,
}

impl Bands<'_> {
    /// Output rows `[r0, r1)` of `out` (upsampling phases: low-resolution rows, output rows
    /// `[2 r0, 2 r1)`), of the convolution's `oh`. A band of part of the rows (stride 1) needs
    /// the convolution's rows `[q0, q1)` (r0, r1; phases: r0, r1 + 1); it transposes the window
    /// of input rows they read, `[q0 − p, q1 − 1 − p + k_h)` clipped to x, and convolves it with
    /// the same padding p: the window's output row j is the convolution's row `window start +
    /// j` (its zero rows stand for rows outside the image only where the window is clipped),
    /// so the band keeps rows `q0 − window start ..` of its output.
    fn run(
        &self,
        op: &CudnnConv,
        (r0, r1): (usize, usize),
        oh: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (n, c_in, h, w) = self.dims;
        let (c_out, kh, kw) = self.filter;
        let (p, s, ow) = (op.conv.padding, op.conv.stride, self.out_w);
        let (q0, q1) = (r0, r1 + usize::from(op.subpixel));
        let (a, b) = if (q0, q1) == (0, oh) {
            (0, h)
        } else {
            (q0.saturating_sub(p), (q1 - 1 + kh - p).min(h))
        };
        let window = b - a;
        let window_oh = (window + 2 * p - kh) / s + 1;
        let dev = self.dev;
        let geometry = ([n, c_in, window, w], [c_out, kh, kw]);
        let mut plan = ConvPlan::<f32>::new(
            dev,
            self.cudnn,
            &op.conv,
            (self.format, self.math),
            geometry,
        )?;
        let x = self.x.0.slice(a * w..);
        let len = n * c_in * window * w;
        let mut y = unsafe { dev.alloc::<f32>(n * c_out * window_oh * ow)? };
        let window_at = Window {
            offset: self.x.1 + a * w,
            plane: h * w,
        };
        let y_lo = match &op.half_weights {
            None => {
                let mut x_nhwc = unsafe { dev.alloc::<f32>(len)? };
                to_nhwc(
                    dev,
                    (&x, window_at),
                    self.affine,
                    Nhwc::Whole(&mut x_nhwc),
                    (n, c_in, window, w),
                )?;
                plan.pass(&x_nhwc, self.weight, (1.0, 0.0), &mut y)?;
                None
            }
            Some((w_hi, w_lo)) => {
                let mut hi = unsafe { dev.alloc::<f32>(len)? };
                let mut lo = unsafe { dev.alloc::<f16>(len)? };
                let mut hi16 = match w_lo {
                    Some(_) => Some(unsafe { dev.alloc::<f16>(len)? }),
                    None => None,
                };
                let parts = Nhwc::Split {
                    hi: &mut hi,
                    lo: &mut lo,
                    hi16: hi16.as_mut(),
                };
                to_nhwc(
                    dev,
                    (&x, window_at),
                    self.affine,
                    parts,
                    (n, c_in, window, w),
                )?;
                plan.pass(&hi, self.weight, (1.0, 0.0), &mut y)?;
                drop(hi);
                // Default math runs fp16 data on a non-tensor-core kernel (10× slower on an H200).
                let tensor_op = (self.format, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH);
                let mut half =
                    ConvPlan::<f16>::new(dev, self.cudnn, &op.conv, tensor_op, geometry)?;
                let mut y_lo = unsafe { dev.alloc::<f16>(n * c_out * window_oh * ow)? };
                let (w_hi, wl) = w_hi.storage_and_layout();
                let one = (f16::ONE, f16::ZERO);
                half.pass(&lo, &device_view::<f16>(&w_hi, wl)?, one, &mut y_lo)?;
                if let (Some(hi16), Some(w_lo)) = (&hi16, w_lo) {
                    let (w_lo, ll) = w_lo.storage_and_layout();
                    // x_hi / LO_SCALE and w_lo · W_LO_SCALE: the product back to y_lo's LO_SCALE.
                    let alpha = f64::from(LO_SCALE) * f64::from(LO_SCALE) / W_LO_SCALE;
                    let scale = (f16::from_f64(alpha), f16::ONE);
                    half.pass(hi16, &device_view::<f16>(&w_lo, ll)?, scale, &mut y_lo)?;
                }
                Some(y_lo)
            }
        };
        if op.subpixel {
            let rows = PhaseRows {
                first: r0,
                count: r1 - r0,
                y_rows: window_oh,
                y_row0: a,
            };
            return to_nchw_subpixel(
                dev,
                (&y, y_lo.as_ref()),
                self.bias,
                out,
                (n, c_out / 4, h, w),
                rows,
            );
        }
        let residual_offset = op
            .residual
            .as_ref()
            .map_or(0, |r| r.layout().start_offset());
        let rows = OutputRows {
            skip: (r0 - a) * ow,
            y_hw: window_oh * ow,
            at: r0 * ow,
            plane: oh * ow,
        };
        to_nchw(
            dev,
            (&y, y_lo.as_ref()),
            self.bias,
            self.residual.map(|r| (r, residual_offset)),
            out,
            (n, c_out, (r1 - r0) * ow),
            rows,
        )
    }
}

/// One convolution on cuDNN with operands and output of type `T` and f32 arithmetic: its
/// descriptors, algorithm and workspace, for passes over several operand pairs (split TF32's
/// high part in f32, its low parts in fp16).
struct ConvPlan<T: CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: CudaSlice<u8>,
}

impl<T: CudnnDataType> ConvPlan<T> {
    fn new(
        dev: &CudaDevice,
        cudnn: &Arc<Cudnn>,
        conv: &Conv,
        (format, math): (sys::cudnnTensorFormat_t, sys::cudnnMathType_t),
        ([n, c_in, h, w], [c_out, kh, kw]): ([usize; 4], [usize; 3]),
    ) -> Result<Self> {
        let wrap = candle_core::Error::wrap;
        let (p, s) = (conv.padding, conv.stride);
        let mut desc = cudnn
            .create_conv2d::<f32>(
                [p as i32, p as i32],
                [s as i32, s as i32],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(wrap)?;
        desc.set_math_type(math).map_err(wrap)?;
        let dims =
            |a: usize, b: usize, c: usize, d: usize| [a as i32, b as i32, c as i32, d as i32];
        let (oh, ow) = ((h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1);
        let x = cudnn
            .create_4d_tensor::<T>(format, dims(n, c_in, h, w))
            .map_err(wrap)?;
        let wd = cudnn
            .create_4d_filter::<T>(format, dims(c_out, c_in, kh, kw))
            .map_err(wrap)?;
        let y = cudnn
            .create_4d_tensor::<T>(format, dims(n, c_out, oh, ow))
            .map_err(wrap)?;
        let fwd = ConvForward {
            conv: &desc,
            x: &x,
            w: &wd,
            y: &y,
        };
        let algo = match conv.algo {
            Some(a) => algorithm(a),
            None => fwd.pick_algorithm().map_err(wrap)?,
        };
        let kinds = [T::DATA_TYPE as u32, format as u32, math as u32];
        let key = (
            dev.id(),
            kinds,
            [n, c_in, h, w],
            [c_out, kh, kw],
            p,
            s,
            algo as u32,
        );
        let bytes = workspace_bytes(key, || fwd.get_workspace_size(algo))?;
        let workspace = unsafe { dev.alloc::<u8>(bytes)? };
        Ok(Self {
            conv: desc,
            x,
            w: wd,
            y,
            algo,
            workspace,
        })
    }

    /// `y = alpha · conv(x, w) + beta · y`.
    fn pass(
        &mut self,
        x: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        (alpha, beta): (T, T),
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let fwd = ConvForward {
            conv: &self.conv,
            x: &self.x,
            w: &self.w,
            y: &self.y,
        };
        unsafe { fwd.launch(self.algo, Some(&mut self.workspace), (alpha, beta), x, w, y) }
            .map_err(candle_core::Error::wrap)
    }
}

/// `out = bias (+ residual)`, NCHW.
fn fill(
    dev: &CudaDevice,
    bias: &CudaView<'_, f32>,
    residual: Option<&CudaView<'_, f32>>,
    out: &mut CudaSlice<f32>,
    channels: usize,
    hw: usize,
) -> Result<()> {
    let total = out.len();
    let planes = total.checked_div(hw).unwrap_or(0);
    let (channels, hw_arg) = (channels as i32, hw as i64);
    let name = match residual {
        Some(_) => "conv_bias_residual_fill_f32",
        None => "conv_bias_fill_f32",
    };
    let f = dev.get_or_load_custom_func(name, ELEMENTWISE.name, ELEMENTWISE.ptx)?;
    let mut l = f.builder();
    l.arg(bias);
    if let Some(r) = residual {
        l.arg(r);
    }
    l.arg(out).arg(&channels).arg(&hw_arg);
    unsafe { l.launch(plane_grid(planes, hw)) }.w()?;
    Ok(())
}

/// Tiles of 64 pixels × 32 channels per block over (pixels, channels, batch), 256 threads.
fn tiles((n, c, hw): (usize, usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (hw.div_ceil(64) as u32, c.div_ceil(32) as u32, n as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The transposes' kernel `name`, or its `_pairs` variant (two neighbours per 8-byte or
/// 4-byte access) where `c` and `hw` are even and every operand starts at an even element.
fn transpose_kernel(name: &str, (c, hw): (usize, usize), offsets: &[usize]) -> String {
    if c % 2 == 0 && hw % 2 == 0 && offsets.iter().all(|o| o % 2 == 0) {
        format!("{name}_pairs")
    } else {
        name.to_owned()
    }
}

/// An affine prologue's (scale, shift) and SiLU flag.
type Affine<'a> = (CudaView<'a, f32>, CudaView<'a, f32>, bool);

/// Where [`to_nhwc`] writes: x whole, or split TF32's parts (x_hi in f32; x_lo · [`LO_SCALE`]
/// in fp16; x_hi / [`LO_SCALE`] in fp16 where a `w_lo` pass needs it).
enum Nhwc<'a> {
    Whole(&'a mut CudaSlice<f32>),
    Split {
        hi: &'a mut CudaSlice<f32>,
        lo: &'a mut CudaSlice<f16>,
        hi16: Option<&'a mut CudaSlice<f16>>,
    },
}

/// Where a window of whole rows lies in its NCHW tensor: the element offset of its first
/// element in the storage, and the tensor's plane (H · W).
#[derive(Debug, Clone, Copy)]
struct Window {
    offset: usize,
    plane: usize,
}

/// A window of x (N, C, H, W rows, starting where `x` starts), through the prologue's affine
/// where given, → NHWC in `out`.
fn to_nhwc(
    dev: &CudaDevice,
    (x, at): (&CudaView<'_, f32>, Window),
    affine: Option<&Affine<'_>>,
    out: Nhwc<'_>,
    (n, c, h, w): (usize, usize, usize, usize),
) -> Result<()> {
    let name = match out {
        Nhwc::Whole(_) => "nchw_to_nhwc_f32",
        Nhwc::Split { .. } => "nchw_to_nhwc_split_f32",
    };
    let name = transpose_kernel(name, (c, h * w), &[at.offset, at.plane]);
    let f = dev.get_or_load_custom_func(&name, ELEMENTWISE.name, ELEMENTWISE.ptx)?;
    // The kernel takes null pointers for "no affine" and "no fp16 x_hi".
    let none = 0u64;
    let silu = i32::from(affine.is_some_and(|a| a.2));
    let (c_arg, h_arg, w_arg) = (c as i32, h as i32, w as i32);
    let mut l = f.builder();
    l.arg(x);
    match affine {
        Some((scale, shift, _)) => l.arg(scale).arg(shift),
        None => l.arg(&none).arg(&none),
    };
    l.arg(&silu);
    match out {
        Nhwc::Whole(out) => {
            l.arg(out);
        }
        Nhwc::Split { hi, lo, hi16 } => {
            l.arg(hi).arg(lo);
            match hi16 {
                Some(hi16) => l.arg(hi16),
                None => l.arg(&none),
            };
            l.arg(&LO_SCALE);
        }
    }
    let plane = at.plane as i64;
    l.arg(&c_arg).arg(&h_arg).arg(&w_arg).arg(&plane);
    unsafe { l.launch(tiles((n, c, h * w))) }.w()?;
    Ok(())
}

/// [`super::upsample_conv2d`]'s phases y (N, y_rows · (W + 1), 4C) (+ y_lo / [`LO_SCALE`])
/// → `rows` of `out` (N, C, 2H, 2W) + bias, for dims (N, C, H, W).
fn to_nchw_subpixel(
    dev: &CudaDevice,
    (y, y_lo): (&CudaSlice<f32>, Option<&CudaSlice<f16>>),
    bias: &CudaView<'_, f32>,
    out: &mut CudaSlice<f32>,
    (n, c, h, w): (usize, usize, usize, usize),
    rows: PhaseRows,
) -> Result<()> {
    let f = dev.get_or_load_custom_func(
        "nhwc_subpixel_to_nchw_bias_f32",
        ELEMENTWISE.name,
        ELEMENTWISE.ptx,
    )?;
    let none = 0u64;
    let (c_arg, h_arg, w_arg) = (c as i32, h as i32, w as i32);
    let mut l = f.builder();
    l.arg(y);
    match y_lo {
        Some(y_lo) => l.arg(y_lo),
        None => l.arg(&none),
    };
    l.arg(&LO_SCALE).arg(bias).arg(out);
    l.arg(&c_arg).arg(&h_arg).arg(&w_arg);
    let (first, y_rows, y_row0) = (rows.first as i32, rows.y_rows as i32, rows.y_row0 as i32);
    l.arg(&first).arg(&y_rows).arg(&y_row0);
    let cfg = LaunchConfig {
        grid_dim: (
            w.div_ceil(32) as u32,
            2 * rows.count as u32,
            (n * c.div_ceil(32)) as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { l.launch(cfg) }.w()?;
    Ok(())
}

/// Which low-resolution rows a band of upsampling phases writes ([`to_nchw_subpixel`]): `count`
/// from row `first`, from its phases y, which hold `y_rows` rows per image from the
/// convolution's row `y_row0` on.
#[derive(Debug, Clone, Copy)]
struct PhaseRows {
    first: usize,
    count: usize,
    y_rows: usize,
    y_row0: usize,
}

/// Which of a convolution band's NHWC output pixels [`to_nchw`] moves where: from pixel `skip`
/// of the `y_hw` each image holds, to pixel `at` of out's planes, which are `plane` apart.
#[derive(Debug, Clone, Copy)]
struct OutputRows {
    skip: usize,
    y_hw: usize,
    at: usize,
    plane: usize,
}

/// `dims.2` pixels of y (N, y_hw, C) (+ y_lo / [`LO_SCALE`]) → `out` (N, C, plane) + bias (+
/// residual, laid out as `out`, its storage starting at the element offset given), as `rows`
/// places them.
fn to_nchw(
    dev: &CudaDevice,
    (y, y_lo): (&CudaSlice<f32>, Option<&CudaSlice<f16>>),
    bias: &CudaView<'_, f32>,
    residual: Option<(&CudaView<'_, f32>, usize)>,
    out: &mut CudaSlice<f32>,
    dims: (usize, usize, usize),
    rows: OutputRows,
) -> Result<()> {
    let (c, hw) = (dims.1 as i32, dims.2 as i64);
    let name = match residual {
        Some(_) => "nhwc_to_nchw_bias_residual_f32",
        None => "nhwc_to_nchw_bias_f32",
    };
    let offsets = [residual.map_or(0, |r| r.1) + rows.at, rows.at, rows.plane];
    let name = transpose_kernel(name, (dims.1, dims.2), &offsets);
    let f = dev.get_or_load_custom_func(&name, ELEMENTWISE.name, ELEMENTWISE.ptx)?;
    let none = 0u64;
    let residual = residual.map(|(r, _)| r.slice(rows.at..));
    let mut out = out.slice_mut(rows.at..);
    let (y_hw, skip, plane) = (rows.y_hw as i64, rows.skip as i64, rows.plane as i64);
    let mut l = f.builder();
    l.arg(y);
    match y_lo {
        Some(y_lo) => l.arg(y_lo),
        None => l.arg(&none),
    };
    l.arg(&LO_SCALE).arg(bias);
    if let Some(r) = &residual {
        l.arg(r);
    }
    l.arg(&mut out).arg(&c).arg(&hw);
    l.arg(&y_hw).arg(&skip).arg(&plane);
    unsafe { l.launch(tiles(dims)) }.w()?;
    Ok(())
}
