//! Black Forest Labs single-file checkpoints (`flux-2-klein-4b.safetensors`) read under the
//! diffusers names (spec §3.3): the fused `qkv` weights are split in three, and the final
//! layer's adaLN rows are swapped from BFL's (shift, scale) to diffusers' (scale, shift).
//!
//! BFL's and ComfyUI's fp8 files (`flux-2-klein-9b-fp8.safetensors`) store weights in
//! float8 e4m3 with a per-tensor `weight_scale` beside each (and an `input_scale` for fp8
//! activations): a weight is read as `w · weight_scale`, in f32, then in the model dtype
//! (weight-only, as ComfyUI computes on cards without fp8 matrix units), on the device it goes
//! to ([`klein_kernels::scale_fp8`]). ComfyUI's copies keep the names under [`PREFIX`].

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};

use super::transformer::Config;

/// The prefix ComfyUI and stable-diffusion.cpp keep diffusion-model tensors under.
pub const PREFIX: &str = "model.diffusion_model.";

/// The per-tensor scale stored beside fp8 weight `name`.
pub fn weight_scale(name: &str) -> Option<String> {
    name.strip_suffix(".weight")
        .map(|stem| format!("{stem}.weight_scale"))
}

/// Whether `name` is a companion of an fp8 weight (its scales, ComfyUI's format marker)
/// rather than a tensor of the model.
pub fn is_companion(name: &str) -> bool {
    [".weight_scale", ".input_scale", ".comfy_quant"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// A weight times its per-tensor scale (a one-element tensor) in f32, then in `dtype`: float8
/// e4m3 weights in one pass on their device ([`klein_kernels::scale_fp8`], the same values),
/// others through f32.
pub fn scaled(w: &Tensor, scale: &Tensor, dtype: DType) -> Result<Tensor> {
    let scale = scale.to_dtype(DType::F32)?.flatten_all()?;
    if w.dtype() == DType::F8E4M3 {
        let scale = scale
            .to_device(&Device::Cpu)?
            .reshape(())?
            .to_scalar::<f32>()?;
        return klein_kernels::scale_fp8(w, scale, dtype);
    }
    w.to_dtype(DType::F32)?
        .broadcast_mul(&scale.reshape(())?.to_device(w.device())?)?
        .to_dtype(dtype)
}

/// Where a diffusers tensor comes from in a BFL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The same tensor under another name.
    Plain(String),
    /// Row block `index` of three equal row blocks (q, k, v of a fused `qkv`).
    Chunk3(String, usize),
    /// The tensor with its two row halves swapped.
    SwapHalves(String),
}

impl Source {
    /// The BFL tensor's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Plain(s) | Self::Chunk3(s, _) | Self::SwapHalves(s) => s,
        }
    }

    /// The diffusers tensor from `t`, the BFL tensor, or any tensor with its rows (a LoRA's B
    /// for it).
    pub fn rows(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain(_) => Ok(t.clone()),
            Self::Chunk3(_, i) => {
                let rows = t.dim(0)? / 3;
                t.narrow(0, i * rows, rows)?.contiguous()
            }
            Self::SwapHalves(_) => {
                let half = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
            }
        }
    }
}

/// The BFL source of the diffusers tensor `name`, or `None` for a name BFL files do not have.
pub fn source(name: &str) -> Option<Source> {
    use Source::*;
    let plain = |s: &str| Some(Plain(s.to_owned()));
    match name {
        "x_embedder.weight" => return plain("img_in.weight"),
        "context_embedder.weight" => return plain("txt_in.weight"),
        "time_guidance_embed.timestep_embedder.linear_1.weight" => {
            return plain("time_in.in_layer.weight");
        }
        "time_guidance_embed.timestep_embedder.linear_2.weight" => {
            return plain("time_in.out_layer.weight");
        }
        "double_stream_modulation_img.linear.weight" => {
            return plain("double_stream_modulation_img.lin.weight");
        }
        "double_stream_modulation_txt.linear.weight" => {
            return plain("double_stream_modulation_txt.lin.weight");
        }
        "single_stream_modulation.linear.weight" => {
            return plain("single_stream_modulation.lin.weight");
        }
        "norm_out.linear.weight" => {
            return Some(SwapHalves("final_layer.adaLN_modulation.1.weight".into()));
        }
        "proj_out.weight" => return plain("final_layer.linear.weight"),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("transformer_blocks.") {
        let (n, key) = rest.split_once('.')?;
        let p = format!("double_blocks.{n}");
        let chunk = |stream: &str, i| Some(Chunk3(format!("{p}.{stream}_attn.qkv.weight"), i));
        return match key {
            "attn.to_q.weight" => chunk("img", 0),
            "attn.to_k.weight" => chunk("img", 1),
            "attn.to_v.weight" => chunk("img", 2),
            "attn.add_q_proj.weight" => chunk("txt", 0),
            "attn.add_k_proj.weight" => chunk("txt", 1),
            "attn.add_v_proj.weight" => chunk("txt", 2),
            "attn.to_out.0.weight" => plain(&format!("{p}.img_attn.proj.weight")),
            "attn.to_add_out.weight" => plain(&format!("{p}.txt_attn.proj.weight")),
            "attn.norm_q.weight" => plain(&format!("{p}.img_attn.norm.query_norm.scale")),
            "attn.norm_k.weight" => plain(&format!("{p}.img_attn.norm.key_norm.scale")),
            "attn.norm_added_q.weight" => plain(&format!("{p}.txt_attn.norm.query_norm.scale")),
            "attn.norm_added_k.weight" => plain(&format!("{p}.txt_attn.norm.key_norm.scale")),
            "ff.linear_in.weight" => plain(&format!("{p}.img_mlp.0.weight")),
            "ff.linear_out.weight" => plain(&format!("{p}.img_mlp.2.weight")),
            "ff_context.linear_in.weight" => plain(&format!("{p}.txt_mlp.0.weight")),
            "ff_context.linear_out.weight" => plain(&format!("{p}.txt_mlp.2.weight")),
            _ => None,
        };
    }
    if let Some(rest) = name.strip_prefix("single_transformer_blocks.") {
        let (n, key) = rest.split_once('.')?;
        let p = format!("single_blocks.{n}");
        return match key {
            "attn.to_qkv_mlp_proj.weight" => plain(&format!("{p}.linear1.weight")),
            "attn.to_out.weight" => plain(&format!("{p}.linear2.weight")),
            "attn.norm_q.weight" => plain(&format!("{p}.norm.query_norm.scale")),
            "attn.norm_k.weight" => plain(&format!("{p}.norm.key_norm.scale")),
            _ => None,
        };
    }
    None
}

/// Whether BFL tensor `name` is one of the blocks' projections (the weights
/// [`Config::projections`] lists): a fused `qkv`, an attention output, an MLP layer, a single
/// block's `linear1` / `linear2`.
pub fn is_projection(name: &str) -> bool {
    let Some((blocks, rest)) = name.split_once('.') else {
        return false;
    };
    let Some((_, key)) = rest.split_once('.') else {
        return false;
    };
    match blocks {
        "double_blocks" => matches!(
            key,
            "img_attn.qkv.weight"
                | "txt_attn.qkv.weight"
                | "img_attn.proj.weight"
                | "txt_attn.proj.weight"
                | "img_mlp.0.weight"
                | "img_mlp.2.weight"
                | "txt_mlp.0.weight"
                | "txt_mlp.2.weight"
        ),
        "single_blocks" => matches!(key, "linear1.weight" | "linear2.weight"),
        _ => false,
    }
}

/// A BFL checkpoint seen through diffusers names.
pub struct BflBackend {
    inner: VarBuilder<'static>,
    /// The BFL names of the weights stored in float8 e4m3.
    fp8: Arc<BTreeSet<String>>,
}

impl BflBackend {
    /// Wraps a [`VarBuilder`] over the BFL file's own names, `fp8` those of its float8 weights.
    pub fn new(inner: VarBuilder<'static>, fp8: Arc<BTreeSet<String>>) -> Self {
        Self { inner, fp8 }
    }

    /// A [`VarBuilder`] with diffusers names over `inner`.
    pub fn var_builder(
        inner: VarBuilder<'static>,
        fp8: Arc<BTreeSet<String>>,
    ) -> VarBuilder<'static> {
        let (dtype, device) = (inner.dtype(), inner.device().clone());
        VarBuilder::from_backend(Box::new(Self::new(inner, fp8)), dtype, device)
    }

    fn load(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let missing = || candle_core::Error::CannotFindTensor { path: name.into() };
        let source = source(name).ok_or_else(missing)?;
        source.rows(&self.read(source.name(), dtype)?)
    }

    /// BFL tensor `src` in `dtype`, a weight with a scale scaled first: a float8 one read as
    /// stored onto the device and scaled there, any other on the host (candle casts float8
    /// only there).
    fn read(&self, src: &str, dtype: DType) -> Result<Tensor> {
        let Some(scale) = weight_scale(src).filter(|s| self.inner.contains_tensor(s)) else {
            return self.inner.get_unchecked_dtype(src, dtype);
        };
        let host = self.inner.clone().set_device(Device::Cpu);
        let scale = host.get_unchecked_dtype(&scale, DType::F32)?;
        if self.fp8.contains(src) {
            return scaled(
                &self.inner.get_unchecked_dtype(src, DType::F8E4M3)?,
                &scale,
                dtype,
            );
        }
        scaled(&host.get_unchecked_dtype(src, DType::F32)?, &scale, dtype)?
            .to_device(self.inner.device())
    }
}

/// `t` when it has shape `s`, else the error a `VarBuilder` gives for tensor `name`.
pub fn expect_shape(t: Tensor, s: Shape, name: &str) -> Result<Tensor> {
    if t.shape() != &s {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: s,
            got: t.shape().clone(),
        }
        .bt());
    }
    Ok(t)
}

impl SimpleBackend for BflBackend {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        expect_shape(self.load(name, dtype)?, s, name)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        source(name).is_some_and(|s| self.inner.contains_tensor(s.name()))
    }
}

/// Derives the transformer [`Config`] of a BFL file from its tensor shapes (BFL files carry no
/// config): hidden size from `img_in`, context width from `txt_in`, head dim from the QK norm,
/// MLP ratio from `img_mlp.0`, block counts from the block indices. `None` when a key is missing.
pub fn config_from_shapes(shapes: &BTreeMap<String, Vec<usize>>) -> Option<Config> {
    let dims = |k: &str| shapes.get(k).map(Vec::as_slice);
    let [d, in_channels] = *dims("img_in.weight")? else {
        return None;
    };
    let [_, joint] = *dims("txt_in.weight")? else {
        return None;
    };
    let [head_dim] = *dims("double_blocks.0.img_attn.norm.query_norm.scale")? else {
        return None;
    };
    let [two_f, _] = *dims("double_blocks.0.img_mlp.0.weight")? else {
        return None;
    };
    let count = |prefix: &str| {
        shapes
            .keys()
            .filter_map(|k| {
                k.strip_prefix(prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |m| m + 1)
    };
    if head_dim == 0 || d % head_dim != 0 || head_dim % 4 != 0 {
        return None;
    }
    Some(Config {
        in_channels,
        num_layers: count("double_blocks."),
        num_single_layers: count("single_blocks."),
        attention_head_dim: head_dim,
        num_attention_heads: d / head_dim,
        joint_attention_dim: joint,
        mlp_ratio: two_f as f64 / 2.0 / d as f64,
        axes_dims_rope: vec![head_dim / 4; 4],
        ..Config::klein_4b()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_diffusers_key_family() {
        assert_eq!(
            source("transformer_blocks.3.attn.add_k_proj.weight"),
            Some(Source::Chunk3(
                "double_blocks.3.txt_attn.qkv.weight".into(),
                1
            ))
        );
        assert_eq!(
            source("norm_out.linear.weight"),
            Some(Source::SwapHalves(
                "final_layer.adaLN_modulation.1.weight".into()
            ))
        );
        assert_eq!(
            source("single_transformer_blocks.19.attn.norm_k.weight"),
            Some(Source::Plain("single_blocks.19.norm.key_norm.scale".into()))
        );
        assert_eq!(source("guidance_in.in_layer.weight"), None);
    }

    #[test]
    fn derives_the_klein_4b_config_from_shapes() {
        let mut shapes = BTreeMap::new();
        shapes.insert("img_in.weight".to_owned(), vec![3072, 128]);
        shapes.insert("txt_in.weight".to_owned(), vec![3072, 7680]);
        shapes.insert(
            "double_blocks.0.img_attn.norm.query_norm.scale".to_owned(),
            vec![128],
        );
        shapes.insert(
            "double_blocks.0.img_mlp.0.weight".to_owned(),
            vec![18432, 3072],
        );
        shapes.insert(
            "double_blocks.4.img_mlp.0.weight".to_owned(),
            vec![18432, 3072],
        );
        shapes.insert(
            "single_blocks.19.linear1.weight".to_owned(),
            vec![27648, 3072],
        );
        assert_eq!(config_from_shapes(&shapes), Some(Config::klein_4b()));
    }
}
