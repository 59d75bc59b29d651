"""Golden cases. Each case function returns (tensors: dict[str, Tensor], entry: dict for manifest.json).

Conventions (see README.md):
- `<name>.f32` is produced by the f32 pipeline (all components float32) and saved as F32;
  `<name>.bf16` by the bf16 pipeline (all components bfloat16) and saved as BF16 exactly as torch
  returned it (uint8 images are U8 in both cases, the suffix tells which pipeline made them).
- Inputs without a suffix are shared by both runs. Random inputs are rounded to bf16-representable
  values (stored as F32) so both pipelines see identical numbers.
- Images are HWC uint8 (`*_uint8`, what the pipeline got as a PIL image) and NCHW float in [-1, 1]
  (what `image_processor.preprocess` made of it, f32).
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

import diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint as inpaint_mod
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinInpaintPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

import util
from tokenizer import template_string

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
H, W = 64, 96  # output size for every whole run: token grid 4 x 6 (non-square on purpose)
MAX_LEN = 512

PROMPTS = [
    "a photo of a cat",
    "",
    "Ünïcödé: 猫 🐱 cafe\u0301 — naïve\tand\nnew line",
    " ".join(f"cat number {i} sits on mat {i * 7 % 13}." for i in range(60)),
]
PROMPT_B = "a red sports car at night in the rain"  # for the prompt-sensitivity check
EXTRA_TOKENIZER_CHECKS = [
    "I'm sure it's the cat's toy, they'll see; we've done it, you'd agree. DON'T SHOUT",
    "  leading and   multiple   spaces  \t\ttabs\r\nwindows newline\n\n\nthree newlines   ",
    "digits 1234567890 and 3.14159, x=-42; 1024x768",
    "日本語のテキストと中文混合 한국어 Ελληνικά русский עברית العربية",
    "emoji 🐱‍👤 👍🏽 🇩🇪 and symbols ©®™ ∑∫√ ← → ★",
    "combining: e\u0301 a\u0308 n\u0303 (NFC) vs é ä ñ; ﬁ ligature; Å vs A\u030a",
    "literal specials in text: <|im_start|> <|im_end|> <think> </think> <|endoftext|> <tool_call>",
    "<|im_start|>user<|im_end|><|im_start|>",
    "code: fn main() { println!(\"{}\", x); } // comment\n\tindent",
    "",
    " ",
    "\n",
]

SEED_NOISE = {"t2i": 2001, "i2i": 2002, "inpaint": 2003, "multiref": 2004, "cfg": 2005}
SEED_FORWARD = 2010
SEED_VAE_DECODE = 2011


def _tensor_meta(tensors: dict, meanings: dict) -> dict:
    out = {}
    dt_names = {
        torch.float32: "F32",
        torch.bfloat16: "BF16",
        torch.float64: "F64",
        torch.int64: "I64",
        torch.uint8: "U8",
    }
    for k in tensors:
        t = tensors[k]
        out[k] = {"shape": list(t.shape), "dtype": dt_names[t.dtype], "meaning": meanings.get(k, "")}
        if not meanings.get(k):
            raise RuntimeError(f"no meaning documented for tensor key {k}")
    return out


def _noise(seed: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return util.bf16_exact(torch.randn((1, 128, h, w), generator=g, dtype=torch.float32))


def _latent_ids(pipe, h: int, w: int) -> torch.Tensor:
    return pipe._prepare_latent_ids(torch.zeros(1, 128, h, w))


def decode_packed(pipe, packed: torch.Tensor, h: int, w: int):
    """The klein pipeline's post-loop code (pipeline_flux2_klein.py, after the denoising loop)."""
    latent_ids = _latent_ids(pipe, h, w)
    latents = pipe._unpack_latents_with_ids(packed, latent_ids, h, w)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(
        latents.device, latents.dtype
    )
    latents = latents * std + mean
    latents = pipe._unpatchify_latents(latents)
    image = pipe.vae.decode(latents, return_dict=False)[0]
    u8 = np.array(pipe.image_processor.postprocess(image, output_type="pil")[0])
    return latents, image, torch.from_numpy(u8).unsqueeze(0)


class Runner:
    """Holds the loaded pipelines: pipes[(ckpt, dtype_name)]."""

    def __init__(self, pipes: dict, ckpt_names: dict):
        self.pipes = pipes
        self.ckpt = ckpt_names  # {"distilled": dir name, "base": dir name}

    def p(self, which: str, dt: str):
        return self.pipes[(which, dt)]

    def inpaint(self, which: str, dt: str):
        p = self.p(which, dt)
        ip = Flux2KleinInpaintPipeline(**p.components, is_distilled=p.config.is_distilled)
        ip.set_progress_bar_config(disable=True)
        return ip


def _on(run: Runner, which: str, description: str) -> str:
    """A case description, naming the checkpoint when it is not the 4B-shaped distilled one."""
    if which == "distilled":
        return description
    return f"{description} On the klein-9B-shaped `{run.ckpt[which]}`."


# ----------------------------------------------------------------------------------------------
# 1. tokenizer


def case_tokenizer(run: Runner, fixtures_dir: str):
    pipe = run.p("distilled", "f32")
    tk = pipe.tokenizer
    saved = Tokenizer.from_file(f"{fixtures_dir}/{run.ckpt['distilled']}/tokenizer/tokenizer.json")
    pad_id = tk.pad_token_id
    tensors, meanings, prompts_meta = {}, {}, []
    for i, prompt in enumerate(PROMPTS + [PROMPT_B]):
        text = tk.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert text == template_string(prompt), (text, template_string(prompt))
        enc = tk(text, return_tensors="pt", padding="max_length", truncation=True, max_length=MAX_LEN)
        ids = enc["input_ids"][0]
        am = enc["attention_mask"][0]
        # literal tokenizer.json (what the Rust side loads), manual right-truncation + right-padding
        raw = saved.encode(text, add_special_tokens=False).ids
        raw2 = saved.encode(text, add_special_tokens=True).ids
        assert raw == raw2, "post-processor must not add tokens"
        n = min(len(raw), MAX_LEN)
        lit = raw[:MAX_LEN] + [pad_id] * (MAX_LEN - n)
        if lit != ids.tolist():
            raise RuntimeError(f"tokenizer.json (literal) disagrees with transformers for prompt {i}: {prompt!r}")
        assert int(am.sum()) == n and am[:n].all()
        if i == len(PROMPTS):
            continue  # PROMPT_B only verified, not stored
        tensors[f"p{i}.input_ids"] = ids.to(torch.int64).clone()
        tensors[f"p{i}.attention_mask"] = am.to(torch.int64).clone()
        meanings[f"p{i}.input_ids"] = f"token ids of prompt {i} after the chat template, right-padded with pad_id / right-truncated to 512"
        meanings[f"p{i}.attention_mask"] = f"1 for real tokens of prompt {i}, 0 for padding"
        prompts_meta.append(
            {
                "index": i,
                "prompt": prompt,
                "template": text,
                "num_tokens": n,
                "untruncated_num_tokens": len(raw),
                "truncated": len(raw) > MAX_LEN,
            }
        )
    # Extra agreement checks (not stored): literal tokenizer.json vs transformers' rebuilt Qwen2Tokenizer.
    for extra in EXTRA_TOKENIZER_CHECKS:
        text = template_string(extra)
        want = tk(text, add_special_tokens=False)["input_ids"]
        got = saved.encode(text, add_special_tokens=False).ids
        if want != got:
            raise RuntimeError(f"tokenizer.json (literal) disagrees with transformers for {extra!r}")
        if tk(extra, add_special_tokens=False)["input_ids"] != saved.encode(extra, add_special_tokens=False).ids:
            raise RuntimeError(f"tokenizer.json (literal) disagrees with transformers for raw {extra!r}")
    entry = {
        "description": "Chat-template + tokenization of the test prompts, as Flux2KleinPipeline._get_qwen3_prompt_embeds does it "
        "(apply_chat_template(add_generation_prompt=True, enable_thinking=False), padding='max_length', truncation=True, max_length=512). "
        "Verified: loading tokenizer/tokenizer.json literally with the `tokenizers` library, encoding the template string "
        "(add_special_tokens has no effect), truncating to 512 on the right and right-padding with pad_id gives the same ids.",
        "checkpoint": run.ckpt["distilled"],
        "params": {
            "max_length": MAX_LEN,
            "pad_id": pad_id,
            "pad_token": tk.pad_token,
            "padding_side": "right",
            "truncation_side": "right",
            "template_format": "<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n",
            "prompts": prompts_meta,
        },
    }
    return tensors, meanings, entry


# ----------------------------------------------------------------------------------------------
# 2. text embeddings


def case_text_embeddings(run: Runner, which: str = "distilled"):
    tensors, meanings, spread = {}, {}, {}
    for dt in DTYPES:
        pipe = run.p(which, dt)
        hidden = pipe.text_encoder.config.hidden_size
        for i, prompt in enumerate(PROMPTS):
            with torch.no_grad():
                emb, text_ids = pipe.encode_prompt(prompt=prompt, device="cpu", max_sequence_length=MAX_LEN)
            k = f"p{i}.prompt_embeds.{dt}"
            tensors[k] = emb.clone()
            meanings[k] = f"prompt_embeds [1,512,3*{hidden}] of prompt {i} ({dt} pipeline): hidden_states 9|18|27 stacked on the last axis"
            if i == 0 and dt == "f32":
                tensors["text_ids"] = text_ids.clone()
                meanings["text_ids"] = "txt_ids [1,512,4] = (0,0,0,l) for l in 0..511 (same for every prompt)"
    for i in range(len(PROMPTS)):
        a, b = f"p{i}.prompt_embeds.f32", f"p{i}.prompt_embeds.bf16"
        spread[f"p{i}.prompt_embeds"] = util.spread_entry(tensors[a], tensors[b], a, b)
    entry = {
        "description": _on(run, which, "Flux2KleinPipeline.encode_prompt(prompt) for each tokenizer-case prompt (same index), "
                           "f32 and bf16 text encoder."),
        "checkpoint": run.ckpt[which],
        "params": {"prompts": PROMPTS, "max_sequence_length": MAX_LEN, "hidden_states_layers": [9, 18, 27]},
        "spread": spread,
    }
    return tensors, meanings, entry


# ----------------------------------------------------------------------------------------------
# 3. sigmas

SIGMA_PAIRS = [(4, 1024), (4, 4096), (4, 4300), (4, 4301), (4, 6144), (50, 4096), (5, 24), (6, 24), (8, 24), (28, 16384)]


def case_sigmas(run: Runner):
    cfg = run.p("distilled", "f32").scheduler.config
    tensors, meanings, pairs = {}, {}, []
    for n, seq in SIGMA_PAIRS:
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        sig_in = np.linspace(1.0, 1 / n, n)
        mu = compute_empirical_mu(image_seq_len=seq, num_steps=n)
        timesteps, _ = retrieve_timesteps(sched, n, "cpu", sigmas=sig_in, mu=mu)
        p = f"n{n}_seq{seq}"
        tensors[f"{p}.sigmas"] = sched.sigmas.clone()
        tensors[f"{p}.timesteps"] = timesteps.clone()
        t_bf16 = timesteps.to(torch.bfloat16) / 1000  # pipeline: t.expand(B).to(latents.dtype) / 1000
        tensors[f"{p}.model_timestep.f32"] = timesteps.to(torch.float32) / 1000
        tensors[f"{p}.model_timestep.bf16"] = t_bf16
        tensors[f"{p}.tau.bf16"] = t_bf16 * 1000  # transformer: timestep.to(dtype) * 1000
        tensors[f"{p}.mu"] = torch.tensor([mu], dtype=torch.float64)
        meanings[f"{p}.sigmas"] = f"scheduler.sigmas for N={n}, image_seq_len={seq} (length N+1, last 0), f32"
        meanings[f"{p}.timesteps"] = "scheduler.timesteps = sigmas[:N]*1000, f32"
        meanings[f"{p}.model_timestep.f32"] = "`timestep/1000` the f32 pipeline passes to the transformer per step"
        meanings[f"{p}.model_timestep.bf16"] = "`timestep/1000` the bf16 pipeline passes (bf16(t)/1000 in bf16)"
        meanings[f"{p}.tau.bf16"] = "tau the bf16 transformer feeds to the sinusoid: bf16(model_timestep*1000)"
        meanings[f"{p}.mu"] = "compute_empirical_mu(image_seq_len, N) as float64"
        pairs.append({"prefix": p, "num_inference_steps": n, "image_seq_len": seq, "mu": mu})
    entry = {
        "description": "Sigma schedules exactly as Flux2KleinPipeline computes them: sigmas=np.linspace(1,1/N,N), "
        "mu=compute_empirical_mu(image_seq_len, N), retrieve_timesteps(scheduler, N, sigmas=..., mu=mu).",
        "checkpoint": run.ckpt["distilled"],
        "params": {"pairs": pairs},
    }
    return tensors, meanings, entry


# ----------------------------------------------------------------------------------------------
# 4. transformer forward


def case_transformer_forward(run: Runner, prompt_embeds_f32: torch.Tensor, which: str = "distilled"):
    pipe0 = run.p(which, "f32")
    g = torch.Generator().manual_seed(SEED_FORWARD)
    hs = util.bf16_exact(torch.randn((1, 24, 128), generator=g))
    ref0 = util.bf16_exact(torch.randn((1, 16, 128), generator=g))
    ref1 = util.bf16_exact(torch.randn((1, 24, 128), generator=g))
    ehs = util.bf16_exact(prompt_embeds_f32)
    txt_ids = pipe0._prepare_text_ids(ehs)
    img_ids = _latent_ids(pipe0, 4, 6)
    ref_ids = pipe0._prepare_image_ids([torch.zeros(1, 128, 4, 4), torch.zeros(1, 128, 4, 6)])
    hs_ref = torch.cat([hs, ref0, ref1], dim=1)
    img_ids_ref = torch.cat([img_ids, ref_ids], dim=1)
    t = torch.tensor([730.0], dtype=torch.float32)  # sigma 0.73 -> t = sigma*1000
    tensors = {
        "hidden_states": hs,
        "encoder_hidden_states": ehs,
        "txt_ids": txt_ids,
        "img_ids": img_ids,
        "ref.hidden_states": hs_ref,
        "ref.img_ids": img_ids_ref,
    }
    meanings = {
        "hidden_states": "noisy packed tokens [1,24,128] (grid 4x6), bf16-representable f32",
        "encoder_hidden_states": f"prompt embeddings [1,512,{ehs.shape[-1]}] (f32 embeds of prompt 0 rounded to bf16 values)",
        "txt_ids": "txt_ids [1,512,4]",
        "img_ids": "img_ids [1,24,4] = (0,r,c,0), row-major over 4x6",
        "ref.hidden_states": "[noisy 24 | ref0 16 (4x4) | ref1 24 (4x6)] tokens [1,64,128]",
        "ref.img_ids": "ids for ref.hidden_states: noisy (0,r,c,0), ref0 (10,r,c,0), ref1 (20,r,c,0)",
    }
    spread = {}
    for dt, dtype in DTYPES.items():
        pipe = run.p(which, dt)
        timestep = t.expand(1).to(dtype) / 1000
        tensors[f"timestep.{dt}"] = timestep.clone()
        meanings[f"timestep.{dt}"] = f"`timestep` argument of the {dt} forward (pipeline: t.to(dtype)/1000, t=730.0)"
        with torch.no_grad():
            out = pipe.transformer(
                hidden_states=hs.to(dtype),
                timestep=timestep,
                guidance=None,
                encoder_hidden_states=ehs.to(dtype),
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            out_ref = pipe.transformer(
                hidden_states=hs_ref.to(dtype),
                timestep=timestep,
                guidance=None,
                encoder_hidden_states=ehs.to(dtype),
                txt_ids=txt_ids,
                img_ids=img_ids_ref,
                return_dict=False,
            )[0]
        tensors[f"output.{dt}"] = out.clone()
        tensors[f"ref.output.{dt}"] = out_ref.clone()
        meanings[f"output.{dt}"] = f"transformer output (velocity) [1,24,128], {dt} model"
        meanings[f"ref.output.{dt}"] = f"transformer output for all 64 tokens [1,64,128] (pipeline keeps [:, :24]), {dt} model"
    spread["output"] = util.spread_entry(tensors["output.f32"], tensors["output.bf16"], "output.f32", "output.bf16")
    spread["ref.output[:, :24]"] = util.spread_entry(
        tensors["ref.output.f32"][:, :24], tensors["ref.output.bf16"][:, :24], "ref.output.f32", "ref.output.bf16"
    )
    entry = {
        "description": _on(run, which, "One Flux2Transformer2DModel forward (distilled checkpoint) with and without "
                           "two reference images' tokens."),
        "checkpoint": run.ckpt[which],
        "params": {"sigma": 0.73, "t": 730.0, "grid": [4, 6], "ref_grids": [[4, 4], [4, 6]], "ref_t": [10, 20], "guidance": None},
        "spread": spread,
    }
    return tensors, meanings, entry


# ----------------------------------------------------------------------------------------------
# 5. VAE


def case_vae(run: Runner):
    img_u8 = util.synthetic_image(H, W, 0)
    pipe0 = run.p("distilled", "f32")
    image = pipe0.image_processor.preprocess(util.to_pil(img_u8), height=H, width=W)
    g = torch.Generator().manual_seed(SEED_VAE_DECODE)
    z = util.bf16_exact(torch.randn((1, 24, 128), generator=g))
    tensors = {"image_uint8": util.u8_to_tensor(img_u8), "image": image.clone(), "decode_input_packed": z}
    meanings = {
        "image_uint8": "input image HWC uint8 [64,96,3]",
        "image": "image_processor.preprocess(image) NCHW f32 in [-1,1] [1,3,64,96] (cast to the pipeline dtype before encode)",
        "decode_input_packed": "packed normalised latents [1,24,128] to decode (bf16-representable)",
    }
    for dt, dtype in DTYPES.items():
        pipe = run.p("distilled", dt)
        x = image.to(dtype)
        with torch.no_grad():
            mean = pipe.vae.encode(x).latent_dist.mode()
            packed = pipe._pack_latents(pipe._encode_vae_image(image=x, generator=None))
            lat, dec, u8 = decode_packed(pipe, z.to(dtype), 4, 6)
        tensors[f"posterior_mean.{dt}"] = mean.clone()
        tensors[f"packed_latents.{dt}"] = packed.clone()
        tensors[f"vae_input_latents.{dt}"] = lat.clone()
        tensors[f"decoded.{dt}"] = dec.clone()
        tensors[f"decoded_uint8.{dt}"] = u8
        meanings[f"posterior_mean.{dt}"] = f"vae.encode(image).latent_dist.mode() [1,32,8,12] ({dt})"
        meanings[f"packed_latents.{dt}"] = f"pack(BN-normalise(patchify(posterior mean))) [1,24,128] ({dt}), = _encode_vae_image + _pack_latents"
        meanings[f"vae_input_latents.{dt}"] = f"unpack -> BN-denormalise -> unpatchify of decode_input_packed [1,32,8,12] ({dt}), fed to vae.decode"
        meanings[f"decoded.{dt}"] = f"vae.decode output [1,3,64,96] before postprocess ({dt})"
        meanings[f"decoded_uint8.{dt}"] = f"image_processor.postprocess(decoded, 'pil') as uint8 NHWC [1,64,96,3] ({dt} pipeline)"
    spread = {}
    for name in ("posterior_mean", "packed_latents", "vae_input_latents", "decoded"):
        spread[name] = util.spread_entry(tensors[f"{name}.f32"], tensors[f"{name}.bf16"], f"{name}.f32", f"{name}.bf16")
    spread["decoded_uint8"] = util.spread_entry(
        tensors["decoded_uint8.f32"].float(), tensors["decoded_uint8.bf16"].float(), "decoded_uint8.f32", "decoded_uint8.bf16",
        image_u8=(tensors["decoded_uint8.f32"], tensors["decoded_uint8.bf16"]),
    )
    entry = {
        "description": "AutoencoderKLFlux2 encode (posterior mean, pipeline-normalised packed latents) and decode "
        "(pipeline post-loop code: unpack, BN-denormalise, unpatchify, vae.decode, postprocess).",
        "checkpoint": run.ckpt["distilled"],
        "params": {"height": H, "width": W, "image_variant": 0},
        "spread": spread,
    }
    return tensors, meanings, entry


# ----------------------------------------------------------------------------------------------
# 6. whole runs


class _StepCapture:
    def __init__(self):
        self.latents = []

    def __call__(self, pipe, i, t, kwargs):
        self.latents.append(kwargs["latents"].detach().clone())
        return {}


def _run_pipe(pipe, **kwargs):
    """Run a pipeline with output_type='pil', capturing per-step latents, the vae.decode output,
    encode_prompt outputs and prepared reference latents."""
    steps = _StepCapture()
    decoded, encoded, refs = [], [], []

    def pick_decode(a, k, o):
        z = a[0] if a else k["z"]
        return z.detach().clone(), util.decode_output(o).detach().clone()

    with util.capture_method(pipe.vae, "decode", decoded, pick=pick_decode):
        with util.capture_method(pipe, "encode_prompt", encoded, pick=lambda a, k, o: o):
            with util.capture_method(pipe, "prepare_image_latents", refs, pick=lambda a, k, o: o):
                with torch.no_grad():
                    out = pipe(output_type="pil", callback_on_step_end=steps, **kwargs)
    u8 = torch.from_numpy(np.array(out.images[0])).unsqueeze(0)
    assert len(decoded) == 1
    return {
        "step_latents": torch.stack(steps.latents, dim=0),
        "final_latents": steps.latents[-1],
        "vae_input_latents": decoded[0][0],
        "decoded": decoded[0][1],
        "image_uint8": u8,
        "encoded": encoded,
        "refs": refs,
    }


def _run_outputs(tensors, meanings, res, dt, n_steps):
    tensors[f"step_latents.{dt}"] = res["step_latents"]
    tensors[f"final_latents.{dt}"] = res["final_latents"]
    tensors[f"vae_input_latents.{dt}"] = res["vae_input_latents"]
    tensors[f"decoded.{dt}"] = res["decoded"]
    tensors[f"image_uint8.{dt}"] = res["image_uint8"]
    meanings[f"vae_input_latents.{dt}"] = (
        f"unpacked, BN-denormalised, unpatchified final latents [1,32,8,12] fed to vae.decode "
        f"(= what output_type='latent' returns) ({dt} pipeline)"
    )
    meanings[f"step_latents.{dt}"] = f"packed latents after each of the {n_steps} scheduler steps [{n_steps},1,24,128] ({dt} pipeline)"
    meanings[f"final_latents.{dt}"] = f"final packed latents [1,24,128] before unpack/denormalise/decode ({dt} pipeline)"
    meanings[f"decoded.{dt}"] = f"vae.decode output [1,3,64,96] before postprocess ({dt} pipeline)"
    meanings[f"image_uint8.{dt}"] = f"pipeline output image (output_type='pil') as uint8 NHWC [1,64,96,3] ({dt} pipeline)"


def _run_spread(tensors, extra=()):
    s = {}
    for name in ("final_latents",) + tuple(extra) + ("vae_input_latents", "decoded"):
        s[name] = util.spread_entry(tensors[f"{name}.f32"], tensors[f"{name}.bf16"], f"{name}.f32", f"{name}.bf16")
    s["image_uint8"] = util.spread_entry(
        tensors["image_uint8.f32"].float(), tensors["image_uint8.bf16"].float(), "image_uint8.f32", "image_uint8.bf16",
        image_u8=(tensors["image_uint8.f32"], tensors["image_uint8.bf16"]),
    )
    return s


def run_t2i(pipe, prompt, noise, steps=4):
    return _run_pipe(
        pipe, prompt=prompt, height=H, width=W, num_inference_steps=steps, guidance_scale=1.0, latents=noise
    )


def case_t2i(run: Runner, which: str = "distilled"):
    noise = _noise(SEED_NOISE["t2i"], 4, 6)
    tensors = {"noise": noise}
    meanings = {"noise": "initial noise [1,128,4,6] passed as `latents=` (bf16-representable f32)"}
    for dt in DTYPES:
        res = run_t2i(run.p(which, dt), PROMPTS[0], noise)
        _run_outputs(tensors, meanings, res, dt, 4)
    entry = {
        "description": _on(run, which, "Text-to-image: Flux2KleinPipeline(prompt, height=64, width=96, num_inference_steps=4, "
                           "guidance_scale=1.0, latents=noise)."),
        "checkpoint": run.ckpt[which],
        "params": {"prompt": PROMPTS[0], "height": H, "width": W, "num_inference_steps": 4, "guidance_scale": 1.0,
                   "noise_seed": SEED_NOISE["t2i"], "max_sequence_length": MAX_LEN},
        "spread": _run_spread(tensors),
    }
    return tensors, meanings, entry


def run_i2i(pipe, prompt, init_u8, noise, steps, strength):
    """FLUX/SD3 img2img convention with the diffusers modules (spec §5.2): diffusers 0.42.1 has no klein
    img2img pipeline. Mirrors Flux2KleinInpaintPipeline's schedule/start-latent code and
    Flux2KleinPipeline's denoising loop and decode, without reference tokens and without a mask."""
    device = "cpu"
    with torch.no_grad():
        prompt_embeds, text_ids = pipe.encode_prompt(prompt=prompt, device=device, max_sequence_length=MAX_LEN)
        dtype = prompt_embeds.dtype
        image = pipe.image_processor.preprocess(util.to_pil(init_u8), height=H, width=W)
        image = image.to(device=device, dtype=dtype)
        x0 = pipe._encode_vae_image(image=image, generator=None)  # [1,128,h,w], BN-normalised
        h, w = x0.shape[2], x0.shape[3]
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=steps)
        timesteps, n = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
        init_timestep = min(n * strength, n)
        t_start = int(max(n - init_timestep, 0))
        timesteps = pipe.scheduler.timesteps[t_start * pipe.scheduler.order :]
        pipe.scheduler.set_begin_index(t_start * pipe.scheduler.order)
        latent_timestep = timesteps[:1].repeat(1)
        noise_d = noise.to(device=device, dtype=dtype)
        latents = pipe.scheduler.scale_noise(x0, latent_timestep, noise_d)
        latent_ids = pipe._prepare_latent_ids(latents)
        latents = pipe._pack_latents(latents)
        start = latents.clone()
        step_lat = []
        for t in timesteps:
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            noise_pred = pipe.transformer(
                hidden_states=latents.to(pipe.transformer.dtype),
                timestep=timestep / 1000,
                guidance=None,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=latent_ids,
                return_dict=False,
            )[0]
            noise_pred = noise_pred[:, : latents.size(1) :]
            latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            step_lat.append(latents.clone())
        vae_in, dec, u8 = decode_packed(pipe, latents, h, w)
    return {
        "vae_input_latents": vae_in,
        "image": pipe.image_processor.preprocess(util.to_pil(init_u8), height=H, width=W),
        "x0_packed": pipe._pack_latents(x0),
        "start_latents": start,
        "t_start": t_start,
        "timesteps": timesteps.clone(),
        "sigma_start": float(pipe.scheduler.sigmas[t_start]),
        "step_latents": torch.stack(step_lat, 0),
        "final_latents": latents,
        "decoded": dec,
        "image_uint8": u8,
    }


def case_i2i(run: Runner, steps=6, strength=0.6):
    init_u8 = util.synthetic_image(H, W, 1)
    noise = _noise(SEED_NOISE["i2i"], 4, 6)
    tensors = {"init_image_uint8": util.u8_to_tensor(init_u8), "noise": noise}
    meanings = {
        "init_image_uint8": "init image HWC uint8 [64,96,3]",
        "noise": "noise [1,128,4,6] (bf16-representable) blended with the encoded init image",
        "init_image": "image_processor.preprocess(init image) NCHW f32 [-1,1] [1,3,64,96] (cast to the pipeline dtype before vae.encode)",
        "timesteps": "timesteps actually run (scheduler.timesteps[t_start:]), f32",
    }
    meta = {}
    for dt in DTYPES:
        res = run_i2i(run.p("distilled", dt), PROMPTS[0], init_u8, noise, steps, strength)
        tensors["init_image"] = res["image"]
        tensors["timesteps"] = res["timesteps"]
        tensors[f"x0_packed.{dt}"] = res["x0_packed"]
        tensors[f"start_latents.{dt}"] = res["start_latents"]
        meanings[f"x0_packed.{dt}"] = f"packed BN-normalised latents of the init image [1,24,128] ({dt})"
        meanings[f"start_latents.{dt}"] = f"scale_noise(x0, sigma[t_start], noise) packed [1,24,128] ({dt}; computed in {dt})"
        _run_outputs(tensors, meanings, res, dt, len(res["timesteps"]))
        meta = {"t_start": res["t_start"], "sigma_start": res["sigma_start"], "steps_run": len(res["timesteps"])}
    entry = {
        "description": "Image-to-image, FLUX/SD3 convention written explicitly with the diffusers modules (spec §5.2; "
        "diffusers has no klein img2img): full N-step schedule, t_start=int(max(N-N*strength,0)), "
        "latents=scheduler.scale_noise(x0, timesteps[t_start], noise) in the pipeline dtype (uses sigmas[t_start] cast to that dtype), "
        "then the Flux2KleinPipeline loop from t_start with no reference tokens, then the pipeline decode.",
        "checkpoint": run.ckpt["distilled"],
        "params": {"prompt": PROMPTS[0], "height": H, "width": W, "num_inference_steps": steps, "strength": strength,
                   "guidance_scale": 1.0, "noise_seed": SEED_NOISE["i2i"], "init_image_variant": 1, **meta},
        "spread": _run_spread(tensors, extra=("start_latents",)),
    }
    return tensors, meanings, entry


INPAINT_RECT = (16, 32, 48, 80)  # top, left, bottom, right in pixels: token rows 1..2, cols 2..4


def run_inpaint(run: Runner, dt, prompt, init_u8, mask_u8, noise, steps, strength):
    pipe = run.inpaint("distilled", dt)
    cap_lat, cap_mask = [], []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
        return noise.to(device=device or "cpu", dtype=dtype)

    with util.patched_attr(inpaint_mod, "randn_tensor", fake_randn):
        with util.capture_method(pipe, "prepare_latents", cap_lat, pick=lambda a, k, o: o):
            with util.capture_method(pipe, "prepare_mask_latents", cap_mask, pick=lambda a, k, o: o):
                res = _run_pipe(
                    pipe, prompt=prompt, image=util.to_pil(init_u8), mask_image=util.to_pil(mask_u8), height=H, width=W,
                    strength=strength, num_inference_steps=steps, guidance_scale=1.0,
                )
    latents, noise_packed, x0_packed, _, _ = cap_lat[0]
    res["start_latents"] = latents
    res["x0_packed"] = x0_packed
    res["noise_packed"] = noise_packed
    res["mask_tokens"] = cap_mask[0]
    res["ref_tokens"], res["ref_ids"] = res["refs"][0]
    return res


def case_inpaint(run: Runner, steps=6, strength=0.8):
    init_u8 = util.synthetic_image(H, W, 2)
    mask_u8 = util.rect_mask(H, W, *INPAINT_RECT)
    noise = _noise(SEED_NOISE["inpaint"], 4, 6)
    tensors = {"init_image_uint8": util.u8_to_tensor(init_u8), "mask_uint8": util.u8_to_tensor(mask_u8), "noise": noise}
    meanings = {
        "init_image_uint8": "init image HWC uint8 [64,96,3] (passed as PIL RGB)",
        "mask_uint8": "mask image HW uint8 [64,96], 255 = repaint (passed as PIL 'L')",
        "noise": "noise [1,128,4,6] returned by the (monkeypatched) randn_tensor in the inpaint pipeline",
    }
    for dt in DTYPES:
        res = run_inpaint(run, dt, PROMPTS[0], init_u8, mask_u8, noise, steps, strength)
        for k, m in (
            ("mask_tokens", "token-grid mask the pipeline computed (prepare_mask_latents) [1,24,1]"),
            ("x0_packed", "packed BN-normalised latents of the init image [1,24,128] (also the t=10 reference tokens)"),
            ("start_latents", "packed start latents scale_noise(x0, sigma[t_start], noise) [1,24,128]"),
            ("ref_tokens", "condition tokens appended after the noisy tokens [1,24,128] (= x0_packed)"),
        ):
            tensors[f"{k}.{dt}"] = res[k]
            meanings[f"{k}.{dt}"] = f"{m} ({dt})"
        if dt == "f32":
            tensors["ref_ids"] = res["ref_ids"]
            meanings["ref_ids"] = "img ids of the condition tokens [1,24,4] = (10,r,c,0)"
        _run_outputs(tensors, meanings, res, dt, res["step_latents"].shape[0])
    n_run = tensors["step_latents.f32"].shape[0]
    entry = {
        "description": "Flux2KleinInpaintPipeline (distilled) with image + mask_image; the pipeline's randn_tensor is monkeypatched to "
        "return `noise` (spec §8.6: `latents=` would skip the noising). The init image is also injected as a t=10 reference.",
        "checkpoint": run.ckpt["distilled"],
        "params": {"prompt": PROMPTS[0], "height": H, "width": W, "num_inference_steps": steps, "strength": strength,
                   "t_start": steps - n_run, "steps_run": n_run, "guidance_scale": 1.0, "noise_seed": SEED_NOISE["inpaint"],
                   "init_image_variant": 2, "mask_rect_top_left_bottom_right_px": list(INPAINT_RECT),
                   "mask_token_rows": [1, 2], "mask_token_cols": [2, 3, 4]},
        "spread": _run_spread(tensors, extra=("start_latents",)),
    }
    return tensors, meanings, entry


def run_multiref(pipe, prompt, refs_u8, noise, steps=4):
    return _run_pipe(
        pipe, image=[util.to_pil(r) for r in refs_u8], prompt=prompt, height=H, width=W, num_inference_steps=steps,
        guidance_scale=1.0, latents=noise,
    )


def case_multiref(run: Runner):
    ref0 = util.synthetic_image(64, 64, 3)
    ref1 = util.synthetic_image(64, 96, 4)
    noise = _noise(SEED_NOISE["multiref"], 4, 6)
    pipe0 = run.p("distilled", "f32")
    tensors = {
        "ref0_uint8": util.u8_to_tensor(ref0),
        "ref1_uint8": util.u8_to_tensor(ref1),
        "ref0": pipe0.image_processor.preprocess(util.to_pil(ref0), height=64, width=64, resize_mode="crop"),
        "ref1": pipe0.image_processor.preprocess(util.to_pil(ref1), height=64, width=96, resize_mode="crop"),
        "noise": noise,
    }
    meanings = {
        "ref0_uint8": "reference image 0 HWC uint8 [64,64,3] -> ids t=10, grid 4x4",
        "ref1_uint8": "reference image 1 HWC uint8 [64,96,3] -> ids t=20, grid 4x6",
        "ref0": "preprocessed reference 0 NCHW f32 [-1,1] [1,3,64,64] (cast to the VAE dtype before vae.encode)",
        "ref1": "preprocessed reference 1 NCHW f32 [-1,1] [1,3,64,96] (cast to the VAE dtype before vae.encode)",
        "noise": "initial noise [1,128,4,6] passed as `latents=`",
    }
    for dt in DTYPES:
        res = run_multiref(run.p("distilled", dt), PROMPTS[0], [ref0, ref1], noise)
        ref_tokens, ref_ids = res["refs"][0]
        tensors[f"ref_tokens.{dt}"] = ref_tokens
        meanings[f"ref_tokens.{dt}"] = f"packed BN-normalised reference tokens [1,40,128] = [ref0 16 | ref1 24] ({dt})"
        if dt == "f32":
            tensors["ref_ids"] = ref_ids
            meanings["ref_ids"] = "img ids of the reference tokens [1,40,4]: (10,r,c,0) for ref0, (20,r,c,0) for ref1"
        _run_outputs(tensors, meanings, res, dt, 4)
    entry = {
        "description": "Multi-reference edit: Flux2KleinPipeline(image=[ref0, ref1], prompt, height=64, width=96, num_inference_steps=4, "
        "latents=noise). References are <= 1 MP with sides multiple of 16, so no resampling happens.",
        "checkpoint": run.ckpt["distilled"],
        "params": {"prompt": PROMPTS[0], "height": H, "width": W, "num_inference_steps": 4, "guidance_scale": 1.0,
                   "noise_seed": SEED_NOISE["multiref"], "ref_sizes_hw": [[64, 64], [64, 96]], "ref_variants": [3, 4]},
        "spread": _run_spread(tensors, extra=("ref_tokens",)),
    }
    return tensors, meanings, entry


def run_cfg(pipe, prompt, noise, steps=8, guidance=4.0):
    return _run_pipe(
        pipe, prompt=prompt, height=H, width=W, num_inference_steps=steps, guidance_scale=guidance, latents=noise
    )


def case_cfg(run: Runner, steps=8, guidance=4.0):
    noise = _noise(SEED_NOISE["cfg"], 4, 6)
    tensors = {"noise": noise}
    meanings = {"noise": "initial noise [1,128,4,6] passed as `latents=`"}
    for dt in DTYPES:
        res = run_cfg(run.p("base", dt), PROMPTS[0], noise, steps, guidance)
        assert len(res["encoded"]) == 2
        tensors[f"negative_prompt_embeds.{dt}"] = res["encoded"][1][0]
        meanings[f"negative_prompt_embeds.{dt}"] = f"negative embeddings encode_prompt('') [1,512,192] ({dt})"
        _run_outputs(tensors, meanings, res, dt, steps)
    entry = {
        "description": "Classifier-free guidance on the BASE checkpoint: Flux2KleinPipeline(prompt, height=64, width=96, "
        "num_inference_steps=8, guidance_scale=4.0, latents=noise); negative prompt is '' (pipeline default), "
        "v = v_neg + g*(v_pos - v_neg).",
        "checkpoint": run.ckpt["base"],
        "params": {"prompt": PROMPTS[0], "negative_prompt": "", "height": H, "width": W, "num_inference_steps": steps,
                   "guidance_scale": guidance, "noise_seed": SEED_NOISE["cfg"]},
        "spread": _run_spread(tensors, extra=("negative_prompt_embeds",)),
    }
    return tensors, meanings, entry


# ----------------------------------------------------------------------------------------------
# sensitivity checks (f32 only)


def sensitivity(run: Runner) -> dict:
    out = {}
    p = run.p("distilled", "f32")
    noise = _noise(SEED_NOISE["t2i"], 4, 6)
    a = run_t2i(p, PROMPTS[0], noise)
    b = run_t2i(p, PROMPT_B, noise)
    out["t2i_prompt"] = {
        "what": f"t2i, same noise, prompt {PROMPTS[0]!r} vs {PROMPT_B!r}",
        "final_latents_rel_l2": util.rel_l2(a["final_latents"], b["final_latents"]),
        "decoded_rel_l2": util.rel_l2(a["decoded"], b["decoded"]),
        **util.pixel_diff(a["image_uint8"], b["image_uint8"]),
    }
    c = run_t2i(p, PROMPTS[0], _noise(SEED_NOISE["t2i"] + 100, 4, 6))
    out["t2i_noise"] = {
        "what": "t2i, same prompt, different noise",
        "final_latents_rel_l2": util.rel_l2(a["final_latents"], c["final_latents"]),
        **util.pixel_diff(a["image_uint8"], c["image_uint8"]),
    }
    # multiref: change reference 1
    ref0, ref1 = util.synthetic_image(64, 64, 3), util.synthetic_image(64, 96, 4)
    nm = _noise(SEED_NOISE["multiref"], 4, 6)
    m1 = run_multiref(p, PROMPTS[0], [ref0, ref1], nm)
    m2 = run_multiref(p, PROMPTS[0], [ref0, util.synthetic_image(64, 96, 7)], nm)
    m3 = run_t2i(p, PROMPTS[0], nm)
    out["multiref_reference"] = {
        "what": "multiref, reference 1 replaced by another image",
        "final_latents_rel_l2": util.rel_l2(m1["final_latents"], m2["final_latents"]),
        **util.pixel_diff(m1["image_uint8"], m2["image_uint8"]),
    }
    out["multiref_vs_t2i"] = {
        "what": "multiref vs the same run without references (t2i)",
        "final_latents_rel_l2": util.rel_l2(m1["final_latents"], m3["final_latents"]),
        **util.pixel_diff(m1["image_uint8"], m3["image_uint8"]),
    }
    # i2i: change init image
    ni = _noise(SEED_NOISE["i2i"], 4, 6)
    i1 = run_i2i(p, PROMPTS[0], util.synthetic_image(H, W, 1), ni, 6, 0.6)
    i2 = run_i2i(p, PROMPTS[0], util.synthetic_image(H, W, 5), ni, 6, 0.6)
    out["i2i_init_image"] = {
        "what": "i2i, different init image",
        "final_latents_rel_l2": util.rel_l2(i1["final_latents"], i2["final_latents"]),
        **util.pixel_diff(i1["image_uint8"], i2["image_uint8"]),
    }
    # inpaint: mask matters
    init_u8 = util.synthetic_image(H, W, 2)
    nn_ = _noise(SEED_NOISE["inpaint"], 4, 6)
    r1 = run_inpaint(run, "f32", PROMPTS[0], init_u8, util.rect_mask(H, W, *INPAINT_RECT), nn_, 6, 0.8)
    r2 = run_inpaint(run, "f32", PROMPTS[0], init_u8, util.rect_mask(H, W, 0, 0, 32, 48), nn_, 6, 0.8)
    m = r1["mask_tokens"]
    keep = (m[0, :, 0] == 0)
    out["inpaint_mask"] = {
        "what": "inpaint, mask rect rows16-48/cols32-80 vs rows0-32/cols0-48",
        "final_latents_rel_l2": util.rel_l2(r1["final_latents"], r2["final_latents"]),
        **util.pixel_diff(r1["image_uint8"], r2["image_uint8"]),
        "unmasked_tokens_equal_x0": bool(torch.equal(r1["final_latents"][0, keep], r1["x0_packed"][0, keep])),
        "masked_tokens_rel_l2_vs_x0": util.rel_l2(r1["x0_packed"][0, ~keep], r1["final_latents"][0, ~keep]),
    }
    # cfg: guidance matters on the base model
    pb = run.p("base", "f32")
    nc = _noise(SEED_NOISE["cfg"], 4, 6)
    g4 = run_cfg(pb, PROMPTS[0], nc, 8, 4.0)
    g1 = run_cfg(pb, PROMPTS[0], nc, 8, 1.0)
    out["cfg_guidance"] = {
        "what": "base model, guidance 4.0 vs 1.0 (no CFG)",
        "final_latents_rel_l2": util.rel_l2(g4["final_latents"], g1["final_latents"]),
        **util.pixel_diff(g4["image_uint8"], g1["image_uint8"]),
    }
    out["text_encoder_layers"] = _text_encoder_layers(p)
    # the 9B-shaped checkpoint: the prompt and layers 26 / 27 likewise
    p9 = run.p("distilled_9b", "f32")
    a9 = run_t2i(p9, PROMPTS[0], noise)
    b9 = run_t2i(p9, PROMPT_B, noise)
    out["t2i_prompt_9b"] = {
        "what": f"{run.ckpt['distilled_9b']}: t2i, same noise, prompt {PROMPTS[0]!r} vs {PROMPT_B!r}",
        "final_latents_rel_l2": util.rel_l2(a9["final_latents"], b9["final_latents"]),
        "decoded_rel_l2": util.rel_l2(a9["decoded"], b9["decoded"]),
        **util.pixel_diff(a9["image_uint8"], b9["image_uint8"]),
    }
    out["text_encoder_layers_9b"] = _text_encoder_layers(p9, f"{run.ckpt['distilled_9b']}: ")
    return out


def _text_encoder_layers(p, what_prefix: str = "") -> dict:
    """Decoder layer 27 (0-based; the 28th) must not influence the embeddings, layer 26 must."""
    te = p.text_encoder
    with torch.no_grad():
        e0 = p.encode_prompt(prompt=PROMPTS[0], device="cpu")[0]
        diffs = {}
        for layer in (27, 26):
            saved = {k: v.clone() for k, v in te.model.layers[layer].state_dict().items()}
            for prm in te.model.layers[layer].parameters():
                prm.mul_(-1.5)
            e1 = p.encode_prompt(prompt=PROMPTS[0], device="cpu")[0]
            te.model.layers[layer].load_state_dict(saved)
            diffs[layer] = util.rel_l2(e0, e1)
        e2 = p.encode_prompt(prompt=PROMPTS[0], device="cpu")[0]
        assert torch.equal(e0, e2)
    return {
        "what": f"{what_prefix}perturb decoder layer 27 (28th, unused) / 26 (produces hidden_states[27]) and re-encode prompt 0",
        "layer27_rel_l2": diffs[27],
        "layer26_rel_l2": diffs[26],
    }


def f64_reference(fixtures_dir: str, ckpt: str, run: Runner, tensors_by_case: dict) -> dict:
    """f32 vs float64 for a few outputs (how close torch's own f32 is to a float64 run)."""
    from diffusers import Flux2KleinPipeline

    p64 = Flux2KleinPipeline.from_pretrained(f"{fixtures_dir}/{ckpt}", dtype=torch.float64)
    p64.set_progress_bar_config(disable=True)
    out = {}
    with torch.no_grad():
        e64 = p64.encode_prompt(prompt=PROMPTS[0], device="cpu")[0]
    out["text_embeddings.p0.prompt_embeds"] = util.rel_l2(e64, tensors_by_case["text_embeddings"]["p0.prompt_embeds.f32"])
    tf = tensors_by_case["transformer_forward"]
    with torch.no_grad():
        o64 = p64.transformer(
            hidden_states=tf["hidden_states"].double(),
            timestep=torch.tensor([730.0], dtype=torch.float64) / 1000,
            guidance=None,
            encoder_hidden_states=tf["encoder_hidden_states"].double(),
            txt_ids=tf["txt_ids"],
            img_ids=tf["img_ids"],
            return_dict=False,
        )[0]
    out["transformer_forward.output"] = util.rel_l2(o64, tf["output.f32"])
    t2i = tensors_by_case["t2i"]
    r64 = run_t2i(p64, PROMPTS[0], t2i["noise"].double())
    out["t2i.final_latents"] = util.rel_l2(r64["final_latents"], t2i["final_latents.f32"])
    out["t2i.decoded"] = util.rel_l2(r64["decoded"], t2i["decoded.f32"])
    return out
