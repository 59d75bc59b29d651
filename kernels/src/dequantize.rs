//! Block-quantized weights dequantized for a prefill-sized GEMM: the Qwen3 encoder's 4-bit
//! linears and the transformer's quantized projections ([`crate::Linear`]).
//!
//! On CUDA, to bf16, the formats of ggml's quantized model files (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! Q4_K, Q5_K, Q6_K) go straight from their blocks to bf16 in one kernel pass (`dequantize.cu`):
//! exactly the values of candle's CUDA f32 dequantization, rounded once, without its f32 copy
//! and cast. Everything else is candle's dequantization and a cast.

use candle_core::{
    DType, Result, Tensor,
    quantized::{GgmlDType, QTensor},
};

/// Each format `dequantize.cu` turns into bf16 in one pass: its kernel, and how many of the
/// kernel's threads share one ggml block (the thread mapping documented at each kernel).
const BF16_KERNELS: [(GgmlDType, &str, usize); 8] = [
    (GgmlDType::Q4_0, "dequantize_q4_0_bf16", 4),
    (GgmlDType::Q4_1, "dequantize_q4_1_bf16", 4),
    (GgmlDType::Q5_0, "dequantize_q5_0_bf16", 4),
    (GgmlDType::Q5_1, "dequantize_q5_1_bf16", 4),
    (GgmlDType::Q8_0, "dequantize_q8_0_bf16", 8),
    (GgmlDType::Q4K, "dequantize_q4k_bf16", 32),
    (GgmlDType::Q5K, "dequantize_q5k_bf16", 32),
    (GgmlDType::Q6K, "dequantize_q6k_bf16", 16),
];

/// The formats [`dequantize`] turns into bf16 on CUDA in one kernel pass, with no f32 copy.
pub fn fused_dequantize_formats() -> impl Iterator<Item = GgmlDType> {
    BF16_KERNELS.iter().map(|&(format, ..)| format)
}

/// `w` as a dense tensor of `dtype` on its device: one kernel pass on CUDA to bf16 for the
/// [`fused_dequantize_formats`], otherwise candle's f32 dequantization and a cast.
pub fn dequantize(w: &QTensor, dtype: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = w.device()
        && dtype == DType::BF16
        && let Some(&(_, kernel, threads_per_block)) = BF16_KERNELS
            .iter()
            .find(|(format, ..)| *format == w.dtype())
    {
        return launch_bf16(kernel, threads_per_block, w, &dev);
    }
    w.dequantize(&w.device())?.to_dtype(dtype)
}

/// Threads of one launch block of every `dequantize.cu` kernel (its `kLaunchThreads`).
#[cfg(feature = "cuda")]
const LAUNCH_THREADS: usize = 256;

/// `w`'s blocks to a new bf16 tensor of its shape by `kernel`, `threads_per_block` of its
/// threads to a ggml block, in launch blocks of `LAUNCH_THREADS` (the last one partly idle).
#[cfg(feature = "cuda")]
fn launch_bf16(
    kernel: &str,
    threads_per_block: usize,
    w: &QTensor,
    dev: &candle_core::CudaDevice,
) -> Result<Tensor> {
    use candle_core::cuda::WrapErr;
    use candle_core::cuda::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Storage, op::BackpropOp};
    use half::bf16;

    use crate::cuda::{DEQUANTIZE, blocks_for};

    let n = w.shape().elem_count();
    let block_weights = w.dtype().block_size();
    if !n.is_multiple_of(block_weights) {
        candle_core::bail!(
            "dequantize: {:?} is not whole {:?} blocks",
            w.shape(),
            w.dtype()
        );
    }
    let n_blocks = n / block_weights;
    let blocks_per_launch_block = LAUNCH_THREADS / threads_per_block;
    let func = dev.get_or_load_custom_func(kernel, DEQUANTIZE.name, DEQUANTIZE.ptx)?;
    let out = unsafe { dev.alloc::<bf16>(n)? };
    let stream = dev.cuda_stream();
    let (blocks, _guard) = w.device_ptr_with_guard(&stream)?;
    let (blocks, n_blocks_arg) = (blocks as u64, n_blocks as i64);
    let cfg = blocks_for(n_blocks, blocks_per_launch_block, LAUNCH_THREADS);
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
