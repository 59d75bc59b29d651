"""Tiny random-weight FLUX.2 [klein] components (real diffusers / transformers classes).

Every weight is initialised from a fixed torch.Generator seed with a "sensitive" scheme (spec §8.1,
§8.2): norm gains around 1 ± 0.3, non-zero biases, modulation weights of normal size, damped
high-frequency time-embedding columns, and activations kept O(1) through the 28 Qwen3 layers.
Then every floating tensor is rounded once to a bf16-representable value, so an f32 and a bf16
pipeline load the very same numbers.
"""

from __future__ import annotations

import math

import torch

from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

# ----------------------------------------------------------------------------------------------
# configs

TEXT_HIDDEN = 64
TEXT_LAYERS = 28

QWEN3_CONFIG = dict(
    hidden_size=TEXT_HIDDEN,
    intermediate_size=128,
    num_hidden_layers=TEXT_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    hidden_act="silu",
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=True,
    attention_bias=False,
    attention_dropout=0.0,
    use_sliding_window=False,
    sliding_window=None,
    max_window_layers=TEXT_LAYERS,
    use_cache=True,
    initializer_range=0.02,
)

# klein-9B's text encoder is Qwen3-8B: wider than Qwen3-4B, q heads x head_dim = hidden, an untied
# lm_head (saved, never used by the pipeline). Same 28 layers (hidden_states 9/18/27), same vocab.
TEXT_HIDDEN_9B = 96

QWEN3_9B_CONFIG = dict(
    QWEN3_CONFIG,
    hidden_size=TEXT_HIDDEN_9B,
    intermediate_size=128,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=128,
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=3 * TEXT_HIDDEN,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(8, 8, 8, 8),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)

# klein-9B relative to klein-4B: more double/single blocks, more heads of the same width, a wider
# context (3 x the Qwen3-8B-like hidden size).
TRANSFORMER_9B_CONFIG = dict(
    TRANSFORMER_CONFIG,
    num_layers=3,
    num_single_layers=3,
    num_attention_heads=3,
    joint_attention_dim=3 * TEXT_HIDDEN_9B,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=32,
    norm_num_groups=4,
    sample_size=1024,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    batch_norm_eps=1e-4,
    batch_norm_momentum=0.1,
    patch_size=(2, 2),
)

# spec §1.5 (verbatim FLUX.2 scheduler_config.json)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
    invert_sigmas=False,
    shift_terminal=None,
    stochastic_sampling=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
)


# ----------------------------------------------------------------------------------------------
# helpers


def bf16_round_(module: torch.nn.Module) -> None:
    """Round every floating parameter and buffer to the nearest bf16 value (kept in f32)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).to(t.dtype))


def _normal(g: torch.Generator, shape, std: float, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean


def _uniform(g: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(shape, generator=g, dtype=torch.float32) * (hi - lo) + lo


def _gain(g: torch.Generator, shape) -> torch.Tensor:
    """Norm gain around 1 +- 0.3."""
    return _uniform(g, shape, 0.7, 1.3)


# ----------------------------------------------------------------------------------------------
# text encoder


def make_text_encoder(vocab_size: int, seed: int, config: dict = QWEN3_CONFIG) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(vocab_size=vocab_size, **config)
    # ids as in Qwen3-4B's config, remapped to the tiny vocab by the caller
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.copy_(_normal(g, p.shape, 1.0))
            elif "norm" in name:  # input_layernorm, post_attention_layernorm, q_norm, k_norm, model.norm
                p.copy_(_gain(g, p.shape))
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(_normal(g, p.shape, 0.6 / math.sqrt(p.shape[1])))
            elif name.endswith(".weight") and p.ndim == 2:  # projections; lm_head when untied (tied: not listed)
                p.copy_(_normal(g, p.shape, 1.0 / math.sqrt(p.shape[1])))
            else:
                raise RuntimeError(f"unhandled text-encoder parameter {name}")
    bf16_round_(model)
    return model


# ----------------------------------------------------------------------------------------------
# transformer


def _time_damping(n_freq: int = 128, f0: float = 0.02) -> torch.Tensor:
    """Per-column factor for time_guidance_embed.timestep_embedder.linear_1 ([cos | sin] x 128).

    Frequencies f_k = exp(-ln(1e4) k / 128). A bf16 timestep moves tau by up to 2 near 1000, so the
    phase of the highest frequencies is pure noise between an f32 and a bf16 run; a trained model is
    smooth in time. Damp by 1 / (1 + (f_k / f0)^2).
    """
    k = torch.arange(n_freq, dtype=torch.float64)
    f = torch.exp(-math.log(10000.0) * k / n_freq)
    d = 1.0 / (1.0 + (f / f0) ** 2)
    return torch.cat([d, d]).to(torch.float32)


# DiT QK-RMSNorm gains. With gains ~1 the logits q.k/sqrt(32) have std ~1 and attention over the 512
# (mostly padding) text tokens is nearly uniform, so references and prompt content barely matter.
# Gains ~2 (logit std ~4) give trained-model-like sharp attention.
QK_GAIN = (1.6, 2.4)


def make_transformer(seed: int, ctx_rms: float, config: dict = TRANSFORMER_CONFIG) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**config).eval()
    g = torch.Generator().manual_seed(seed)
    damp = _time_damping()
    n_live = float(damp.pow(2).sum())
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[1] if p.ndim == 2 else None
            if "norm" in name and p.ndim == 1:  # norm_q / norm_k / norm_added_q / norm_added_k
                p.copy_(_uniform(g, p.shape, QK_GAIN[0], QK_GAIN[1]))
            elif name == "time_guidance_embed.timestep_embedder.linear_1.weight":
                w = _normal(g, p.shape, 1.0 / math.sqrt(n_live)) * damp[None, :] * 1.5
                p.copy_(w)
            elif name == "context_embedder.weight":
                p.copy_(_normal(g, p.shape, 1.0 / (math.sqrt(fan_in) * ctx_rms)))
            elif "modulation" in name or name == "norm_out.linear.weight":
                p.copy_(_normal(g, p.shape, 1.0 / math.sqrt(fan_in)))
            elif p.ndim == 2:
                p.copy_(_normal(g, p.shape, 1.0 / math.sqrt(fan_in)))
            else:
                raise RuntimeError(f"unhandled transformer parameter {name} {tuple(p.shape)}")
    bf16_round_(model)
    return model


# ----------------------------------------------------------------------------------------------
# VAE


def make_vae(seed: int) -> AutoencoderKLFlux2:
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**VAE_CONFIG).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4:  # conv
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                gain = 0.7 if name.endswith("conv2.weight") else 1.0
                p.copy_(_normal(g, p.shape, gain / math.sqrt(fan_in)))
            elif p.ndim == 2:  # mid-block attention linears
                p.copy_(_normal(g, p.shape, 1.0 / math.sqrt(p.shape[1])))
            elif p.ndim == 1 and ("norm" in name) and name.endswith(".weight"):  # GroupNorm gains
                p.copy_(_gain(g, p.shape))
            elif p.ndim == 1 and name.endswith(".bias"):
                std = 0.1 if "norm" in name else 0.05
                p.copy_(_normal(g, p.shape, std))
            else:
                raise RuntimeError(f"unhandled vae parameter {name} {tuple(p.shape)}")
    bf16_round_(model)
    return model


def calibrate_vae_(vae: AutoencoderKLFlux2, images: torch.Tensor, seed: int) -> dict:
    """Scale encoder/decoder output convs and set BN running stats from data (all deterministic).

    images: [B,3,H,W] in [-1,1], f32.
    - posterior mean std scaled to ~2.5 (so bn.running_var is far from 1);
    - bn.running_mean = per-channel mean of patchified latents + N(0, 0.3*std) offset,
      bn.running_var = per-channel var * U(0.5, 2);
    - decoder conv_out scaled so that decoding N(0,1) normalised latents gives pixel std ~0.55.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mode()
        s = 2.5 / float(mean.std())
        # quant_conv is 1x1 over [mean | logvar] channels: scale the mean half only
        vae.quant_conv.weight[:32].mul_(s)
        vae.quant_conv.bias[:32].mul_(s)
        bf16_round_(vae)
        mean = vae.encode(images).latent_dist.mode()
        b, c, h, w = mean.shape
        pz = mean.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        ch_mean = pz.mean(dim=(0, 2, 3))
        ch_var = pz.var(dim=(0, 2, 3))
        rm = ch_mean + _normal(g, ch_mean.shape, 1.0) * 0.3 * ch_var.sqrt()
        rv = ch_var * _uniform(g, ch_var.shape, 0.5, 2.0)
        vae.bn.running_mean.copy_(rm)
        vae.bn.running_var.copy_(rv)
        bf16_round_(vae)
        # decoder output scale: decode N(0,1) normalised latents
        z = _normal(g, (2, 128, h // 2, w // 2), 1.0)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        zz = z * std + vae.bn.running_mean.view(1, -1, 1, 1)
        zz = zz.reshape(2, 32, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(2, 32, h, w)
        img = vae.decode(zz).sample
        s2 = 0.55 / float(img.std())
        vae.decoder.conv_out.weight.mul_(s2)
        vae.decoder.conv_out.bias.mul_(s2)
        bf16_round_(vae)
        img = vae.decode(zz).sample
    return {
        "posterior_mean_std": float(mean.std()),
        "bn_running_var_min": float(vae.bn.running_var.min()),
        "bn_running_var_max": float(vae.bn.running_var.max()),
        "decoded_std": float(img.std()),
        "decoded_mean": float(img.mean()),
    }


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
