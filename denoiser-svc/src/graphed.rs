//! The transformer as the engine runs it: each step's forward replayed from a CUDA graph of
//! its shapes ([`klein_runtime::graph`]), so the ~300 operations of a step are queued with one
//! launch instead of one host call each. Off the GPU, or with `cuda_graphs = false`, every
//! forward runs eagerly; either way the velocity has the same bits.

use std::ops::Deref;

use candle_core::{Result, Tensor};
use klein_runtime::graph::Graphs;

use crate::{
    lora::ResidentAdapters,
    model::{Flux2Transformer2DModel, Rope},
    sampler::{TokenLayout, Velocity},
};

/// What a step's graph depends on besides the weights: the batch, the tokens of the
/// sequence, the text tokens and the outputs asked for (every input's shape follows).
type Key = [usize; 4];

/// A resident transformer, its LoRA adapters, and the graphs of the step shapes it has run.
/// Dropping it (the model evicted) drops its graphs, which point at its weights.
pub struct GraphedTransformer {
    model: Flux2Transformer2DModel,
    adapters: ResidentAdapters,
    graphs: Graphs<Key>,
}

impl GraphedTransformer {
    /// `model` with graphs when `cuda_graphs` and its device can capture them.
    pub fn new(
        model: Flux2Transformer2DModel,
        adapters: ResidentAdapters,
        cuda_graphs: bool,
        dev: &candle_core::Device,
    ) -> Self {
        Self {
            graphs: Graphs::new(cuda_graphs, dev),
            model,
            adapters,
        }
    }

    /// The model with the adapters `loras` names added unmerged, for one run: it shares the
    /// weights, and its steps run eagerly (the graphs hold the plain model's steps).
    pub fn adapted(&self, loras: &[(String, f32)]) -> Result<Flux2Transformer2DModel> {
        self.adapters.view(&self.model, loras)
    }

    /// Whether steps replay graphs.
    pub fn graphs_enabled(&self) -> bool {
        self.graphs.enabled()
    }

    /// Step shapes with a captured graph.
    pub fn graphs_captured(&self) -> usize {
        self.graphs.captured()
    }

    /// Memsets of the captured graphs that run as kernels.
    pub fn memsets_as_kernels(&self) -> usize {
        self.graphs.memsets_as_kernels()
    }
}

impl Deref for GraphedTransformer {
    type Target = Flux2Transformer2DModel;

    fn deref(&self) -> &Flux2Transformer2DModel {
        &self.model
    }
}

impl Velocity for GraphedTransformer {
    type Positions = Rope;

    fn positions(&self, layout: &TokenLayout) -> Result<Rope> {
        self.model.positions(layout)
    }

    fn velocity(
        &self,
        x: &Tensor,
        context: &Tensor,
        timesteps: &[f32],
        rope: &Rope,
        outputs: usize,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let key = [b, n, context.dim(1)?, outputs];
        let features = self
            .model
            .timestep_features(timesteps, x.dtype(), x.device())?;
        let inputs = [x, context, &features, &rope.cos, &rope.sin];
        self.graphs.run(&key, &inputs, |i| {
            let rope = Rope {
                cos: i[3].clone(),
                sin: i[4].clone(),
            };
            self.model
                .forward_features(&i[0], &i[1], &i[2], &rope, outputs)
        })
    }
}
