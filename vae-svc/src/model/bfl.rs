//! Loading BFL's single-file `ae.safetensors` under the diffusers names (spec §3.4,
//! pitfall 19). Differences handled here:
//! - `down.{i}.block.{j}` / `up.{n-1-i}.block.{j}` (decoder up blocks are stored in reverse),
//!   `nin_shortcut`, `downsample.conv` / `upsample.conv`, `mid.block_{1,2}`, `norm_out`;
//! - `mid.attn_1.{norm,q,k,v,proj_out}` are 1x1 convolutions `[C, C, 1, 1]`; the diffusers
//!   model wants `[C, C]` linear weights;
//! - `encoder.quant_conv` / `decoder.post_quant_conv` sit inside the encoder / decoder.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};

/// A key that only BFL files have (used to tell the two layouts apart).
pub const BFL_PROBE_KEY: &str = "encoder.down.0.block.0.conv1.weight";

/// The BFL name of a diffusers VAE key, for a VAE with `stages` up blocks.
pub fn bfl_name(name: &str, stages: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let rest = |from: usize| parts[from..].join(".");
    let resnet_leaf = |from: usize| rest(from).replace("conv_shortcut", "nin_shortcut");
    match parts.as_slice() {
        ["quant_conv", ..] => format!("encoder.{name}"),
        ["post_quant_conv", ..] => format!("decoder.{name}"),
        [side, "conv_norm_out", ..] => format!("{side}.norm_out.{}", rest(2)),
        ["encoder", "down_blocks", i, "resnets", j, ..] => {
            format!("encoder.down.{i}.block.{j}.{}", resnet_leaf(5))
        }
        ["encoder", "down_blocks", i, "downsamplers", "0", ..] => {
            format!("encoder.down.{i}.downsample.{}", rest(5))
        }
        ["decoder", "up_blocks", i, tail @ ..] => {
            let k = i
                .parse::<usize>()
                .map_or(usize::MAX, |i| stages.saturating_sub(1 + i));
            match tail {
                ["resnets", j, ..] => format!("decoder.up.{k}.block.{j}.{}", resnet_leaf(5)),
                ["upsamplers", "0", ..] => format!("decoder.up.{k}.upsample.{}", rest(5)),
                _ => name.to_owned(),
            }
        }
        [side, "mid_block", "resnets", j, ..] => {
            let k = j.parse::<usize>().map_or(0, |j| j + 1);
            format!("{side}.mid.block_{k}.{}", resnet_leaf(4))
        }
        [side, "mid_block", "attentions", "0", layer, ..] => {
            let (bfl, from) = match *layer {
                "group_norm" => ("norm", 5),
                "to_q" => ("q", 5),
                "to_k" => ("k", 5),
                "to_v" => ("v", 5),
                "to_out" => ("proj_out", 6),
                _ => (*layer, 5),
            };
            format!("{side}.mid.attn_1.{bfl}.{}", rest(from))
        }
        _ => name.to_owned(),
    }
}

/// A weight source that answers diffusers names from a BFL-layout [`VarBuilder`].
pub struct BflBackend {
    inner: VarBuilder<'static>,
    stages: usize,
}

impl BflBackend {
    /// Wraps `inner` (the BFL file) for a VAE with `stages` up blocks.
    pub fn new(inner: VarBuilder<'static>, stages: usize) -> Self {
        Self { inner, stages }
    }
}

impl SimpleBackend for BflBackend {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let bfl = bfl_name(name, self.stages);
        let mut t = self.inner.get_unchecked_dtype(&bfl, dtype)?;
        if t.rank() == 4 && s.rank() == 2 && t.dims()[2..] == [1, 1] {
            t = t.squeeze(3)?.squeeze(2)?;
        }
        if t.shape() != &s {
            candle_core::bail!(
                "{bfl} (for {name}): shape {:?}, expected {:?}",
                t.shape(),
                s
            );
        }
        t.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.inner
            .get_unchecked_dtype(&bfl_name(name, self.stages), dtype)?
            .to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(&bfl_name(name, self.stages))
    }
}

#[cfg(test)]
mod tests {
    use super::bfl_name;

    #[test]
    fn maps_every_kind_of_key() {
        let cases = [
            ("quant_conv.weight", "encoder.quant_conv.weight"),
            ("post_quant_conv.bias", "decoder.post_quant_conv.bias"),
            ("bn.running_var", "bn.running_var"),
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
            ("decoder.conv_norm_out.bias", "decoder.norm_out.bias"),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
                "encoder.down.2.downsample.conv.bias",
            ),
            (
                "decoder.up_blocks.0.resnets.2.norm1.weight",
                "decoder.up.3.block.2.norm1.weight",
            ),
            (
                "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
                "decoder.up.0.block.0.nin_shortcut.bias",
            ),
            (
                "decoder.up_blocks.1.upsamplers.0.conv.weight",
                "decoder.up.2.upsample.conv.weight",
            ),
            (
                "encoder.mid_block.resnets.1.conv2.weight",
                "encoder.mid.block_2.conv2.weight",
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.weight",
                "decoder.mid.attn_1.norm.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_q.bias",
                "decoder.mid.attn_1.q.bias",
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
            ),
        ];
        for (diffusers, bfl) in cases {
            assert_eq!(bfl_name(diffusers, 4), bfl, "{diffusers}");
        }
    }
}
