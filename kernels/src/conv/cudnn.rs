//! cuDNN's side of [`super::conv2d`]. Exact: the NCHW output filled with `bias (+ residual)`,
//! then one FMA pass accumulating into it (β = 1). TF32: x transposed to NHWC (and split), one
//! to three tensor-core passes into an NHWC buffer, then back to NCHW with the bias and the
//! residual.

use std::{cell::RefCell, collections::HashMap, sync::Arc};

use candle_core::backend::BackendStorage;
use candle_core::conv::CudnnFwdAlgo;
use candle_core::cuda::cudarc::cudnn::{ConvForward, Cudnn, sys};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::{DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor, bail};

use super::{ConvPrecision, CudnnConv};
use crate::cuda::{ELEMENTWISE, plane_grid, view};

thread_local! {
    /// cuDNN handles are neither Send nor Sync: one per thread and device, bound to the
    /// device's stream.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
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

/// The f32 elements of a contiguous CUDA tensor's storage.
fn f32_view<'a>(s: &'a Storage, l: &Layout) -> Result<CudaView<'a, f32>> {
    match s {
        Storage::Cuda(c) if l.is_contiguous() => view::<f32>(c, l),
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
    // The prologue's upsampling doubles the convolution's input.
    let up = usize::from(op.prologue.upsample) + 1;
    let (h, w) = (h * up, w * up);
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
    if !op.prologue.is_identity() && (!op.nhwc || h * w > i32::MAX as usize) {
        bail!(
            "cudnn conv2d: a prologue needs TF32 arithmetic and fewer than 2³¹ pixels ({h} × {w})"
        );
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
            Some((f32_view(ss, sl)?, f32_view(hs, hl)?, *silu))
        }
        None => None,
    };
    let (oh, ow) = ((h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1);
    let shape = Shape::from((n, c_out, oh, ow));
    let residual = op.residual.as_ref().map(Tensor::storage_and_layout);
    if let Some((_, rl)) = &residual
        && rl.shape() != &shape
    {
        bail!("cudnn conv2d: residual {:?}, output {shape:?}", rl.shape());
    }
    let residual = residual
        .as_ref()
        .map(|(r, rl)| f32_view(r, rl))
        .transpose()?;
    let dev = xs.device().clone();
    let cudnn = handle(&dev)?;
    let wrap = candle_core::Error::wrap;
    let (pi, si) = (p as i32, s as i32);
    let mut conv = cudnn
        .create_conv2d::<f32>(
            [pi, pi],
            [si, si],
            [1, 1],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(wrap)?;
    conv.set_math_type(if op.nhwc {
        sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    })
    .map_err(wrap)?;
    let format = if op.nhwc {
        sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
    } else {
        sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
    };
    let dims = |a: usize, b: usize, c: usize, d: usize| [a as i32, b as i32, c as i32, d as i32];
    let x_desc = cudnn
        .create_4d_tensor::<f32>(format, dims(n, c_in, h, w))
        .map_err(wrap)?;
    let w_desc = cudnn
        .create_4d_filter::<f32>(format, dims(c_out, c_in, kh, kw))
        .map_err(wrap)?;
    let y_desc = cudnn
        .create_4d_tensor::<f32>(format, dims(n, c_out, oh, ow))
        .map_err(wrap)?;
    let fwd = ConvForward {
        conv: &conv,
        x: &x_desc,
        w: &w_desc,
        y: &y_desc,
    };
    let algo = match op.conv.algo {
        Some(a) => algorithm(a),
        None => fwd.pick_algorithm().map_err(wrap)?,
    };
    let mut workspace =
        unsafe { dev.alloc::<u8>(fwd.get_workspace_size(algo).map_err(wrap)?.max(1))? };
    let mut pass =
        |x: &CudaView<'_, f32>, weight: &CudaView<'_, f32>, beta: f32, y: &mut CudaSlice<f32>| {
            unsafe { fwd.launch(algo, Some(&mut workspace), (1f32, beta), x, weight, y) }
                .map_err(wrap)
        };

    let total = shape.elem_count();
    let x = view::<f32>(xs, xl)?;
    let weight = view::<f32>(ws, wl)?;
    let bias = view::<f32>(bs, bl)?;
    let mut out = unsafe { dev.alloc::<f32>(total)? };
    if !op.nhwc {
        fill(&dev, &bias, residual.as_ref(), &mut out, c_out, oh * ow)?;
        pass(&x, &weight, 1.0, &mut out)?;
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let len = n * c_in * h * w;
    let split = op.conv.precision == ConvPrecision::SplitTf32;
    let mut parts = unsafe { dev.alloc::<f32>(if split { 2 * len } else { len })? };
    let prologue = (affine.as_ref(), op.prologue.upsample);
    to_nhwc(&dev, &x, prologue, &mut parts, split, (n, c_in, h, w))?;
    let mut y = unsafe { dev.alloc::<f32>(total)? };
    let (x_hi, x_lo) = parts.split_at(len);
    pass(&x_hi, &weight, 0.0, &mut y)?;
    if split {
        pass(&x_lo, &weight, 1.0, &mut y)?;
        if let Some(lo) = &op.weight_lo {
            let (lo, ll) = lo.storage_and_layout();
            pass(&x_hi, &f32_view(&lo, ll)?, 1.0, &mut y)?;
        }
    }
    drop(parts);
    to_nchw(
        &dev,
        &y,
        &bias,
        residual.as_ref(),
        &mut out,
        (n, c_out, oh * ow),
    )?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
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

/// Tiles of 32 pixels × 32 channels per block over (pixels, channels, batch).
fn tiles((n, c, hw): (usize, usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (hw.div_ceil(32) as u32, c.div_ceil(32) as u32, n as u32),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// An affine prologue's (scale, shift) and SiLU flag.
type Affine<'a> = (CudaView<'a, f32>, CudaView<'a, f32>, bool);

/// x (N, C, H, W), through the prologue (an affine, an upsampling to the output's H × W), →
/// NHWC in `out`, split into `[hi | lo]` when `split`.
fn to_nhwc(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    (affine, upsample): (Option<&Affine<'_>>, bool),
    out: &mut CudaSlice<f32>,
    split: bool,
    (n, c, h, w): (usize, usize, usize, usize),
) -> Result<()> {
    let name = if split {
        "nchw_to_nhwc_split_f32"
    } else {
        "nchw_to_nhwc_f32"
    };
    let f = dev.get_or_load_custom_func(name, ELEMENTWISE.name, ELEMENTWISE.ptx)?;
    let len = n * c * h * w;
    let (mut hi, mut lo) = out.split_at_mut(len);
    // The kernel takes null pointers for "no affine".
    let none = 0u64;
    let silu = i32::from(affine.is_some_and(|a| a.2));
    let (upsample, c_arg, h_arg, w_arg) = (i32::from(upsample), c as i32, h as i32, w as i32);
    let mut l = f.builder();
    l.arg(x);
    match affine {
        Some((scale, shift, _)) => l.arg(scale).arg(shift),
        None => l.arg(&none).arg(&none),
    };
    l.arg(&silu).arg(&upsample).arg(&mut hi);
    if split {
        l.arg(&mut lo);
    }
    l.arg(&c_arg).arg(&h_arg).arg(&w_arg);
    unsafe { l.launch(tiles((n, c, h * w))) }.w()?;
    Ok(())
}

/// y (N, HW, C) → `out` (N, C, HW) + bias (+ residual).
fn to_nchw(
    dev: &CudaDevice,
    y: &CudaSlice<f32>,
    bias: &CudaView<'_, f32>,
    residual: Option<&CudaView<'_, f32>>,
    out: &mut CudaSlice<f32>,
    dims: (usize, usize, usize),
) -> Result<()> {
    let (c, hw) = (dims.1 as i32, dims.2 as i64);
    let name = match residual {
        Some(_) => "nhwc_to_nchw_bias_residual_f32",
        None => "nhwc_to_nchw_bias_f32",
    };
    let f = dev.get_or_load_custom_func(name, ELEMENTWISE.name, ELEMENTWISE.ptx)?;
    let mut l = f.builder();
    l.arg(y).arg(bias);
    if let Some(r) = residual {
        l.arg(r);
    }
    l.arg(out).arg(&c).arg(&hw);
    unsafe { l.launch(tiles(dims)) }.w()?;
    Ok(())
}
