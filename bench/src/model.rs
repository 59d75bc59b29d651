//! Which klein model a benchmark or a written pipeline takes: its text encoder's and
//! transformer's configurations (spec section 1), as the services build them and as diffusers'
//! `config.json` files state them.

use serde_json::{Value, json};

/// A klein model (the VAE is the same for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// FLUX.2 [klein] 4B, Qwen3-4B as its text encoder.
    #[value(name = "klein-4b")]
    Klein4b,
    /// FLUX.2 [klein] 9B, Qwen3-8B as its text encoder.
    #[value(name = "klein-9b")]
    Klein9b,
}

impl Model {
    pub fn name(self) -> &'static str {
        match self {
            Self::Klein4b => "klein-4B",
            Self::Klein9b => "klein-9B",
        }
    }

    /// The text encoder's configuration and name.
    pub fn encoder(self) -> (encoder_svc::model::qwen3::Config, &'static str) {
        use encoder_svc::model::qwen3::Config;
        match self {
            Self::Klein4b => (Config::qwen3_4b(), "Qwen3-4B"),
            Self::Klein9b => (Config::qwen3_8b(), "Qwen3-8B"),
        }
    }

    pub fn transformer(self) -> denoiser_svc::model::Config {
        use denoiser_svc::model::Config;
        match self {
            Self::Klein4b => Config::klein_4b(),
            Self::Klein9b => Config::klein_9b(),
        }
    }

    /// `transformer/config.json` of the diffusers layout.
    pub fn transformer_json(self) -> Value {
        let c = self.transformer();
        json!({
            "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128,
            "out_channels": null, "num_layers": c.num_layers, "num_single_layers": c.num_single_layers,
            "attention_head_dim": c.attention_head_dim, "num_attention_heads": c.num_attention_heads,
            "joint_attention_dim": c.joint_attention_dim, "timestep_guidance_channels": 256,
            "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-6,
            "guidance_embeds": false
        })
    }

    /// `text_encoder/config.json` of the diffusers layout.
    pub fn encoder_json(self) -> Value {
        let (c, _) = self.encoder();
        json!({
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": 128, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 40960,
            "tie_word_embeddings": self == Self::Klein4b, "attention_bias": false,
            "hidden_act": "silu", "torch_dtype": "bfloat16"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `write-pipeline` states is what the services will build from it.
    #[test]
    fn the_written_configs_load_as_the_services_configs() {
        for model in [Model::Klein4b, Model::Klein9b] {
            let transformer: denoiser_svc::model::Config =
                serde_json::from_value(model.transformer_json()).unwrap();
            assert_eq!(transformer, model.transformer(), "{}", model.name());
            let encoder: encoder_svc::model::qwen3::Config =
                serde_json::from_value(model.encoder_json()).unwrap();
            assert_eq!(encoder, model.encoder().0, "{}", model.name());
        }
    }
}
