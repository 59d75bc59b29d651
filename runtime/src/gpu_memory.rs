//! Exact GPU memory figures of this process, for calibrating the activation estimates.
//!
//! candle allocates every CUDA tensor stream-ordered (`cuMemAllocAsync`) from the device's
//! default memory pool, and the pool keeps a high-water mark of the bytes in use. Resetting the
//! mark before an operation and reading it after gives the operation's true peak (weights that
//! were already resident included), with none of the sampling gaps of `nvidia-smi`.
//! On the CPU there is no pool and both calls return `None`.

use candle_core::Device;

use crate::budget::MemoryBudget;

/// Whether an error message is the device running out of memory (a CUDA allocation that failed,
/// e.g. past an MPS limit, or one cuBLAS / cuBLASLt made for a product): the request was too big
/// for what is free now, so callers answer RESOURCE_EXHAUSTED rather than INTERNAL.
pub fn is_out_of_memory(message: &str) -> bool {
    message.contains("CUDA_ERROR_OUT_OF_MEMORY") || message.contains("CUBLAS_STATUS_ALLOC_FAILED")
}

/// In-use high-water mark of `dev`'s default memory pool since the last [`reset_peak`], bytes
/// (CUDA graphs' memory is apart: [`graph_reserved_high`]).
pub fn peak_bytes(dev: &Device) -> Option<u64> {
    pool::used_high(dev)
}

/// Starts new high-water marks (bytes in use, bytes reserved; the graphs' reserved bytes) at
/// their values now.
pub fn reset_peak(dev: &Device) {
    pool::reset_highs(dev);
}

/// Bytes the driver reports free for this process on `dev`, after returning the pool's unused
/// memory. Under CUDA MPS with a pinned memory limit this is what is left of the limit, so
/// after loading and warming up a model it is the room activations really have.
pub fn free_bytes(dev: &Device) -> Option<u64> {
    pool::free(dev)
}

/// Keeps memory that `dev`'s tensors free in the process's pool instead of handing it back to
/// the driver at every synchronisation (the pool's default release threshold is 0): an
/// operation of many allocations (the VAE's convolution bands, the transformer's steps) reuses
/// what the last one freed. Memory cached for work of other shapes can fragment the pool, and
/// under a hard MPS limit an allocation may then fail although the bytes are there: run such
/// work through [`retry_out_of_memory`], or [`release_freed_memory`] when idle.
pub fn keep_freed_memory(dev: &Device) {
    pool::keep_freed(dev);
}

/// Returns the pool's unused memory to the driver (see [`keep_freed_memory`]), and the memory
/// CUDA graphs keep mapped between replays ([`crate::graph`]).
pub fn release_freed_memory(dev: &Device) {
    pool::trim(dev);
}

/// Runs `job`; if it failed for want of device memory, returns the pool's unused memory to the
/// driver and runs it once more. With [`keep_freed_memory`] the pool holds pieces cut for
/// earlier work, which under a hard MPS limit may not fit the next allocations although the
/// bytes are there. Only for jobs that leave their inputs as they were when they fail.
pub fn retry_out_of_memory<T, E: std::fmt::Display>(
    dev: &Device,
    mut job: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    fall_back_on_out_of_memory(dev, |_| job())
}

/// Which run of a job [`fall_back_on_out_of_memory`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The job as planned.
    First,
    /// After the first ran out of device memory and the pool went back to the driver.
    Retry,
}

/// [`retry_out_of_memory`] for a job that can run smaller: `job(Attempt::Retry)` may take a
/// plan of less memory. A pool freshly handed back can still run out where the live bytes are
/// far below the limit: under an MPS limit the 16 GB plan's tiled decode failed its retry with
/// 1.25 GB in use at its peak and 2.85 GB reserved by the pool (its pieces cut for other
/// sizes), so the same plan again is no sure way out.
pub fn fall_back_on_out_of_memory<T, E: std::fmt::Display>(
    dev: &Device,
    mut job: impl FnMut(Attempt) -> Result<T, E>,
) -> Result<T, E> {
    match job(Attempt::First) {
        Err(e) if is_out_of_memory(&e.to_string()) => {
            tracing::warn!(
                error = %e,
                memory = ?snapshot(dev),
                "out of device memory; pool handed back, retrying once"
            );
            release_freed_memory(dev);
            let outcome = job(Attempt::Retry);
            if let Err(e) = &outcome
                && is_out_of_memory(&e.to_string())
            {
                tracing::warn!(memory = ?snapshot(dev), "out of device memory again after the retry");
            }
            outcome
        }
        outcome => outcome,
    }
}

/// Hands the pool's unused memory (and the graphs' memory kept between replays) back to the
/// driver when the driver has less than `bytes` free and either holds unused memory: an
/// operation about to reserve about `bytes` then cuts its allocations from memory handed out
/// afresh rather than from pieces cut for other shapes, which under an MPS limit can fail
/// although the bytes are there (the 16 GB plan's tiled
/// decodes: 8 of 28 first tries from a pool that kept the last job's pieces ran out of memory,
/// 1 of 8 retries from a pool handed back). Returns whether it did; nothing on the CPU.
pub fn make_room(dev: &Device, bytes: u64) -> bool {
    let short = snapshot(dev).is_some_and(|s| room_needs_trim(&s, bytes));
    if short {
        release_freed_memory(dev);
    }
    short
}

/// Whether `bytes` more would have to come from memory kept for reuse: the driver has less
/// free, and the pool holds unused memory or the CUDA graphs hold any (trimming returns all of
/// theirs that no graph running or queued uses; between replays that is all of it).
fn room_needs_trim(s: &Snapshot, bytes: u64) -> bool {
    s.free < bytes && (s.reserved > s.used || s.graph_reserved > 0)
}

/// Where this process's device memory is, for out-of-memory reports: the default pool's bytes
/// in use and reserved from the driver (now and their high-water marks), the CUDA graphs' bytes
/// in use and mapped, and what the driver has free. Under an MPS limit, `free` shrinking while the pool does not points at memory
/// outside the pool (lazily loaded kernels, library workspaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Bytes of the pool's allocations alive now.
    pub used: u64,
    /// Their high-water mark since the last [`reset_peak`].
    pub used_high: u64,
    /// Bytes the pool holds from the driver now (in use or kept for reuse).
    pub reserved: u64,
    /// Their high-water mark since the last [`reset_peak`].
    pub reserved_high: u64,
    /// Bytes associated with CUDA graphs now ([`crate::graph`]: their activations, outside the
    /// pool; kept mapped between replays), and the bytes allocated for them. A trim with no
    /// graph running returns both to 0 (H200).
    pub graph_used: u64,
    pub graph_reserved: u64,
    /// Bytes the driver has free for this process (under MPS: left of its limit).
    pub free: u64,
}

/// [`Snapshot`] of `dev` without trimming the pool; `None` on the CPU.
pub fn snapshot(dev: &Device) -> Option<Snapshot> {
    pool::snapshot(dev)
}

/// Free memory kept back by [`fit_budget`] for pool fragmentation and library scratch.
pub const FIT_MARGIN_BYTES: u64 = 128 << 20;

/// Lowers `budget`'s capacity to what `dev` has free minus `margin` (see [`free_bytes`]) and
/// returns the capacity in force; `None` on the CPU. Call once the model is loaded and warm.
pub fn fit_budget(budget: &MemoryBudget, dev: &Device, margin: u64) -> Option<u64> {
    let free = free_bytes(dev)?;
    let capacity = budget.limit_capacity(free.saturating_sub(margin));
    tracing::info!(
        budget = budget.name(),
        free_bytes = free,
        capacity_bytes = capacity,
        "activation budget checked against the device's free memory"
    );
    Some(capacity)
}

/// High-water mark of the memory CUDA graphs have held mapped on `dev` ([`crate::graph`])
/// since the last [`reset_peak`], bytes: their activations, outside the default pool.
pub fn graph_reserved_high(dev: &Device) -> Option<u64> {
    pool::graph_reserved_high(dev)
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
            CUgraphMem_attribute, CUmemPool_attribute, CUmemoryPool, CUresult,
            cuDeviceGetDefaultMemPool, cuDeviceGetGraphMemAttribute, cuDeviceGraphMemTrim,
            cuDeviceSetGraphMemAttribute, cuMemPoolGetAttribute, cuMemPoolSetAttribute,
            cuMemPoolTrimTo,
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

    pub fn snapshot(dev: &Device) -> Option<super::Snapshot> {
        use CUmemPool_attribute::{
            CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            CU_MEMPOOL_ATTR_USED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        };
        let cuda = dev.as_cuda_device().ok()?;
        let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        Some(super::Snapshot {
            used: get(dev, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            used_high: get(dev, CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved: get(dev, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            reserved_high: get(dev, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
            graph_used: graph_attribute(
                dev,
                CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT,
            )?,
            graph_reserved: graph_attribute(
                dev,
                CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT,
            )?,
            free: free as u64,
        })
    }

    pub fn trim(dev: &Device) {
        let Some(pool) = default_pool(dev) else {
            return;
        };
        if dev.synchronize().is_ok() {
            let cu_device = dev
                .as_cuda_device()
                .map(|c| c.cuda_stream().context().cu_device());
            // SAFETY: a valid pool handle and device; trimming only returns memory no
            // allocation (and no graph queued or running) uses to the driver.
            unsafe {
                cuMemPoolTrimTo(pool, 0);
                if let Ok(cu_device) = cu_device {
                    cuDeviceGraphMemTrim(cu_device);
                }
            }
        }
    }

    pub fn graph_reserved_high(dev: &Device) -> Option<u64> {
        graph_attribute(
            dev,
            CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH,
        )
    }

    fn graph_attribute(dev: &Device, attr: CUgraphMem_attribute) -> Option<u64> {
        let cuda = dev.as_cuda_device().ok()?;
        let mut value = 0u64;
        // SAFETY: the four graph memory attributes are cuuint64_t, written through a valid
        // pointer.
        let rc = unsafe {
            cuDeviceGetGraphMemAttribute(
                cuda.cuda_stream().context().cu_device(),
                attr,
                (&raw mut value).cast(),
            )
        };
        (rc == CUresult::CUDA_SUCCESS).then_some(value)
    }

    pub fn free(dev: &Device) -> Option<u64> {
        trim(dev);
        let cuda = dev.as_cuda_device().ok()?;
        let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        Some(free as u64)
    }

    pub fn keep_freed(dev: &Device) {
        let Some(pool) = default_pool(dev) else {
            return;
        };
        let mut threshold = u64::MAX;
        // SAFETY: a valid pool handle; the release threshold is a cuuint64_t read through a
        // valid pointer.
        unsafe {
            cuMemPoolSetAttribute(
                pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&raw mut threshold).cast(),
            );
        }
    }

    pub fn reset_highs(dev: &Device) {
        let Some(pool) = default_pool(dev) else {
            return;
        };
        if dev.synchronize().is_err() {
            return;
        }
        for attr in [
            CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
        ] {
            let mut zero = 0u64;
            // SAFETY: the driver only accepts 0 for these attributes, passed as a valid
            // cuuint64_t.
            unsafe { cuMemPoolSetAttribute(pool, attr, (&raw mut zero).cast()) };
        }
        if let Ok(cuda) = dev.as_cuda_device() {
            let mut zero = 0u64;
            // SAFETY: as above, for the graphs' high-water mark of a live context's device.
            unsafe {
                cuDeviceSetGraphMemAttribute(
                    cuda.cuda_stream().context().cu_device(),
                    CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH,
                    (&raw mut zero).cast(),
                )
            };
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

    pub fn snapshot(_: &Device) -> Option<super::Snapshot> {
        None
    }

    pub fn free(_: &Device) -> Option<u64> {
        None
    }

    pub fn keep_freed(_: &Device) {}

    pub fn trim(_: &Device) {}

    pub fn graph_reserved_high(_: &Device) -> Option<u64> {
        None
    }

    pub fn reset_highs(_: &Device) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_cuda_out_of_memory() {
        // The message a VAE encode returned on an H100 past its MPS limit.
        let oom = r#"model: DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#;
        assert!(is_out_of_memory(oom));
        // What klein_kernels' cuBLASLt linear layers return when cuBLASLt cannot allocate.
        assert!(is_out_of_memory(
            "linear: cuBLASLt: CublasError(CUBLAS_STATUS_ALLOC_FAILED)"
        ));
        assert!(!is_out_of_memory(
            "linear: cuBLASLt: CublasError(CUBLAS_STATUS_NOT_SUPPORTED)"
        ));
        assert!(!is_out_of_memory("model: shape mismatch in matmul"));
    }

    #[test]
    fn room_is_made_only_from_unused_pieces_and_only_when_short() {
        let pool = |used, reserved, free| Snapshot {
            used,
            used_high: used,
            reserved,
            reserved_high: reserved,
            graph_used: 0,
            graph_reserved: 0,
            free,
        };
        // 300 MB free, 1 GB reserved of which 400 MB unused: a 500 MB job needs the pieces.
        assert!(room_needs_trim(&pool(600, 1000, 300), 500));
        // Enough handed out afresh: the pool stays as it is.
        assert!(!room_needs_trim(&pool(600, 1000, 800), 500));
        // Short, but every reserved byte is in use: trimming returns nothing.
        assert!(!room_needs_trim(&pool(1000, 1000, 300), 500));
        // The pool is full, but graphs keep 1 GB mapped between replays (another service's
        // transformer in the same process): trimming returns it.
        let graphs = |graph_reserved| Snapshot {
            graph_used: graph_reserved,
            graph_reserved,
            ..pool(1000, 1000, 300)
        };
        assert!(room_needs_trim(&graphs(1000), 500));
        assert!(!room_needs_trim(&graphs(0), 500));
        assert!(!make_room(&Device::Cpu, u64::MAX));
    }

    #[test]
    fn only_out_of_memory_is_retried_and_only_once() {
        let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        let calls = |outcomes: Vec<Result<u8, &'static str>>| {
            let mut left = outcomes.into_iter();
            let mut count = 0;
            let got = retry_out_of_memory(&Device::Cpu, || {
                count += 1;
                left.next().expect("an outcome per call")
            });
            (got, count)
        };
        assert_eq!(calls(vec![Err(oom), Ok(1)]), (Ok(1), 2));
        assert_eq!(calls(vec![Err(oom), Err(oom)]), (Err(oom), 2));
        assert_eq!(
            calls(vec![Err("shape mismatch")]),
            (Err("shape mismatch"), 1)
        );
        assert_eq!(calls(vec![Ok(3)]), (Ok(3), 1));
    }

    #[test]
    fn the_fallback_runs_only_after_an_out_of_memory() {
        let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        let attempts = |first: Result<u8, &'static str>| {
            let mut seen = Vec::new();
            let got = fall_back_on_out_of_memory(&Device::Cpu, |attempt| {
                seen.push(attempt);
                match attempt {
                    Attempt::First => first,
                    Attempt::Retry => Ok(2),
                }
            });
            (got, seen)
        };
        assert_eq!(
            attempts(Err(oom)),
            (Ok(2), vec![Attempt::First, Attempt::Retry])
        );
        assert_eq!(attempts(Ok(1)), (Ok(1), vec![Attempt::First]));
        assert_eq!(
            attempts(Err("shape mismatch")),
            (Err("shape mismatch"), vec![Attempt::First])
        );
    }

    #[test]
    fn the_cpu_has_no_pool_figures() {
        reset_peak(&Device::Cpu);
        assert_eq!(peak_bytes(&Device::Cpu), None);
        assert_eq!(used_bytes(&Device::Cpu), None);
        assert_eq!(free_bytes(&Device::Cpu), None);
        assert_eq!(snapshot(&Device::Cpu), None);
        let budget = MemoryBudget::new("test", 1 << 30, 4);
        assert_eq!(fit_budget(&budget, &Device::Cpu, 0), None);
        assert_eq!(budget.snapshot().capacity, 1 << 30);
    }
}
