#!/usr/bin/env python3
"""Regenerate klein-serve's reference fixtures (tiny FLUX.2 [klein] checkpoints + golden tensors).

    python tools/reference/generate.py --out tests/fixtures

Deterministic (fixed seeds, one CPU thread) and idempotent: rerunning rewrites identical files.
See tools/reference/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # 2-core VM: 2 threads run small matmuls ~100x slower (spec §8.11)
torch.set_num_interop_threads(1)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import cases  # noqa: E402
import checkpoints  # noqa: E402
import lora  # noqa: E402
import tiny_models  # noqa: E402

GOLDENS = "goldens"
CASE_ORDER = [
    "tokenizer", "text_embeddings", "sigmas", "transformer_forward", "vae", "t2i", "i2i", "inpaint", "multiref", "cfg",
    "text_embeddings_9b", "transformer_forward_9b", "t2i_9b",
]
CHECKPOINT_DIRS = {
    "distilled": checkpoints.DISTILLED_DIR,
    "base": checkpoints.BASE_DIR,
    "distilled_9b": checkpoints.DISTILLED_9B_DIR,
}


def versions() -> dict:
    v = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "tokenizers", "safetensors", "numpy", "pillow", "accelerate", "huggingface_hub", "jinja2"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


def _quiet():
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


def load_pipelines(out_dir: str) -> cases.Runner:
    from diffusers import Flux2KleinPipeline

    pipes = {}
    for which, d in CHECKPOINT_DIRS.items():
        for dt, dtype in cases.DTYPES.items():
            p = Flux2KleinPipeline.from_pretrained(os.path.join(out_dir, d), dtype=dtype)
            p.set_progress_bar_config(disable=True)
            for comp in (p.text_encoder, p.transformer, p.vae):
                assert comp.dtype == dtype, (d, dt, comp.dtype)
            untied = p.text_encoder.lm_head.weight is not p.text_encoder.model.embed_tokens.weight
            assert untied == (which == "distilled_9b"), (d, untied)
            pipes[(which, dt)] = p
    return cases.Runner(pipes, dict(CHECKPOINT_DIRS))


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _file_sizes(root: str, skip=("README.md",)) -> list:
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if rel in skip:
                continue
            rows.append((rel, os.path.getsize(os.path.join(dirpath, f))))
    return rows


def spread_rows(manifest: dict) -> list:
    rows = []
    for name in CASE_ORDER:
        for out, s in manifest["cases"][name].get("spread", {}).items():
            rows.append((name, out, s))
    return rows


def spread_table_md(manifest: dict) -> str:
    lines = [
        "| case | output | bf16-vs-f32 rel-L2 | max abs | mean abs px (/255) | max abs px (/255) |",
        "|---|---|---|---|---|---|",
    ]
    for name, out, s in spread_rows(manifest):
        px_mean = f"{s['mean_abs_255']:.3f}" if "mean_abs_255" in s else ""
        px_max = f"{s['max_abs_255']}" if "max_abs_255" in s else ""
        lines.append(f"| {name} | {out} | {s['rel_l2']:.3e} | {s['max_abs']:.3e} | {px_mean} | {px_max} |")
    return "\n".join(lines)


def spread_table_text(manifest: dict) -> str:
    lines = [f"{'case':<22} {'output':<26} {'rel_l2':>10} {'max_abs':>10} {'px_mean':>8} {'px_max':>6}"]
    for name, out, s in spread_rows(manifest):
        px_mean = f"{s['mean_abs_255']:.3f}" if "mean_abs_255" in s else ""
        px_max = f"{s['max_abs_255']}" if "max_abs_255" in s else ""
        lines.append(f"{name:<22} {out:<26} {s['rel_l2']:>10.3e} {s['max_abs']:>10.3e} {px_mean:>8} {px_max:>6}")
    return "\n".join(lines)


def write_fixtures_readme(out_dir: str, manifest: dict) -> None:
    sizes = _file_sizes(out_dir)
    total = sum(s for _, s in sizes)
    v = manifest["versions"]
    sens = manifest["sensitivity"]
    f64 = manifest.get("f32_vs_f64_rel_l2", {})
    te9, tr9 = tiny_models.QWEN3_9B_CONFIG, tiny_models.TRANSFORMER_9B_CONFIG
    lines = [
        "# Reference fixtures (generated — do not edit)",
        "",
        "Tiny random-weight FLUX.2 [klein] checkpoints in the diffusers `save_pretrained` layout and golden tensors",
        "from diffusers' own pipelines. Written by `tools/reference/generate.py`; CI only reads them (no Python needed).",
        "",
        "Regenerate (needs the Python environment of `tools/reference/requirements.txt`, CPU only, ~25 s;",
        "see `tools/reference/README.md`). `--verify` regenerates into a temporary folder and byte-compares:",
        "",
        "```sh",
        "python tools/reference/generate.py --out tests/fixtures",
        "python tools/reference/generate.py --out tests/fixtures --verify",
        "```",
        "",
        "Versions used: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        "## Checkpoints",
        "",
        f"- `{checkpoints.DISTILLED_DIR}/`: `Flux2KleinPipeline`, `is_distilled: true` (transformer seed {checkpoints.SEED_TRANSFORMER_DISTILLED}).",
        f"- `{checkpoints.BASE_DIR}/`: `Flux2KleinPipeline`, `is_distilled: false` (transformer seed {checkpoints.SEED_TRANSFORMER_BASE});"
        " text encoder, tokenizer, VAE and scheduler are identical to the distilled one (saved again: the real layout).",
        "- transformer: `Flux2Transformer2DModel` 2 double + 2 single blocks, 2 heads x 32 (D = 64), axes_dims_rope [8,8,8,8],"
        " joint_attention_dim 192, f32 on disk.",
        "- text_encoder: `Qwen3ForCausalLM` 28 layers, hidden 64, 4 q heads / 2 kv heads (GQA x2), head_dim 32, tied embeddings,"
        " vocab 704, **bf16 on disk**, sharded (`model.safetensors.index.json` + 3 shards).",
        "- vae: `AutoencoderKLFlux2` block_out_channels [8,16,32,32], norm_num_groups 4, latent_channels 32, layers_per_block 2,"
        " f32 on disk; bn.running_mean/var calibrated and randomised (var in [1,16]).",
        "- tokenizer: byte-level BPE (640 BPE tokens + the 26 Qwen3 added tokens, pad `<|endoftext|>` = 640), Qwen3 chat template"
        " in `tokenizer/chat_template.jinja`.",
        f"- `{checkpoints.DISTILLED_9B_DIR}/`: `Flux2KleinPipeline`, `is_distilled: true`, shaped like klein-9B relative to klein-4B"
        f" (text encoder seed {checkpoints.SEED_TEXT_ENCODER_9B}, transformer seed {checkpoints.SEED_TRANSFORMER_9B});"
        " tokenizer, VAE and scheduler are identical to the 4B ones (saved again: the real layout).",
        f"  - transformer: `Flux2Transformer2DModel` {tr9['num_layers']} double + {tr9['num_single_layers']} single blocks,"
        f" {tr9['num_attention_heads']} heads x {tr9['attention_head_dim']} (D = {tr9['num_attention_heads'] * tr9['attention_head_dim']}),"
        f" axes_dims_rope [{','.join(map(str, tr9['axes_dims_rope']))}], joint_attention_dim {tr9['joint_attention_dim']},"
        " **bf16 on disk**, sharded (`diffusion_pytorch_model.safetensors.index.json`, as the Hub's klein-9B).",
        f"  - text_encoder: `Qwen3ForCausalLM` like Qwen3-8B: {te9['num_hidden_layers']} layers, hidden {te9['hidden_size']},"
        f" intermediate {te9['intermediate_size']}, {te9['num_attention_heads']} q heads / {te9['num_key_value_heads']} kv heads"
        f" (GQA x{te9['num_attention_heads'] // te9['num_key_value_heads']}), head_dim {te9['head_dim']},"
        " **untied** embeddings (a random `lm_head.weight` is saved; the pipeline never uses it), same vocab,"
        " bf16 on disk, sharded.",
        "- Every weight is a bf16-representable value, so the f32 and bf16 pipelines load identical numbers.",
        "",
        "## Golden cases (`goldens/manifest.json` describes every key, shape, dtype and parameter)",
        "",
    ]
    for name in CASE_ORDER:
        c = manifest["cases"][name]
        lines.append(f"- `{name}` (`{c['file']}`): {c['description']}")
    lines += [
        "",
        "Each model case runs twice: an f32 pipeline (all components float32) and a bf16 pipeline (all components bfloat16).",
        "Keys ending in `.f32` come from the f32 run (F32), keys ending in `.bf16` from the bf16 run (BF16 as torch returned",
        "it; uint8 images are U8 either way). The f32 outputs are the parity target (tolerance ~1e-4 relative); the bf16",
        "outputs are matched within the spread below.",
        "",
        "## bf16-vs-f32 spread per case (torch, this machine)",
        "",
        "rel-L2 = ||bf16 - f32|| / ||f32||; pixel columns are for uint8 images.",
        "",
        spread_table_md(manifest),
        "",
    ]
    if f64:
        lines += ["torch f32 vs a float64 run of the same pipeline (rel-L2): "
                  + ", ".join(f"{k} {val:.2e}" for k, val in f64.items()), ""]
    lines += ["## Sensitivity checks (f32)", ""]
    for k, s in sens.items():
        vals = ", ".join(f"{kk} {vv:.4g}" if isinstance(vv, float) else f"{kk} {vv}" for kk, vv in s.items() if kk != "what")
        lines.append(f"- `{k}` — {s['what']}: {vals}")
    lines += ["", f"## Files ({total / 1e6:.2f} MB in all, README.md excluded)", "", "| file | bytes |", "|---|---|"]
    for rel, size in sizes:
        lines.append(f"| `{rel}` | {size} |")
    lines.append("")
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures"), help="fixtures folder (default: tests/fixtures)")
    ap.add_argument("--no-f64", action="store_true", help="skip the f32-vs-float64 note (changes manifest.json/README.md)")
    ap.add_argument(
        "--verify", action="store_true",
        help="generate into a temporary folder and compare byte-for-byte with --out (exit 1 on any difference)",
    )
    args = ap.parse_args()
    _quiet()
    if not args.verify:
        generate(os.path.abspath(args.out), args.no_f64)
        return 0
    import filecmp

    ref = os.path.abspath(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, args.no_f64)
        a = {rel for rel, _ in _file_sizes(tmp, skip=())}
        b = {rel for rel, _ in _file_sizes(ref, skip=())}
        bad = sorted(a ^ b)
        for rel in sorted(a & b):
            if not filecmp.cmp(os.path.join(tmp, rel), os.path.join(ref, rel), shallow=False):
                bad.append(rel)
    if bad:
        print("fixtures differ from a fresh generation:\n  " + "\n  ".join(bad))
        return 1
    print(f"fixtures in {ref} are byte-identical to a fresh generation")
    return 0


def generate(out_dir: str, no_f64: bool) -> None:
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    gold_dir = os.path.join(out_dir, GOLDENS)
    if os.path.exists(gold_dir):
        shutil.rmtree(gold_dir)
    os.makedirs(gold_dir)

    with tempfile.TemporaryDirectory() as tmp:
        info = checkpoints.build(out_dir, tmp, log=lambda m: print(m, flush=True))

    run = load_pipelines(out_dir)
    manifest = {
        "schema_version": 1,
        "generator": "tools/reference/generate.py",
        "regenerate": "python tools/reference/generate.py --out tests/fixtures",
        "versions": versions(),
        "conventions": {
            "suffix_f32": "output of the f32 pipeline (all components torch.float32), stored F32",
            "suffix_bf16": "output of the bf16 pipeline (all components torch.bfloat16), stored BF16 as torch returned it",
            "no_suffix": "input shared by both runs; random inputs are bf16-representable values stored as F32",
            "uint8_images": "HWC uint8 ([H,W,3]) inputs given to the pipeline as PIL images; outputs NHWC uint8 [1,H,W,3]",
            "float_images": "NCHW float in [-1,1]",
            "spread": "rel_l2 = ||bf16 - f32||_2 / ||f32||_2 over the whole tensor (float64); max_abs = max |bf16 - f32|; "
            "mean_abs_255 / max_abs_255 = pixel differences of the uint8 images",
            "packing": "packed latents [B, h*w, 128], token index r*w + c, channel c*4 + 2*pi + pj",
        },
        "checkpoints": {
            "distilled": {"path": checkpoints.DISTILLED_DIR, "is_distilled": True, "transformer_seed": checkpoints.SEED_TRANSFORMER_DISTILLED},
            "base": {"path": checkpoints.BASE_DIR, "is_distilled": False, "transformer_seed": checkpoints.SEED_TRANSFORMER_BASE},
            "on_disk_dtypes": {"text_encoder": "BF16 (sharded, model.safetensors.index.json)", "transformer": "F32", "vae": "F32 (bn.num_batches_tracked I64)"},
            "weights_bf16_representable": True,
            "text_encoder_vocab_size": info["vocab_size"],
            "text_encoder_hidden_size": 64,
            "text_encoder_num_hidden_layers": 28,
            "joint_attention_dim": 192,
            "context_rms_used_for_init": info["ctx_rms"],
            "vae_calibration": info["vae_calibration"],
            "distilled_9b": {
                "path": checkpoints.DISTILLED_9B_DIR,
                "is_distilled": True,
                "text_encoder_seed": checkpoints.SEED_TEXT_ENCODER_9B,
                "transformer_seed": checkpoints.SEED_TRANSFORMER_9B,
                "on_disk_dtypes": {
                    "text_encoder": "BF16 (sharded, model.safetensors.index.json; untied lm_head.weight included)",
                    "transformer": "BF16 (sharded, diffusion_pytorch_model.safetensors.index.json)",
                    "vae": "F32 (the distilled checkpoint's VAE)",
                },
                "text_encoder_hidden_size": tiny_models.QWEN3_9B_CONFIG["hidden_size"],
                "text_encoder_num_hidden_layers": tiny_models.QWEN3_9B_CONFIG["num_hidden_layers"],
                "text_encoder_num_attention_heads": tiny_models.QWEN3_9B_CONFIG["num_attention_heads"],
                "text_encoder_num_key_value_heads": tiny_models.QWEN3_9B_CONFIG["num_key_value_heads"],
                "text_encoder_head_dim": tiny_models.QWEN3_9B_CONFIG["head_dim"],
                "text_encoder_tie_word_embeddings": tiny_models.QWEN3_9B_CONFIG["tie_word_embeddings"],
                "transformer_num_layers": tiny_models.TRANSFORMER_9B_CONFIG["num_layers"],
                "transformer_num_single_layers": tiny_models.TRANSFORMER_9B_CONFIG["num_single_layers"],
                "transformer_num_attention_heads": tiny_models.TRANSFORMER_9B_CONFIG["num_attention_heads"],
                "transformer_attention_head_dim": tiny_models.TRANSFORMER_9B_CONFIG["attention_head_dim"],
                "joint_attention_dim": tiny_models.TRANSFORMER_9B_CONFIG["joint_attention_dim"],
                "context_rms_used_for_init": info["ctx_rms_9b"],
            },
        },
        "tokenizer": {
            "bpe_vocab_size": info["tokenizer"]["bpe_vocab_size"],
            "num_added_tokens": info["tokenizer"]["num_added_tokens"],
            "total_size": info["tokenizer"]["total_size"],
            "special_ids": info["tokenizer"]["special_ids"],
            "pad_id": info["tokenizer"]["special_ids"]["<|endoftext|>"],
        },
        "cases": {},
    }

    tensors_by_case = {}

    def add(name, result):
        tensors, meanings, entry = result
        tensors = _contiguous(tensors)
        fname = f"{GOLDENS}/{name}.safetensors"
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})  # one key: safetensors writes metadata in HashMap order
        e = {"file": fname}
        e.update(entry)
        e["tensors"] = cases._tensor_meta(tensors, meanings)
        manifest["cases"][name] = e
        tensors_by_case[name] = tensors
        print(f"  case {name}: {len(tensors)} tensors, {os.path.getsize(os.path.join(out_dir, fname))} bytes ({time.time() - t0:.1f}s)", flush=True)

    add("tokenizer", cases.case_tokenizer(run, out_dir))
    add("text_embeddings", cases.case_text_embeddings(run))
    add("sigmas", cases.case_sigmas(run))
    add("transformer_forward", cases.case_transformer_forward(run, tensors_by_case["text_embeddings"]["p0.prompt_embeds.f32"]))
    add("vae", cases.case_vae(run))
    add("t2i", cases.case_t2i(run))
    add("i2i", cases.case_i2i(run))
    add("inpaint", cases.case_inpaint(run))
    add("multiref", cases.case_multiref(run))
    add("cfg", cases.case_cfg(run))
    add("text_embeddings_9b", cases.case_text_embeddings(run, "distilled_9b"))
    add(
        "transformer_forward_9b",
        cases.case_transformer_forward(run, tensors_by_case["text_embeddings_9b"]["p0.prompt_embeds.f32"], "distilled_9b"),
    )
    add("t2i_9b", cases.case_t2i(run, "distilled_9b"))

    lora.generate(out_dir)  # loras/: adapters, golden and manifest, from transformer_forward's inputs

    manifest["sensitivity"] = cases.sensitivity(run)
    if not no_f64:
        manifest["f32_vs_f64_rel_l2"] = cases.f64_reference(out_dir, checkpoints.DISTILLED_DIR, run, tensors_by_case)

    with open(os.path.join(gold_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    write_fixtures_readme(out_dir, manifest)

    print()
    print("bf16-vs-f32 spread (rel-L2):")
    print(spread_table_text(manifest))
    print()
    print("sensitivity (f32):")
    for k, s in manifest["sensitivity"].items():
        print(f"  {k}: " + ", ".join(f"{kk}={vv:.4g}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in s.items() if kk != "what"))
    if "f32_vs_f64_rel_l2" in manifest:
        print("f32 vs float64 (rel-L2): " + ", ".join(f"{k}={v:.2e}" for k, v in manifest["f32_vs_f64_rel_l2"].items()))
    total = sum(s for _, s in _file_sizes(out_dir, skip=()))
    print(f"\nwrote {out_dir} ({total / 1e6:.2f} MB) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
