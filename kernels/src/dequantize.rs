//! Block-quantized weights dequantized for a prefill-sized GEMM.

use candle_core::{DType, Result, Tensor, quantized::QTensor};

/// `w` as a dense tensor of `dtype` on its device: on CUDA, Q4_K to bf16 in one kernel pass
/// (`dequantize.cu`, the values candle's CUDA dequantization gives, rounded once); otherwise
/// candle's f32 dequantization and a cast.
pub fn dequantize(w: &QTensor, dtype: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = w.device()
        && w.dtype() == candle_core::quantized::GgmlDType::Q4K
        && dtype == DType::BF16
    {
        return dequantize_q4k_bf16(w, &dev);
    }
    w.dequantize(&w.device())?.to_dtype(dtype)
}

#[cfg(feature = "cuda")]
fn dequantize_q4k_bf16(w: &QTensor, dev: &candle_core::CudaDevice) -> Result<Tensor> {
    use candle_core::cuda::WrapErr;
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, Storage, op::BackpropOp};
    use half::bf16;

    use crate::cuda::DEQUANTIZE;

    /// Weights per Q4_K super-block, super-blocks per 256-thread block (dequantize.cu).
    const BLOCK_WEIGHTS: usize = 256;
    const BLOCKS_PER_LAUNCH_BLOCK: usize = 8;
    let n = w.shape().elem_count();
    if !n.is_multiple_of(BLOCK_WEIGHTS) {
        candle_core::bail!("dequantize: {:?} is not whole Q4_K blocks", w.shape());
    }
    let n_blocks = n / BLOCK_WEIGHTS;
    let func =
        dev.get_or_load_custom_func("dequantize_q4k_bf16", DEQUANTIZE.name, DEQUANTIZE.ptx)?;
    let out = unsafe { dev.alloc::<bf16>(n)? };
    let stream = dev.cuda_stream();
    let (blocks, _guard) = w.device_ptr_with_guard(&stream)?;
    let (blocks, n_blocks_arg) = (blocks as u64, n_blocks as i64);
    let cfg = LaunchConfig {
        grid_dim: (n_blocks.div_ceil(BLOCKS_PER_LAUNCH_BLOCK) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = func.builder();
    launch.arg(&blocks).arg(&out).arg(&n_blocks_arg);
    unsafe { launch.launch(cfg) }.w()?;
    let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        w.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}
