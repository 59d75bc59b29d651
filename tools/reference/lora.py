"""LoRA fixtures: one random LoRA for tiny-klein-4b's transformer in the three layouts diffusers
reads for FLUX.2 (its own PEFT layout with the adapter metadata, ai-toolkit's BFL names under
`diffusion_model.`, kohya's `lora_unet_*` with `alpha`), and the golden forwards diffusers computes
with each loaded (`load_lora_weights`) and fused (`fuse_lora(lora_scale=LORA_SCALE)`), and the
unfused forwards PEFT computes per request (`set_adapters`: the base layer plus each adapter's
`B(A x) * scale`), all in `loras/`.

Runs after the main fixtures exist (generate.py calls it last); alone it adds only its own files,
so the committed goldens are not rewritten:

    /work/venv-ref/bin/python tools/reference/lora.py --out tests/fixtures

The inputs are the committed `transformer_forward` case's, copied into the golden.
Every value of the LoRA is bf16-representable and the three files hold the same update
delta_W = (alpha / rank) * B @ A, so the three goldens agree to f32 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import checkpoints  # noqa: E402
import util  # noqa: E402

SEED_LORA = 2020
RANK = 4
ALPHA = 6.0
WIDE = "single_transformer_blocks.0.attn.to_qkv_mlp_proj"  # a module of another rank (rank_pattern)
WIDE_RANK = 8
LORA_SCALE = 0.8
# Each update's Frobenius norm against its weight's: large enough that leaving out any one module
# moves the output far past the f32 tolerance.
UPDATE_NORM = 0.1
LAYOUTS = ("diffusers", "ai_toolkit", "kohya")
# The unfused forwards: the diffusers file at LORA_SCALE; the kohya file at 1.1 beside the diffusers
# one at -0.6 (the same update, so 0.5 of it in all, in two terms of opposite sign).
UNFUSED = (("diffusers", LORA_SCALE),)
UNFUSED_PAIR = (("kohya", 1.1), ("diffusers", -0.6))
LORA_DIR = "loras"
FILES = {
    "diffusers": f"{LORA_DIR}/tiny-klein-4b-diffusers/pytorch_lora_weights.safetensors",
    "ai_toolkit": f"{LORA_DIR}/tiny-klein-4b-ai-toolkit.safetensors",
    "kohya": f"{LORA_DIR}/tiny-klein-4b-kohya.safetensors",
}
GOLDEN = f"{LORA_DIR}/golden.safetensors"  # beside the adapters: goldens/ holds generate.py's cases
MANIFEST = f"{LORA_DIR}/manifest.json"

# diffusers module -> (BFL module, q/k/v third or None): the modules all three layouts can express.
EXTRAS = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "proj_out": "final_layer.linear",
}


def targets(num_layers: int, num_single_layers: int) -> dict:
    out = {}
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, p in enumerate(("to_q", "to_k", "to_v")):
            out[f"{d}.attn.{p}"] = (f"{b}.img_attn.qkv", j)
        for j, p in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"{d}.attn.{p}"] = (f"{b}.txt_attn.qkv", j)
        out[f"{d}.attn.to_out.0"] = (f"{b}.img_attn.proj", None)
        out[f"{d}.attn.to_add_out"] = (f"{b}.txt_attn.proj", None)
        out[f"{d}.ff.linear_in"] = (f"{b}.img_mlp.0", None)
        out[f"{d}.ff.linear_out"] = (f"{b}.img_mlp.2", None)
        out[f"{d}.ff_context.linear_in"] = (f"{b}.txt_mlp.0", None)
        out[f"{d}.ff_context.linear_out"] = (f"{b}.txt_mlp.2", None)
    for i in range(num_single_layers):
        out[f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"] = (f"single_blocks.{i}.linear1", None)
        out[f"single_transformer_blocks.{i}.attn.to_out"] = (f"single_blocks.{i}.linear2", None)
    for d, b in EXTRAS.items():
        out[d] = (b, None)
    return out


def make_lora(weights: dict, num_layers: int, num_single_layers: int) -> dict:
    """BFL module -> (A [r, in], B [out, r]) of the fused module (q/k/v share one A), unscaled;
    B sized so that (alpha / r) * B @ A has UPDATE_NORM of the weight's norm."""
    g = torch.Generator().manual_seed(SEED_LORA)
    fused = {}
    for d, (b, third) in targets(num_layers, num_single_layers).items():
        fused.setdefault(b, []).append((third, d))
    lora = {}
    for b, parts in sorted(fused.items()):
        parts.sort(key=lambda p: -1 if p[0] is None else p[0])
        ws = [weights[f"{d}.weight"] for _, d in parts]
        w = torch.cat(ws, dim=0)
        r = WIDE_RANK if parts[0][1] == WIDE else RANK
        a = util.bf16_exact(torch.randn((r, w.shape[1]), generator=g) / w.shape[1] ** 0.5)
        bb = torch.randn((w.shape[0], r), generator=g)
        delta = (ALPHA / r) * bb @ a
        bb = util.bf16_exact(bb * (UPDATE_NORM * w.norm() / delta.norm()))
        lora[b] = (a, bb, [(third, d, wi.shape[0]) for (third, d), wi in zip(parts, ws)])
    return lora


def diffusers_layout(lora: dict) -> tuple[dict, dict]:
    sd = {}
    for a, b, parts in lora.values():
        row = 0
        for _, d, n in parts:
            sd[f"{d}.lora_A.weight"] = a.clone()
            sd[f"{d}.lora_B.weight"] = b[row:row + n].clone()
            row += n
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    metadata = {"r": RANK, "lora_alpha": ALPHA, "target_modules": modules, "rank_pattern": {WIDE: WIDE_RANK}}
    return sd, metadata


def ai_toolkit_layout(lora: dict) -> dict:
    """No alpha: the scale is in B (f32: alpha / r times a bf16 value is not always one)."""
    sd = {}
    for name, (a, b, _) in lora.items():
        sd[f"diffusion_model.{name}.lora_A.weight"] = a.clone()
        sd[f"diffusion_model.{name}.lora_B.weight"] = (ALPHA / a.shape[0]) * b
    return sd


def kohya_layout(lora: dict) -> dict:
    """f32: diffusers applies alpha / r to the file's tensors in their dtype (a bf16 file's
    update would be rounded to bf16 before the merge, 1.3e-3 off the others here)."""
    sd = {}
    for name, (a, b, _) in lora.items():
        k = "lora_unet_" + name.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = a.clone()
        sd[f"{k}.lora_up.weight"] = b.clone()
        sd[f"{k}.alpha"] = torch.tensor(ALPHA)
    return sd


def generate(out_dir: str) -> dict:
    from diffusers import Flux2KleinPipeline

    ckpt = os.path.join(out_dir, checkpoints.DISTILLED_DIR)
    weights = load_file(os.path.join(ckpt, "transformer", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(ckpt, "transformer", "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    lora = make_lora(weights, cfg["num_layers"], cfg["num_single_layers"])

    fwd = load_file(os.path.join(out_dir, "goldens", "transformer_forward.safetensors"))
    keys = ("hidden_states", "encoder_hidden_states", "txt_ids", "img_ids", "timestep.f32", "timestep.bf16")
    tensors = {k: fwd[k].clone() for k in keys}

    sd, metadata = diffusers_layout(lora)
    os.makedirs(os.path.join(out_dir, LORA_DIR), exist_ok=True)
    diffusers_dir = os.path.dirname(os.path.join(out_dir, FILES["diffusers"]))
    Flux2KleinPipeline.save_lora_weights(diffusers_dir, transformer_lora_layers=sd, transformer_lora_adapter_metadata=metadata)
    save_file(ai_toolkit_layout(lora), os.path.join(out_dir, FILES["ai_toolkit"]))
    save_file(kohya_layout(lora), os.path.join(out_dir, FILES["kohya"]))

    def forward(layout: str | dict | None, scale: float = LORA_SCALE, dtype=torch.float32, unfused=()) -> torch.Tensor:
        """`layout` fused at `scale`; or, with `unfused` ((layout, weight) pairs), those adapters
        loaded side by side and left unfused."""
        pipe = Flux2KleinPipeline.from_pretrained(ckpt, dtype=dtype)
        if layout is not None:
            pipe.load_lora_weights(os.path.join(out_dir, FILES[layout]) if isinstance(layout, str) else layout)
            pipe.fuse_lora(lora_scale=scale)
        for i, (name, _) in enumerate(unfused):
            pipe.load_lora_weights(os.path.join(out_dir, FILES[name]), adapter_name=f"a{i}")
        if unfused:
            pipe.set_adapters([f"a{i}" for i in range(len(unfused))], [w for _, w in unfused])
        with torch.no_grad():
            dt = "f32" if dtype == torch.float32 else "bf16"
            return pipe.transformer(
                hidden_states=tensors["hidden_states"].to(dtype),
                timestep=tensors[f"timestep.{dt}"],
                guidance=None,
                encoder_hidden_states=tensors["encoder_hidden_states"].to(dtype),
                txt_ids=tensors["txt_ids"],
                img_ids=tensors["img_ids"],
                return_dict=False,
            )[0]

    def without(module: str) -> dict:
        return {k: v for k, v in ai_toolkit_layout(lora).items() if not k.startswith(f"diffusion_model.{module}.")}

    for layout in LAYOUTS:
        tensors[f"output.{layout}.f32"] = forward(layout)
    tensors["output.diffusers.bf16"] = forward("diffusers", dtype=torch.bfloat16)
    for dt, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        tensors[f"output.unfused.{dt}"] = forward(None, dtype=dtype, unfused=UNFUSED)
    tensors["output.unfused_pair.f32"] = forward(None, unfused=UNFUSED_PAIR)
    base = fwd["output.f32"]
    d = tensors["output.diffusers.f32"]
    entry = {
        "generator": "tools/reference/lora.py",
        "checkpoint": checkpoints.DISTILLED_DIR,
        "files": FILES,
        "params": {"rank": RANK, "alpha": ALPHA, "rank_pattern": {WIDE: WIDE_RANK}, "lora_scale": LORA_SCALE,
                   "update_norm": UPDATE_NORM, "modules": len(sd) // 2},
        "tensors": {
            "inputs": "the committed transformer_forward case's f32 inputs (timestep.f32 = 0.73)",
            "output.<layout>.f32": "the f32 transformer's output with that file loaded and fused at lora_scale",
            "output.diffusers.bf16": "the same from the bf16 pipeline (timestep.bf16: t.to(bf16) / 1000 as the pipeline passes it)",
            "output.unfused.<f32|bf16>": "the diffusers file loaded unfused (set_adapters) at weight lora_scale",
            "output.unfused_pair.f32": "the kohya file at 1.1 and the diffusers file at -0.6, both unfused",
        },
        "unfused_spread": util.spread_entry(
            tensors["output.unfused.f32"], tensors["output.unfused.bf16"], "output.unfused.f32", "output.unfused.bf16"
        ),
        "unfused_vs_fused_rel_l2": util.rel_l2(d, tensors["output.unfused.f32"]),
        "spread": util.spread_entry(d, tensors["output.diffusers.bf16"], "output.diffusers.f32", "output.diffusers.bf16"),
        "agreement_rel_l2": {k: util.rel_l2(d, tensors[f"output.{k}.f32"]) for k in LAYOUTS[1:]},
        "sensitivity_rel_l2": {
            "without_the_lora": util.rel_l2(d, base),
            "lora_scale_1": util.rel_l2(d, forward("diffusers", 1.0)),
            "pair_vs_lora_scale_0.5": util.rel_l2(tensors["output.unfused_pair.f32"], forward("diffusers", 0.5)),
            "without_one_module_min": min(util.rel_l2(d, forward(without(m))) for m in lora),
        },
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, GOLDEN), metadata={"format": "pt"})
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(entry, f, indent=2)
        f.write("\n")
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "fixtures"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    entry = generate(os.path.abspath(args.out))
    print(json.dumps({k: entry[k] for k in ("agreement_rel_l2", "sensitivity_rel_l2")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
