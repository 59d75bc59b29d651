//! A checkpoint's bytes into tensors at the rate of the host's memory and the device's link.
//!
//! candle copies a host slice to a CUDA device with one pageable `cuMemcpyHtoD`: the driver
//! copies it into its own staging memory on the calling thread, then transfers it, so a
//! memory-mapped file's page faults, that copy and the transfer take turns on one core. Here a
//! tensor's bytes go through two page-locked buffers of the calling thread: every core copies a
//! part into one (faulting the mapping's pages in parallel) while the other one's transfer
//! runs. On the CPU a tensor's bytes are copied by every core too.

use std::borrow::Cow;

use candle_core::{
    DType, Device, Result, Shape, Tensor, bail,
    quantized::{GgmlDType, QStorage},
};
use rayon::prelude::*;

/// Bytes one core copies at a time.
const PIECE: usize = 1 << 20;

/// `$body` with `$t` the element type of `$dtype` where that is a plain number this module
/// copies itself (the list in the first arm); `$other` for any other dtype (candle's copy).
macro_rules! with_plain_type {
    ($dtype:expr, $t:ident => $body:expr, _ => $other:expr) => {
        with_plain_type!(@match $dtype, $t, $body, $other;
            U8 u8, U32 u32, I64 i64, BF16 half::bf16, F16 half::f16, F32 f32, F64 f64)
    };
    (@match $dtype:expr, $t:ident, $body:expr, $other:expr; $($v:ident $ty:ty),*) => {
        match $dtype {
            $(DType::$v => {
                type $t = $ty;
                $body
            })*
            _ => $other,
        }
    };
}

/// `bytes`, a tensor's storage as safetensors and GGUF files hold it (little-endian, row-major),
/// as a tensor of `dtype` and `shape` on `device`. Dtypes other than plain numbers (float8,
/// packed sub-byte formats, ...) take candle's copy, as candle's safetensors loader does.
pub fn tensor_from_bytes(
    bytes: &[u8],
    dtype: DType,
    shape: impl Into<Shape>,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    with_plain_type!(dtype, T => {
        let expected = shape.elem_count() * std::mem::size_of::<T>();
        if bytes.len() != expected {
            bail!(
                "{} bytes for a {shape:?} {dtype:?} tensor of {expected} bytes",
                bytes.len()
            )
        }
        match device {
            Device::Cpu => host_tensor::<T>(bytes, shape),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => staged::tensor::<T>(bytes, shape, dev),
            _ => Tensor::from_raw_buffer(bytes, dtype, shape.dims(), device),
        }
    }, _ => Tensor::from_raw_buffer(bytes, dtype, shape.dims(), device))
}

/// Stored ggml blocks of `dtype` as storage on `device` (to a GPU through the staging buffers).
pub fn blocks(bytes: &[u8], dtype: GgmlDType, device: &Device) -> Result<QStorage> {
    let block_bytes = dtype.type_size();
    if !bytes.len().is_multiple_of(block_bytes) {
        bail!(
            "{} bytes are not whole {dtype:?} blocks of {block_bytes} bytes",
            bytes.len()
        )
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        let weights = bytes.len() / block_bytes * dtype.block_size();
        let storage = candle_core::quantized::cuda::QCudaStorage::zeros(dev, weights, dtype)?;
        if !bytes.is_empty() {
            copy_to_device(bytes, storage.device_ptr()? as u64, dev)?;
        }
        return Ok(QStorage::Cuda(storage));
    }
    QStorage::from_data(Cow::Borrowed(bytes), device, dtype)
}

/// `t` on `device`: a contiguous host tensor of a plain dtype goes to a CUDA device through the
/// staging buffers ([`tensor_from_bytes`]), anything else by candle's copy.
pub fn to_device(t: &Tensor, device: &Device) -> Result<Tensor> {
    if !(device.is_cuda() && t.device().is_cpu() && t.is_contiguous()) {
        return t.to_device(device);
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return t.to_device(device);
    };
    let range = layout.start_offset()..layout.start_offset() + t.elem_count();
    let bytes = with_plain_type!(t.dtype(), T => as_bytes(&cpu.as_slice::<T>()?[range]), _ => {
        return t.to_device(device)
    });
    tensor_from_bytes(bytes, t.dtype(), t.shape(), device)
}

/// The bytes of a slice of plain numbers.
pub(crate) fn as_bytes<T: candle_core::WithDType>(v: &[T]) -> &[u8] {
    // SAFETY: candle's element types are plain numbers without padding; any initialised value
    // is readable as bytes, and u8 has no alignment to meet.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A host tensor holding a copy of `bytes` (their length checked by the caller).
fn host_tensor<T: candle_core::WithDType>(bytes: &[u8], shape: Shape) -> Result<Tensor> {
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut v = Vec::<T>::with_capacity(n);
    // SAFETY: the vector's buffer holds n elements, so bytes.len() bytes; every byte of it is
    // written before the length is set, and any bytes are a valid plain number.
    unsafe {
        par_copy(v.as_mut_ptr().cast::<u8>(), bytes);
        v.set_len(n);
    }
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Copies `src` to `dst` in pieces of [`PIECE`] bytes spread over rayon's threads.
///
/// # Safety
/// `dst` must be valid for `src.len()` bytes of writes and not overlap `src`.
unsafe fn par_copy(dst: *mut u8, src: &[u8]) {
    let dst = dst as usize;
    src.par_chunks(PIECE).enumerate().for_each(|(i, piece)| {
        // SAFETY: piece i goes to bytes [i · PIECE, i · PIECE + piece.len()) of dst, inside
        // the caller's range; the pieces do not overlap each other.
        unsafe {
            std::ptr::copy_nonoverlapping(
                piece.as_ptr(),
                (dst as *mut u8).add(i * PIECE),
                piece.len(),
            )
        }
    });
}

#[cfg(feature = "cuda")]
pub(crate) use staged::copy_to_device;

#[cfg(feature = "cuda")]
mod staged {
    use std::cell::RefCell;

    use candle_core::{
        CudaDevice, CudaStorage, Result, Shape, Storage, Tensor,
        cuda::{
            CudaDType, WrapErr,
            cudarc::driver::{
                CudaEvent, DevicePtrMut, DeviceRepr, PinnedHostSlice, result,
                sys::{CUdeviceptr, CUevent_flags::CU_EVENT_DISABLE_TIMING},
            },
        },
        op::BackpropOp,
    };

    /// Bytes of each of a thread's two staging buffers: a transfer of 16 MiB takes ~0.7 ms at
    /// PCIe 5's ~25 GB/s, long beside the ~20 µs of queueing it and waiting for its event.
    const STAGE: usize = 16 << 20;

    /// A thread's page-locked buffers for one device ordinal, and for each the event after the
    /// last transfer that read it.
    struct Staging {
        ordinal: usize,
        buffers: [(PinnedHostSlice<u8>, Option<CudaEvent>); 2],
        next: usize,
    }

    impl Drop for Staging {
        /// A buffer is freed only once no transfer reads it.
        fn drop(&mut self) {
            for (_, done) in &self.buffers {
                if let Some(event) = done {
                    let _ = event.synchronize();
                }
            }
        }
    }

    thread_local! {
        /// Kept for the thread's life (two buffers a device it loaded to, 32 MiB of locked
        /// host memory): a model's tensors are loaded one after another on one thread.
        static STAGING: RefCell<Vec<Staging>> = const { RefCell::new(Vec::new()) };
    }

    /// A new device tensor holding `bytes` (their length checked by the caller).
    pub(super) fn tensor<T: CudaDType + DeviceRepr>(
        bytes: &[u8],
        shape: Shape,
        dev: &CudaDevice,
    ) -> Result<Tensor> {
        Ok(Tensor::from_storage(
            Storage::Cuda(upload::<T>(bytes, dev)?),
            shape,
            BackpropOp::none(),
            false,
        ))
    }

    fn upload<T: CudaDType + DeviceRepr>(bytes: &[u8], dev: &CudaDevice) -> Result<CudaStorage> {
        let n = bytes.len() / std::mem::size_of::<T>();
        // SAFETY: every element is written by the copies below before the storage is read.
        let mut slice = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            let stream = dev.cuda_stream();
            let (dst, _record) = slice.device_ptr_mut(&stream);
            copy_to_device(bytes, dst, dev)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(slice, dev.clone()))
    }

    /// Copies `src` to device memory at `dst` (`src.len()` bytes) on `dev`'s stream, through
    /// this thread's staging buffers. Returns once `src` has been read; the last transfers may
    /// still run, and work queued on the stream after this call follows them. Where no
    /// page-locked memory can be had, or this thread's buffers are in use, the copy is a
    /// pageable one.
    pub(crate) fn copy_to_device(src: &[u8], dst: CUdeviceptr, dev: &CudaDevice) -> Result<()> {
        let stream = dev.cuda_stream();
        let ordinal = stream.context().ordinal();
        // SAFETY: dst holds src.len() bytes (the caller's contract).
        let pageable = || unsafe { result::memcpy_htod_async(dst, src, stream.cu_stream()) }.w();
        STAGING.with(|cell| {
            // A copy from a rayon task that ran on this thread while it waited for its own
            // copy's pieces finds the buffers taken.
            let Ok(mut cache) = cell.try_borrow_mut() else {
                return pageable();
            };
            let i = match cache.iter().position(|s| s.ordinal == ordinal) {
                Some(i) => i,
                None => match staging(dev, ordinal) {
                    Some(s) => {
                        cache.push(s);
                        cache.len() - 1
                    }
                    None => return pageable(),
                },
            };
            let staging = &mut cache[i];
            for (k, part) in src.chunks(STAGE).enumerate() {
                let (buffer, done) = &mut staging.buffers[staging.next];
                staging.next ^= 1;
                if let Some(event) = done.take() {
                    event.synchronize().w()?;
                }
                let host = &mut buffer.as_mut_slice().w()?[..part.len()];
                // SAFETY: host is part.len() bytes of the staging buffer, which no transfer
                // reads any more (its event has passed), and is not part of src.
                unsafe { super::par_copy(host.as_mut_ptr(), part) };
                // SAFETY: the destination is inside dst's src.len() bytes; the source is
                // page-locked and stays untouched until the event recorded after the transfer.
                unsafe {
                    result::memcpy_htod_async(dst + (k * STAGE) as u64, host, stream.cu_stream())
                }
                .w()?;
                *done = Some(stream.record_event(Some(CU_EVENT_DISABLE_TIMING)).w()?);
            }
            Ok(())
        })
    }

    fn staging(dev: &CudaDevice, ordinal: usize) -> Option<Staging> {
        let ctx = dev.cuda_stream().context().clone();
        // SAFETY: the buffers' contents are written before any transfer reads them.
        let buffer = || unsafe { ctx.alloc_pinned::<u8>(STAGE) }.ok();
        Some(Staging {
            ordinal,
            buffers: [(buffer()?, None), (buffer()?, None)],
            next: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_tensors_hold_the_bytes_given() -> Result<()> {
        let values: Vec<f32> = (0..(3 * PIECE / 4 + 5))
            .map(|i| i as f32 * 0.5 - 7.0)
            .collect();
        let bytes = as_bytes(&values);
        let n = values.len();
        let t = tensor_from_bytes(bytes, DType::F32, n, &Device::Cpu)?;
        assert_eq!(
            t.to_vec1::<f32>()?,
            values,
            "several pieces, the last one short"
        );
        let halves: Vec<half::bf16> = values.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let t = tensor_from_bytes(as_bytes(&halves), DType::BF16, (n, 1), &Device::Cpu)?;
        assert_eq!(t.flatten_all()?.to_vec1::<half::bf16>()?, halves);
        let odd = &bytes[1..9];
        let t = tensor_from_bytes(odd, DType::F32, 2, &Device::Cpu)?;
        assert_eq!(as_bytes(&t.to_vec1::<f32>()?), odd, "an unaligned source");
        assert!(tensor_from_bytes(&bytes[..7], DType::F32, 2, &Device::Cpu).is_err());
        Ok(())
    }
}
