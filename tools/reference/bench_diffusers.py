"""The diffusers side of the GPU benchmark: the same cases as `klein-bench components` and the
whole 1024² 4-step T2I, with random weights of the real klein-4B (or klein-9B) shapes built on
the GPU (timing does not depend on weight values), eager bf16, CUDA-event timed, median of N
after warm-up.

Rows use klein-bench's names (component, case, dtype) so tools/gpu/compare.py can pair them.
Peak memory: torch.cuda.max_memory_allocated during the call, weights included.

The text encoder also gets its GPU kernel time (torch.profiler: the sum of the CUDA kernels'
durations per call), the time eager PyTorch would take without launch overhead.

`--exact-f32` turns TF32 off (torch's default lets cuDNN's f32 convolutions run in TF32): the
f32 rows are then exact f32, as vae-svc's default.

The transformer rows carry the step's FLOPs (`tflop`). With them go the card's bf16 matmul rate,
8192³ timed as `../shared/gpu/README.md`'s reference table timed it (median of 20 after 5 warm-up
products), from which tools/gpu/compare.py computes the step's floor on this card, and with
`--compile` the same steps through `torch.compile` (the issue's second reference).

Usage (on the GPU machine, diffusers 0.42.1 on PYTHONPATH):
    python3 tools/reference/bench_diffusers.py OUT.json [--iters N] [--tokenizer DIR]
        [--only text_encoder,transformer,vae,pipeline] [--exact-f32]
        [--model klein-4b|klein-9b] [--batches 1,2,4] [--sizes 512,1024] [--compile]
"""

import argparse
import json
import statistics
import time

import torch

BF16 = torch.bfloat16
DEV = "cuda"

# diffusers' scripts/convert_flux2_to_diffusers.py, model type "klein-4b".
KLEIN_4B = dict(
    patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
)
# The same script's "klein-9b" and Qwen3-8B (spec section 1).
KLEIN_9B = dict(KLEIN_4B, num_layers=8, num_single_layers=24, num_attention_heads=32,
                joint_attention_dim=12288)
QWEN3_8B = dict(QWEN3_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
# --model: (transformer name, its config, text encoder name, its config), as klein-bench names them.
MODELS = {
    "klein-4b": ("klein-4B", KLEIN_4B, "Qwen3-4B", QWEN3_4B),
    "klein-9b": ("klein-9B", KLEIN_9B, "Qwen3-8B", QWEN3_8B),
}


def timed(fn, iters, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ms.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return statistics.median(ms), min(ms), torch.cuda.max_memory_allocated() / 2**30


class Rows:
    def __init__(self, path, iters):
        self.path, self.iters, self.rows = path, iters, []

    def add(self, component, case, dtype, fn, iters=None, **extra):
        med, best, peak = timed(fn, iters or self.iters)
        row = dict(component=component, case=case, dtype=dtype, median_ms=med, min_ms=best,
                   peak_gib=peak, iters=iters or self.iters, **extra)
        print(f"| {component} | {case} | {dtype} | {med:.2f} | {best:.2f} | {peak:.2f} |", flush=True)
        self.save(row)

    def add_kernel_time(self, component, case, dtype, fn, iters=None):
        """Mean GPU kernel time per call over `iters` profiled calls, after warm-up."""
        from torch.profiler import ProfilerActivity, profile

        n = iters or self.iters
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / n
        row = dict(component=component, case=case, dtype=dtype, median_ms=ms, min_ms=ms,
                   peak_gib=None, iters=n)
        print(f"| {component} | {case} | {dtype} | {ms:.2f} | – | – |", flush=True)
        self.save(row)

    def save(self, row):
        self.rows.append(row)
        with open(self.path, "w") as f:
            json.dump(dict(env=env(), rows=self.rows), f, indent=1)


def env():
    import diffusers
    import transformers

    p = torch.cuda.get_device_properties(0)
    return dict(gpu=p.name, torch=torch.__version__, cuda=torch.version.cuda,
                diffusers=diffusers.__version__, transformers=transformers.__version__)


def build(factory):
    with torch.device(DEV):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(BF16)
        try:
            return factory().to(DEV, BF16).eval()
        finally:
            torch.set_default_dtype(prev)


def text_encoder(rows, name, config):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**config, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    te = build(lambda: Qwen3ForCausalLM(cfg))
    ids = torch.arange(512, device=DEV).unsqueeze(0)
    mask = torch.zeros(1, 512, dtype=torch.long, device=DEV)
    mask[:, :40] = 1
    # What Flux2KleinPipeline runs: the whole causal LM with every hidden state.
    def run():
        return te(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)

    rows.add("text_encoder", f"{name}, 512 tokens", "bf16", run)
    rows.add_kernel_time("text_encoder", f"{name}, 512 tokens, GPU kernel time", "bf16", run)
    return te


def matmul_rate(rows):
    """The card's bf16 matmul rate, 8192³, timed as the reference table's floor was."""
    n = 8192
    a, b = (torch.randn(n, n, device=DEV, dtype=BF16) for _ in range(2))
    c = torch.empty(n, n, device=DEV, dtype=BF16)
    med, best, _ = timed(lambda: torch.matmul(a, b, out=c), iters=20, warm=5)
    rows.save(dict(component="gpu", case="bf16 matmul 8192³", dtype="bf16", median_ms=med,
                   min_ms=best, peak_gib=None, iters=20, tflops=2 * n**3 / (med * 1e-3) / 1e12))
    print(f"| gpu | bf16 matmul 8192³ | bf16 | {med:.3f} | {best:.3f} | – |", flush=True)


def step_tflop(config, tokens, batch):
    """One transformer forward's FLOPs: its linear layers' products and the attention's two."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(d * config["mlp_ratio"])
    # Per token and block, double or single: q, k, v, the output projection and the SwiGLU MLP.
    block = 2 * d * (3 * d + d + 2 * mlp + mlp)
    blocks = config["num_layers"] + config["num_single_layers"]
    attention = 4 * tokens * tokens * d
    img = tokens - 512
    embed = 2 * d * (config["in_channels"] * img + config["joint_attention_dim"] * 512)
    out = 2 * d * config["in_channels"] * img
    return batch * (blocks * (block * tokens + attention) + embed + out) / 1e12


def transformer(rows, sizes, batches, name, config, compile_too):
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    m = build(lambda: Flux2Transformer2DModel(**config))
    compiled = torch.compile(m) if compile_too else None
    for px in sizes:
        for b in batches:
            lat = torch.randn(b, 128, px // 16, px // 16, device=DEV, dtype=BF16)
            ctx = torch.randn(b, 512, config["joint_attention_dim"], device=DEV, dtype=BF16)
            inputs = dict(
                hidden_states=lat.flatten(2).transpose(1, 2).contiguous(),
                encoder_hidden_states=ctx,
                timestep=torch.full((b,), 0.968, device=DEV, dtype=BF16),
                img_ids=Flux2KleinPipeline._prepare_latent_ids(lat).to(DEV),
                txt_ids=Flux2KleinPipeline._prepare_text_ids(ctx).to(DEV),
                guidance=None, return_dict=False,
            )
            case = f"{name} step {px}x{px}, batch {b}"
            tflop = step_tflop(config, 512 + (px // 16) ** 2, b)
            rows.add("transformer", case, "bf16", lambda: m(**inputs), tflop=tflop)
            if compiled is not None:
                t = time.time()
                compiled(**inputs)
                torch.cuda.synchronize()
                rows.add("transformer", f"{case}, torch.compile", "bf16",
                         lambda: compiled(**inputs), tflop=tflop, compile_s=time.time() - t)
    return m


def vae(rows, sizes):
    from diffusers import AutoencoderKLFlux2

    with torch.device(DEV):
        v = AutoencoderKLFlux2().to(DEV).eval()
    for px in sizes:
        for dt, tag in [(torch.float32, "f32"), (BF16, "bf16")]:
            v = v.to(dt)
            z = torch.randn(1, 32, px // 8, px // 8, device=DEV, dtype=dt)
            x = torch.rand(1, 3, px, px, device=DEV, dtype=dt) * 2 - 1
            rows.add("vae", f"decode {px}x{px}", tag, lambda: v.decode(z, return_dict=False))
            rows.add("vae", f"encode {px}x{px}", tag, lambda: v.encode(x, return_dict=False))
    return v


def pipeline(rows, te, m, v, tokenizer_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import AutoTokenizer

    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        time_shift_type="exponential")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # The pipeline decodes in its own dtype: an f32 VAE in a bf16 pipeline fails in
    # post_quant_conv (bf16 input, f32 bias), so diffusers' whole run is all-bf16.
    pipe = Flux2KleinPipeline(scheduler=sched, vae=v.to(BF16), text_encoder=te, tokenizer=tok,
                              transformer=m, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    for px in (1024, 512):
        def t2i():
            g = torch.Generator(device=DEV).manual_seed(0)
            return pipe(prompt="a photo of a cat", height=px, width=px, num_inference_steps=4,
                        guidance_scale=1.0, generator=g, output_type="pil")

        with torch.inference_mode():
            rows.add("pipeline", f"t2i {px}x{px}, 4 steps, PIL image", "bf16", t2i, iters=3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tokenizer", default="tests/fixtures/tiny-klein-4b/tokenizer")
    ap.add_argument("--only", default="text_encoder,transformer,vae,pipeline")
    ap.add_argument("--exact-f32", action="store_true")
    ap.add_argument("--model", choices=sorted(MODELS), default="klein-4b")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--compile", action="store_true",
                    help="also time the transformer cases through torch.compile")
    a = ap.parse_args()
    name, config, encoder_name, encoder_config = MODELS[a.model]
    if a.exact_f32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    only = set(a.only.split(","))
    if "pipeline" in only and not {"text_encoder", "transformer", "vae"} <= only:
        ap.error("--only pipeline needs text_encoder,transformer,vae (it reuses their models)")
    rows = Rows(a.out, a.iters)
    t0 = time.time()
    print("| component | case | dtype | median ms | min ms | peak GiB |\n|---|---|---|---|---|---|")
    with torch.inference_mode():
        if "text_encoder" in only:
            te = text_encoder(rows, encoder_name, encoder_config)
        if "transformer" in only:
            matmul_rate(rows)
            batches = [int(b) for b in a.batches.split(",")]
            sizes = [int(px) for px in a.sizes.split(",")]
            m = transformer(rows, sizes, batches, name, config, a.compile)
        if "vae" in only:
            v = vae(rows, [512, 1024])
    if "pipeline" in only:
        pipeline(rows, te, m, v, a.tokenizer)
    print(f"diffusers bench done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
