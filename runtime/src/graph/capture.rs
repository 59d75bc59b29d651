//! Capturing a forward into a CUDA graph, and launching it (CUDA builds).
#![allow(unsafe_code)]

use std::{sync::Arc, thread};

use candle_core::{
    DType, Result, Shape, Tensor,
    cuda::{
        WrapErr,
        cudarc::driver::{
            CudaContext, CudaStream, result,
            sys::{CUgraph, CUgraphExec, CUgraphInstantiate_flags_enum, CUstreamCaptureMode},
        },
    },
};

use super::{Replay, nodes};

impl Replay {
    /// Captures `forward` over zeroed copies of `inputs` into a graph whose last operation
    /// copies the result into a static output of `shape` and `dtype`. The default pool's
    /// unused memory goes back to the driver first: from here on the graph's own memory
    /// holds this key's activations.
    pub(super) fn capture(
        inputs: &[&Tensor],
        (shape, dtype): (&Shape, DType),
        forward: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Self> {
        let dev = inputs
            .first()
            .map(|t| t.device().clone())
            .ok_or_else(|| candle_core::Error::msg("a graph needs an input"))?;
        let fixed = inputs
            .iter()
            .map(|t| Tensor::zeros(t.shape(), t.dtype(), &dev))
            .collect::<Result<Vec<_>>>()?;
        let output = Tensor::zeros(shape, dtype, &dev)?;
        crate::gpu_memory::release_freed_memory(&dev);
        let cuda = dev.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .w()?;
        let recorded = forward(&fixed).and_then(|y| output.slice_set(&y.contiguous()?, 0, 0));
        // Ends the capture whatever happened, so the stream runs eagerly again.
        // SAFETY: the stream is capturing, begun above on this thread.
        let graph = unsafe { result::stream::end_capture(stream.cu_stream()) }
            .map(|raw| Graph::own(raw, stream.context()));
        recorded?;
        let graph = graph
            .w()?
            .ok_or_else(|| candle_core::Error::msg("the capture recorded no graph"))?;
        let census = nodes::census(graph.raw)?;
        if census.host_copies > 0 {
            candle_core::bail!(
                "the forward copied between host and device {} times, which a replay would \
                 repeat on host memory that is gone",
                census.host_copies
            );
        }
        let fills = nodes::memsets_as_kernels(graph.raw, cuda)?;
        tracing::debug!(
            ?census,
            memsets_as_kernels = fills.replaced(),
            "CUDA graph captured"
        );
        let exec = Exec::instantiate(graph, &stream, fills)?;
        Ok(Self {
            inputs: fixed,
            output,
            thread: thread::current().id(),
            exec,
        })
    }

    pub(super) fn launch(&self) -> Result<()> {
        self.exec.stream.context().bind_to_thread().w()?;
        // SAFETY: a live executable graph, launched on the stream it was captured on.
        unsafe { result::graph::launch(self.exec.raw, self.exec.stream.cu_stream()) }.w()
    }

    /// The capture's memsets that run as kernels.
    pub(super) fn memsets_as_kernels(&self) -> usize {
        self.exec.fills.replaced()
    }
}

/// A captured graph, destroyed with its owner.
struct Graph {
    raw: CUgraph,
    ctx: Arc<CudaContext>,
}

impl Graph {
    /// Owns `raw`, or `None` for the null graph of a capture that recorded nothing.
    fn own(raw: CUgraph, ctx: &Arc<CudaContext>) -> Option<Self> {
        (!raw.is_null()).then(|| Self {
            raw,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: the graph is owned here; its executable instance (if any) is gone already.
        self.ctx
            .record_err(unsafe { result::graph::destroy(self.raw) });
    }
}

/// A graph's executable instance, uploaded to the device, with the graph it came from and
/// the kernels its memsets became.
pub(super) struct Exec {
    raw: CUgraphExec,
    stream: Arc<CudaStream>,
    fills: nodes::Fills,
    _graph: Graph,
}

impl Exec {
    fn instantiate(graph: Graph, stream: &Arc<CudaStream>, fills: nodes::Fills) -> Result<Self> {
        // SAFETY: a valid graph, owned by `graph`, which the instance keeps alive.
        let raw =
            unsafe { result::graph::instantiate(graph.raw, CUgraphInstantiate_flags_enum(0)) }
                .w()?;
        let exec = Self {
            raw,
            stream: stream.clone(),
            fills,
            _graph: graph,
        };
        exec.fills.disable(exec.raw)?;
        // SAFETY: the instance and the stream are live.
        unsafe { result::graph::upload(exec.raw, exec.stream.cu_stream()) }.w()?;
        Ok(exec)
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        // SAFETY: the instance is owned here and destroyed once, before its graph.
        self.stream
            .context()
            .record_err(unsafe { result::graph::exec_destroy(self.raw) });
    }
}
