//! Exact GPU memory figures of this process, for calibrating the activation estimates.
//!
//! candle allocates every CUDA tensor stream-ordered (`cuMemAllocAsync`) from the device's
//! default memory pool, and the pool keeps a high-water mark of the bytes in use. Resetting the
//! mark before an operation and reading it after gives the operation's true peak (weights that
//! were already resident included), with none of the sampling gaps of `nvidia-smi`.
//! On the CPU there is no pool and both calls return `None`.

use candle_core::Device;

/// In-use high-water mark of `dev`'s default memory pool since the last [`reset_peak`], bytes.
pub fn peak_bytes(dev: &Device) -> Option<u64> {
    pool::used_high(dev)
}

/// Starts a new high-water mark at the bytes in use now.
pub fn reset_peak(dev: &Device) {
    pool::reset_used_high(dev);
}

/// Bytes of `dev`'s default memory pool in use now.
pub fn used_bytes(dev: &Device) -> Option<u64> {
    pool::used_current(dev)
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod pool {
    use candle_core::{
        Device,
        cuda_backend::cudarc::driver::sys::{
            CUmemPool_attribute, CUmemoryPool, CUresult, cuDeviceGetDefaultMemPool,
            cuMemPoolGetAttribute, cuMemPoolSetAttribute,
        },
    };

    fn default_pool(dev: &Device) -> Option<CUmemoryPool> {
        let cuda = dev.as_cuda_device().ok()?;
        let stream = cuda.cuda_stream();
        let mut pool: CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live context.
        let rc = unsafe { cuDeviceGetDefaultMemPool(&mut pool, stream.context().cu_device()) };
        (rc == CUresult::CUDA_SUCCESS).then_some(pool)
    }

    fn get(dev: &Device, attr: CUmemPool_attribute) -> Option<u64> {
        let pool = default_pool(dev)?;
        dev.synchronize().ok()?;
        let mut value = 0u64;
        // SAFETY: both attributes read here are cuuint64_t, written through a valid pointer.
        let rc = unsafe { cuMemPoolGetAttribute(pool, attr, (&raw mut value).cast()) };
        (rc == CUresult::CUDA_SUCCESS).then_some(value)
    }

    pub fn used_high(dev: &Device) -> Option<u64> {
        get(dev, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    pub fn used_current(dev: &Device) -> Option<u64> {
        get(dev, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    pub fn reset_used_high(dev: &Device) {
        let Some(pool) = default_pool(dev) else {
            return;
        };
        if dev.synchronize().is_err() {
            return;
        }
        let mut zero = 0u64;
        // SAFETY: the driver only accepts 0 for this attribute, passed as a valid cuuint64_t.
        unsafe {
            cuMemPoolSetAttribute(
                pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&raw mut zero).cast(),
            );
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod pool {
    use candle_core::Device;

    pub fn used_high(_: &Device) -> Option<u64> {
        None
    }

    pub fn used_current(_: &Device) -> Option<u64> {
        None
    }

    pub fn reset_used_high(_: &Device) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_pool_figures() {
        reset_peak(&Device::Cpu);
        assert_eq!(peak_bytes(&Device::Cpu), None);
        assert_eq!(used_bytes(&Device::Cpu), None);
    }
}
