//! CUDA graphs of a fixed-shape forward: captured once, then replayed with new inputs.
//!
//! A transformer step is ~300 kernels, copies and memsets. Launched one by one, each costs
//! the host 10–25 µs, ~3 ms a 1024² step; a step that starts from an empty queue then leaves
//! the GPU idle ~0.6–0.9 ms of its 55 ms (docs/performance.md, thirty-second and thirty-third
//! sessions). A graph queues all of them with one launch, and its small memsets run as
//! kernels (`nodes`).
//!
//! [`Graphs`] keeps one graph per key (the forward's input shapes). The first call of a key
//! runs eagerly, which builds whatever the forward creates lazily and keeps (library handles
//! and workspaces, tuned GEMM algorithms, loaded kernel modules, the attention's counters),
//! so that nothing kept is allocated while capturing; the second call captures the forward
//! over static copies of its inputs; every later call copies its inputs into those, replays
//! the graph and copies the output out. Replays run the captured kernels on the same
//! addresses, so they give the eager forward's bits.
//!
//! Whatever the forward allocates while capturing becomes the graph's own memory (graph
//! memory nodes, outside the default pool), which stays mapped between replays until
//! [`crate::gpu_memory::release_freed_memory`] trims it. A graph that copies between host and
//! device is refused: candle uploads the dims and strides of strided or broadcast operands and
//! of reductions from a host buffer freed right after, which a replay would read again (the
//! tiny fixtures' replays gave wrong bits and illegal addresses before this check). A key
//! whose capture is refused or fails, or whose replay fails (memory the graph cannot map),
//! runs eagerly from then on.

use std::{
    cell::RefCell,
    collections::HashMap,
    hash::Hash,
    thread::{self, ThreadId},
};

use candle_core::{DType, Device, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
mod capture;
#[cfg(feature = "cuda")]
mod nodes;

/// Graphs of one forward, by key; see the module's doc. Single-threaded: a graph is used on
/// the thread (and stream) that captured it, the engine's.
pub struct Graphs<K> {
    enabled: bool,
    keys: RefCell<HashMap<K, State>>,
}

/// Where a key stands.
enum State {
    /// Ran eagerly once, giving an output of this shape and dtype.
    Seen(Shape, DType),
    Captured(Replay),
    /// Capturing or replaying failed: eager from now on.
    Eager,
}

impl<K: Eq + Hash + Clone + std::fmt::Debug> Graphs<K> {
    /// Graphs on when `enabled` and `dev` is a CUDA device whose buffers carry no cudarc
    /// events (devices opened by [`crate::device::DeviceSpec::open`]): a captured stream may
    /// not wait on events recorded outside the capture.
    pub fn new(enabled: bool, dev: &Device) -> Self {
        Self {
            enabled: enabled && capturable(dev),
            keys: RefCell::new(HashMap::new()),
        }
    }

    /// Whether calls may replay graphs.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Memsets of the captured graphs that run as kernels (see the `nodes` module).
    pub fn memsets_as_kernels(&self) -> usize {
        let keys = self.keys.borrow();
        keys.values()
            .map(|s| match s {
                State::Captured(replay) => replay.memsets_as_kernels(),
                _ => 0,
            })
            .sum()
    }

    /// Keys with a captured graph.
    pub fn captured(&self) -> usize {
        let keys = self.keys.borrow();
        keys.values()
            .filter(|s| matches!(s, State::Captured(_)))
            .count()
    }

    /// `forward(inputs)`, run eagerly or replayed from `key`'s graph. Every call of a key must
    /// give inputs of the same shapes and dtypes, and `forward` must depend on nothing but its
    /// inputs and memory that outlives the graphs (the weights).
    pub fn run(
        &self,
        key: &K,
        inputs: &[&Tensor],
        forward: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let eager = || {
            let owned: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
            forward(&owned)
        };
        if !self.enabled {
            return eager();
        }
        let mut keys = self.keys.borrow_mut();
        match keys.get(key) {
            None => {
                let out = eager()?;
                keys.insert(key.clone(), State::Seen(out.shape().clone(), out.dtype()));
                Ok(out)
            }
            Some(State::Eager) => eager(),
            // A graph is launched on the thread that captured it, whose stream, library
            // workspaces and attention counters it was captured with.
            Some(State::Captured(replay)) if replay.thread != thread::current().id() => eager(),
            Some(State::Captured(replay)) => match replay.run(inputs) {
                Ok(out) => Ok(out),
                Err(e) => {
                    tracing::warn!(?key, error = %e, "CUDA graph replay failed; eager from now on");
                    keys.insert(key.clone(), State::Eager);
                    eager()
                }
            },
            Some(State::Seen(shape, dtype)) => {
                let (shape, dtype) = (shape.clone(), *dtype);
                let captured = Replay::capture(inputs, (&shape, dtype), &forward)
                    .and_then(|replay| Ok((replay.run(inputs)?, replay)));
                match captured {
                    Ok((out, replay)) => {
                        tracing::debug!(?key, "CUDA graph captured");
                        keys.insert(key.clone(), State::Captured(replay));
                        Ok(out)
                    }
                    Err(e) => {
                        tracing::warn!(?key, error = %e, "CUDA graph capture failed; eager from now on");
                        keys.insert(key.clone(), State::Eager);
                        eager()
                    }
                }
            }
        }
    }
}

/// A captured forward: the static inputs it reads, the static output it writes, the graph,
/// and the thread that captured it.
struct Replay {
    inputs: Vec<Tensor>,
    output: Tensor,
    thread: ThreadId,
    #[cfg(feature = "cuda")]
    exec: capture::Exec,
}

// SAFETY: the graph's handles are raw pointers, so not `Send` by default; CUDA lets a graph
// be used from any thread as long as no two threads use it at once. `Graphs` is not `Sync`
// (a `RefCell`), so a moved `Replay` is used by one thread at a time, and [`Graphs::run`]
// launches it only on the thread that captured it (the stream and thread-local state it was
// captured with); elsewhere the forward runs eagerly.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
unsafe impl Send for Replay {}

impl Replay {
    /// Copies `inputs` into the graph's, replays it and returns a copy of its output (the next
    /// replay overwrites the graph's).
    fn run(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        for (fixed, input) in self.inputs.iter().zip(inputs) {
            fixed.slice_set(&input.contiguous()?, 0, 0)?;
        }
        self.launch()?;
        self.output.copy()
    }
}

#[cfg(feature = "cuda")]
fn capturable(dev: &Device) -> bool {
    match dev {
        Device::Cuda(cuda) => !cuda.cuda_stream().context().is_event_tracking(),
        _ => false,
    }
}

#[cfg(not(feature = "cuda"))]
fn capturable(_: &Device) -> bool {
    false
}

#[cfg(not(feature = "cuda"))]
impl Replay {
    fn capture(
        _: &[&Tensor],
        _: (&Shape, DType),
        _: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Self> {
        candle_core::bail!("CUDA graphs need a build with the cuda feature")
    }

    fn launch(&self) -> Result<()> {
        candle_core::bail!("CUDA graphs need a build with the cuda feature")
    }

    fn memsets_as_kernels(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off the GPU every call runs the forward itself.
    #[test]
    fn cpu_calls_run_eagerly() -> Result<()> {
        let dev = Device::Cpu;
        let graphs = Graphs::<usize>::new(true, &dev);
        assert!(!graphs.enabled());
        let x = Tensor::arange(0f32, 6.0, &dev)?;
        for k in 0..3 {
            let y = graphs.run(&0, &[&x], |i| (&i[0] * (k as f64 + 1.0))?.exp())?;
            let want = (&x * (k as f64 + 1.0))?.exp()?;
            assert_eq!(y.to_vec1::<f32>()?, want.to_vec1::<f32>()?);
        }
        assert_eq!(graphs.captured(), 0);
        Ok(())
    }
}
