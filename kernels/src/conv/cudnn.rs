//! cuDNN's side of [`super::conv2d`]: the output filled with `bias (+ residual)`, then one to
//! three forward passes accumulating into it (β = 1), at the precision's math type.

use std::{cell::RefCell, collections::HashMap, sync::Arc};

use candle_core::backend::BackendStorage;
use candle_core::conv::CudnnFwdAlgo;
use candle_core::cuda::cudarc::cudnn::{ConvForward, Cudnn, sys};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda::{DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor, bail};

use super::{ConvPrecision, CudnnConv};
use crate::cuda::{ELEMENTWISE, grid_stride, view};

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

/// A contiguous f32 CUDA tensor's storage, for as long as the guard lives.
fn storage(t: &Tensor) -> Result<(candle_core::StorageRef<'_>, &Layout)> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cuda(_)) || !l.is_contiguous() {
        bail!(
            "cudnn conv2d: {:?} must be a contiguous CUDA tensor",
            l.shape()
        );
    }
    Ok((s, l))
}

fn cuda(s: &Storage) -> &CudaStorage {
    match s {
        Storage::Cuda(c) => c,
        _ => unreachable!("checked by storage()"),
    }
}

pub fn conv_forward(
    op: &CudnnConv,
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (n, c_in, h, w) = xl.shape().dims4()?;
    let (c_out, w_in, kh, kw) = wl.shape().dims4()?;
    let (p, s) = (op.conv.padding, op.conv.stride);
    if w_in != c_in
        || bl.shape().dims1()? != c_out
        || !(xl.is_contiguous() && wl.is_contiguous() && bl.is_contiguous())
        || h + 2 * p < kh
        || w + 2 * p < kw
        || s == 0
    {
        bail!(
            "cudnn conv2d: x {:?}, weight {:?}, bias {:?}, padding {p}, stride {s} do not fit",
            xl.shape(),
            wl.shape(),
            bl.shape()
        );
    }
    let (oh, ow) = ((h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1);
    let shape = Shape::from((n, c_out, oh, ow));
    let total = shape.elem_count();
    let dev = xs.device().clone();

    let mut y = unsafe { dev.alloc::<f32>(total)? };
    let bias = view::<f32>(bs, bl)?;
    let residual = op.residual.as_ref().map(storage).transpose()?;
    let (total_arg, channels, hw) = (total as i64, c_out as i32, (oh * ow) as i64);
    match &residual {
        Some((r, rl)) => {
            if rl.shape() != &shape {
                bail!("cudnn conv2d: residual {:?}, output {shape:?}", rl.shape());
            }
            let r = view::<f32>(cuda(r), rl)?;
            let f = dev.get_or_load_custom_func(
                "conv_bias_residual_fill_f32",
                ELEMENTWISE.name,
                ELEMENTWISE.ptx,
            )?;
            let mut l = f.builder();
            l.arg(&bias).arg(&r).arg(&mut y);
            l.arg(&total_arg).arg(&channels).arg(&hw);
            unsafe { l.launch(grid_stride(total)) }.w()?;
        }
        None => {
            let f = dev.get_or_load_custom_func(
                "conv_bias_fill_f32",
                ELEMENTWISE.name,
                ELEMENTWISE.ptx,
            )?;
            let mut l = f.builder();
            l.arg(&bias).arg(&mut y);
            l.arg(&total_arg).arg(&channels).arg(&hw);
            unsafe { l.launch(grid_stride(total)) }.w()?;
        }
    }

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
    conv.set_math_type(match op.conv.precision {
        ConvPrecision::Exact => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        ConvPrecision::Tf32 | ConvPrecision::SplitTf32 => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
    })
    .map_err(wrap)?;
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let dims = |a: usize, b: usize, c: usize, d: usize| [a as i32, b as i32, c as i32, d as i32];
    let x_desc = cudnn
        .create_4d_tensor::<f32>(nchw, dims(n, c_in, h, w))
        .map_err(wrap)?;
    let w_desc = cudnn
        .create_4d_filter::<f32>(nchw, dims(c_out, c_in, kh, kw))
        .map_err(wrap)?;
    let y_desc = cudnn
        .create_4d_tensor::<f32>(nchw, dims(n, c_out, oh, ow))
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
    let mut pass = |x: &CudaView<'_, f32>, weight: &CudaView<'_, f32>, y: &mut CudaSlice<f32>| {
        unsafe { fwd.launch(algo, Some(&mut workspace), (1f32, 1f32), x, weight, y) }.map_err(wrap)
    };

    let x = view::<f32>(xs, xl)?;
    let weight = view::<f32>(ws, wl)?;
    if op.conv.precision != ConvPrecision::SplitTf32 {
        pass(&x, &weight, &mut y)?;
    } else {
        let len = xl.shape().elem_count();
        let mut parts = unsafe { dev.alloc::<f32>(2 * len)? };
        super::cuda::split(&dev, &x, &mut parts, len)?;
        let (x_hi, x_lo) = parts.split_at(len);
        pass(&x_hi, &weight, &mut y)?;
        pass(&x_lo, &weight, &mut y)?;
        if let Some(lo) = &op.weight_lo {
            let (lo, ll) = storage(lo)?;
            pass(&x_hi, &view::<f32>(cuda(&lo), ll)?, &mut y)?;
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev), shape))
}
