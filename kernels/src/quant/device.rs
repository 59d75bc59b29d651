//! [`super::quantize_rows`] and [`super::quantize_mapped`] on a CUDA device: the rows (a host
//! tensor's, or a checkpoint's mapped bytes) go up in parts of at most [`PART_BYTES`] through
//! one device buffer and are quantized there (`quantize.cu`, one thread per ggml block) into
//! the blocks' one allocation. The kernels port the host quantizer operation for operation, so
//! the blocks are the host's.

use candle_core::{
    CpuStorage, CudaDevice, DType, Result, Storage, Tensor, bail,
    cuda::{
        WrapErr,
        cudarc::driver::{DevicePtrMut, PushKernelArg},
    },
    quantized::{GgmlDType, QStorage, QTensor, cuda::QCudaStorage},
};

use crate::{
    cuda::{QUANTIZE, blocks_for},
    upload,
};

/// Each format `quantize.cu` writes, and its kernels' name.
const KERNELS: [(GgmlDType, &str); 5] = [
    (GgmlDType::Q8_0, "q8_0"),
    (GgmlDType::Q4_0, "q4_0"),
    (GgmlDType::Q4_1, "q4_1"),
    (GgmlDType::Q4K, "q4k"),
    (GgmlDType::Q6K, "q6k"),
];

/// The most bytes of the host tensor on the device at once: the transient a load adds to the
/// blocks, whatever the tensor's size (a Qwen3-8B embedding is 1.2 GB).
const PART_BYTES: usize = 64 << 20;

/// Threads of a launch block, one ggml block each (the k-quants keep ~0.5 KiB a thread in
/// local memory).
const LAUNCH_THREADS: usize = 128;

/// The kernel name stem for `format`, if `quantize.cu` writes it.
pub fn kernel(format: GgmlDType) -> Option<&'static str> {
    KERNELS.iter().find(|(f, _)| *f == format).map(|&(_, k)| k)
}

/// `host` (rows, width) on the host, any float dtype, quantized to `format` on `dev` by
/// `stem`'s kernels. F32, BF16 and F16 go up as they are; other dtypes as f32.
pub fn quantize_rows(
    host: &Tensor,
    format: GgmlDType,
    stem: &str,
    dev: &CudaDevice,
) -> Result<QTensor> {
    let (rows, width) = host.dims2()?;
    let block = format.block_size();
    if !width.is_multiple_of(block) {
        bail!("quantize: rows of {width} are not whole {format:?} blocks of {block}")
    }
    let host = match host.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => host.contiguous()?,
        _ => host.to_dtype(DType::F32)?,
    };
    let storage = QCudaStorage::zeros(dev, rows * width, format)?;
    let parts = Parts::new(dev, &storage, format, stem, host.dtype(), width)?;
    {
        let (s, l) = host.storage_and_layout();
        let range = l.start_offset()..l.start_offset() + rows * width;
        match &*s {
            Storage::Cpu(CpuStorage::BF16(v)) => parts.quantize(upload::as_bytes(&v[range]), 0)?,
            Storage::Cpu(CpuStorage::F16(v)) => parts.quantize(upload::as_bytes(&v[range]), 0)?,
            Storage::Cpu(CpuStorage::F32(v)) => parts.quantize(upload::as_bytes(&v[range]), 0)?,
            _ => bail!("quantize: the weight is not on the host"),
        }
    }
    QTensor::new(QStorage::Cuda(storage), (rows, width))
}

/// The (rows, width) tensors `parts` (stored bytes in `dtype`: F32, BF16 or F16), stacked
/// along their rows, quantized to `format` on `dev` by `stem`'s kernels.
pub fn quantize_bytes(
    parts: &[&[u8]],
    dtype: DType,
    (rows, width): (usize, usize),
    format: GgmlDType,
    stem: &str,
    dev: &CudaDevice,
) -> Result<QTensor> {
    let block = format.block_size();
    if !width.is_multiple_of(block) {
        bail!("quantize: rows of {width} are not whole {format:?} blocks of {block}")
    }
    let bytes = rows * width * dtype.size_in_bytes();
    if let Some(part) = parts.iter().find(|p| p.len() != bytes) {
        bail!(
            "quantize: {} bytes for {rows} rows of {width} {dtype:?}",
            part.len()
        )
    }
    let storage = QCudaStorage::zeros(dev, parts.len() * rows * width, format)?;
    let quantizer = Parts::new(dev, &storage, format, stem, dtype, width)?;
    for (i, part) in parts.iter().enumerate() {
        quantizer.quantize(part, i * rows * width / block)?;
    }
    // The host waits for the weight's kernels, as the host path's slower reads let it: the
    // part buffer's free then completes (and, the pool keeping nothing during a load, goes
    // back to the driver) before the next weight's blocks are cut. Running ahead, the next
    // blocks were cut from the freed buffer's memory, and the pieces left between them kept
    // 0.5-0.8 GB of klein-9B's 16 GB plan MPS limits from its activations; with the wait the
    // load uses the host path's memory to the byte, and is as fast (docs/performance.md,
    // thirty-sixth and thirty-seventh sessions).
    dev.cuda_stream().synchronize().w()?;
    QTensor::new(QStorage::Cuda(storage), (parts.len() * rows, width))
}

/// One weight's quantization: its kernel, where its blocks go, and how its rows are cut.
struct Parts<'a> {
    dev: &'a CudaDevice,
    kernel: String,
    /// Device address of the first block.
    blocks: u64,
    /// Weights and bytes of one ggml block.
    block: usize,
    block_bytes: usize,
    /// Bytes of one weight as read.
    weight_bytes: usize,
    /// Rows uploaded at once, and weights a row.
    part_rows: usize,
    width: usize,
}

impl<'a> Parts<'a> {
    /// Rows of `width` weights in `dtype` (F32, BF16 or F16) into `storage`'s blocks.
    fn new(
        dev: &'a CudaDevice,
        storage: &QCudaStorage,
        format: GgmlDType,
        stem: &str,
        dtype: DType,
        width: usize,
    ) -> Result<Self> {
        let suffix = match dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            _ => "f32",
        };
        Ok(Self {
            dev,
            kernel: format!("quantize_{stem}_{suffix}"),
            blocks: storage.device_ptr()? as u64,
            block: format.block_size(),
            block_bytes: format.type_size(),
            weight_bytes: dtype.size_in_bytes(),
            part_rows: (PART_BYTES / (width * dtype.size_in_bytes()).max(1)).max(1),
            width,
        })
    }

    /// Each part of `bytes` (whole rows) copied into one device buffer (through [`upload`]'s
    /// staging), then its blocks written from block `first_block` on. The copies and the
    /// kernels run in order on the device's stream, so a part is copied only once the kernel
    /// before it has read the buffer.
    fn quantize(&self, bytes: &[u8], first_block: usize) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let func = self
            .dev
            .get_or_load_custom_func(&self.kernel, QUANTIZE.name, QUANTIZE.ptx)?;
        let part = self.part_rows * self.width * self.weight_bytes;
        let mut buf = unsafe { self.dev.alloc::<u8>(part.min(bytes.len()))? };
        let stream = self.dev.cuda_stream();
        for (i, chunk) in bytes.chunks(part).enumerate() {
            {
                let (dst, _record) = buf.device_ptr_mut(&stream);
                upload::copy_to_device(chunk, dst, self.dev)?;
            }
            let n_blocks = chunk.len() / self.weight_bytes / self.block;
            let first = first_block + i * (part / self.weight_bytes / self.block);
            let out = self.blocks + (first * self.block_bytes) as u64;
            let n_blocks_arg = n_blocks as i64;
            let cfg = blocks_for(n_blocks, LAUNCH_THREADS, LAUNCH_THREADS);
            let mut launch = func.builder();
            launch.arg(&buf).arg(&out).arg(&n_blocks_arg);
            unsafe { launch.launch(cfg) }.w()?;
        }
        Ok(())
    }
}
