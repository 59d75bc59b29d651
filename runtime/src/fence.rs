//! A mark in a device's queue of work that the host can wait for later.
//!
//! A CUDA device runs queued work while the host goes on: an engine can queue a job's next
//! step before the last one has finished, so the device never waits for the host between
//! steps, and wait for each step's [`Fence`] to report it. The CPU computes as the host calls
//! it: its fences are passed as they are made.

use candle_core::{Device, Result};

/// What [`Fence::record`] marked.
pub struct Fence(Mark);

enum Mark {
    /// The work had already finished (the CPU).
    Passed,
    /// An event recorded on the device's stream (CUDA).
    #[cfg(feature = "cuda")]
    Event(candle_core::cuda::cudarc::driver::CudaEvent),
}

impl Fence {
    /// Marks the work queued on `dev` so far. A device without events here (Metal) is
    /// synchronised instead: its fence is passed.
    pub fn record(dev: &Device) -> Result<Self> {
        Ok(Self(match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                use candle_core::cuda::{
                    WrapErr, cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
                };
                Mark::Event(
                    cuda.cuda_stream()
                        .record_event(Some(CU_EVENT_DISABLE_TIMING))
                        .w()?,
                )
            }
            other => {
                other.synchronize()?;
                Mark::Passed
            }
        }))
    }

    /// Whether the marked work may still be running: waiting for it may block.
    pub fn pending(&self) -> bool {
        !matches!(self.0, Mark::Passed)
    }

    /// Waits until the marked work has finished; an error of that work (or of anything queued
    /// before it) surfaces here.
    pub fn wait(&self) -> Result<()> {
        match &self.0 {
            Mark::Passed => Ok(()),
            #[cfg(feature = "cuda")]
            Mark::Event(event) => {
                use candle_core::cuda::WrapErr;
                event.synchronize().w()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_fences_are_passed_when_made() -> Result<()> {
        let fence = Fence::record(&Device::Cpu)?;
        assert!(!fence.pending());
        fence.wait()
    }
}
