"""Build and save the tiny FLUX.2 [klein] checkpoints: 4B-shaped distilled + base, 9B-shaped distilled."""

from __future__ import annotations

import json
import os
import shutil

import torch

from diffusers import Flux2KleinPipeline
from transformers import AutoTokenizer

import tiny_models as M
import util
from tokenizer import write_source_tokenizer

SEED_TEXT_ENCODER = 1001
SEED_VAE = 1002
SEED_VAE_CALIB = 1003
SEED_TRANSFORMER_DISTILLED = 1004
SEED_TRANSFORMER_BASE = 1005
SEED_TEXT_ENCODER_9B = 1006
SEED_TRANSFORMER_9B = 1007

DISTILLED_DIR = "tiny-klein-4b"
BASE_DIR = "tiny-klein-base-4b"
DISTILLED_9B_DIR = "tiny-klein-9b"

# Text encoder is saved in bf16 (like the Hub's text_encoder/), sharded through
# model.safetensors.index.json. Transformer and VAE are saved in f32 (values bf16-representable),
# except the 9B-shaped transformer: bf16 and sharded through
# diffusion_pytorch_model.safetensors.index.json, like the Hub's klein-9B transformer/.
TEXT_ENCODER_SHARD_SIZE = "1MB"
TRANSFORMER_9B_SHARD_SIZE = "1MB"


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _text_encoder(vocab_size: int, ids: dict, seed: int, config: dict):
    te = M.make_text_encoder(vocab_size, seed, config)
    # as in Qwen3-4B's / Qwen3-8B's config.json: bos = <|endoftext|>, eos = <|im_end|>
    te.config.bos_token_id = ids["<|endoftext|>"]
    te.config.eos_token_id = ids["<|im_end|>"]
    te.generation_config.bos_token_id = ids["<|endoftext|>"]
    te.generation_config.eos_token_id = ids["<|im_end|>"]
    return te


def _context_rms(te, tokenizer) -> float:
    """rms of the prompt embeddings of a test prompt: scales the transformer's context_embedder."""
    with torch.no_grad():
        emb = Flux2KleinPipeline._get_qwen3_prompt_embeds(te, tokenizer, "a photo of a cat")
    return round(float(emb.pow(2).mean().sqrt()), 2)


def build(out_dir: str, tmp_dir: str, log=print) -> dict:
    tok_src = os.path.join(tmp_dir, "tokenizer_src")
    tok_info = write_source_tokenizer(tok_src)
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    vocab_size = _round_up(tok_info["total_size"], 64)
    ids = tok_info["special_ids"]

    te = _text_encoder(vocab_size, ids, SEED_TEXT_ENCODER, M.QWEN3_CONFIG)
    ctx_rms = _context_rms(te, tokenizer)

    vae = M.make_vae(SEED_VAE)
    calib_imgs = torch.stack(
        [
            torch.from_numpy(util.synthetic_image(64, 96, v)).permute(2, 0, 1).float() / 127.5 - 1.0
            for v in (100, 101, 102, 103)
        ]
    )
    vae_info = M.calibrate_vae_(vae, calib_imgs, SEED_VAE_CALIB)

    tr_distilled = M.make_transformer(SEED_TRANSFORMER_DISTILLED, ctx_rms)
    tr_base = M.make_transformer(SEED_TRANSFORMER_BASE, ctx_rms)

    # 9B-shaped: built after every 4B component, from its own seeds.
    te_9b = _text_encoder(vocab_size, ids, SEED_TEXT_ENCODER_9B, M.QWEN3_9B_CONFIG)
    ctx_rms_9b = _context_rms(te_9b, tokenizer)
    tr_9b = M.make_transformer(SEED_TRANSFORMER_9B, ctx_rms_9b, M.TRANSFORMER_9B_CONFIG)

    # transformers 5.24 serialises the backend tokenizer's *current* padding/truncation state into
    # tokenizer.json; the call above (padding="max_length", truncation=True) left it set. The Hub
    # files have both null, so reset before saving.
    tokenizer._tokenizer.no_padding()
    tokenizer._tokenizer.no_truncation()

    te_bf16 = te.to(torch.bfloat16)
    saved = {}
    for name, te_, tr, distilled in (
        (DISTILLED_DIR, te_bf16, tr_distilled, True),
        (BASE_DIR, te_bf16, tr_base, False),
        (DISTILLED_9B_DIR, te_9b.to(torch.bfloat16), tr_9b.to(torch.bfloat16), True),
    ):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            shutil.rmtree(path)
        pipe = Flux2KleinPipeline(
            scheduler=M.make_scheduler(),
            vae=vae,
            text_encoder=te_,
            tokenizer=tokenizer,
            transformer=tr,
            is_distilled=distilled,
        )
        pipe.save_pretrained(path)
        # Re-save the text encoder with a small shard size: the real repos ship a sharded
        # text_encoder (model-0000k-of-0000n.safetensors + model.safetensors.index.json); the
        # pipeline-level max_shard_size would shard every component.
        te_path = os.path.join(path, "text_encoder")
        shutil.rmtree(te_path)
        te_.save_pretrained(te_path, max_shard_size=TEXT_ENCODER_SHARD_SIZE)
        if name == DISTILLED_9B_DIR:
            # Likewise the transformer (sharded on the Hub for klein-9B only).
            tr_path = os.path.join(path, "transformer")
            shutil.rmtree(tr_path)
            tr.save_pretrained(tr_path, max_shard_size=TRANSFORMER_9B_SHARD_SIZE)
        with open(os.path.join(path, "model_index.json")) as f:
            saved[name] = json.load(f)
        log(f"saved {path}")

    return {
        "tokenizer": tok_info,
        "vocab_size": vocab_size,
        "ctx_rms": ctx_rms,
        "ctx_rms_9b": ctx_rms_9b,
        "vae_calibration": vae_info,
        "model_index": saved,
    }
