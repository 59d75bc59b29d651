"""Tiny Qwen3-style byte-level BPE tokenizer.

The tokenizer is trained with the `tokenizers` library on a small fixed corpus, using exactly the
normalizer / pre-tokenizer / decoder that transformers' `Qwen2Tokenizer` builds (NFC, the Qwen2 split
regex in "isolated" mode, ByteLevel without its own regex, ByteLevel decoding, ByteLevel
post-processor). The Qwen3 added tokens (ids 151643..151668 in the real model) are appended after the
BPE vocabulary in the same order, so `<|endoftext|>` is the first added id here.

`write_source_tokenizer(dir)` writes the files a Hub repo carries (tokenizer.json,
tokenizer_config.json with the real Qwen3 chat template, vocab.json, merges.txt). The generator then
loads that folder with `Qwen2Tokenizer.from_pretrained` (as diffusers would from the Hub) and lets
`Flux2KleinPipeline.save_pretrained` write the fixture's tokenizer folder.
"""

from __future__ import annotations

import json
import os

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

HERE = os.path.dirname(os.path.abspath(__file__))

# transformers/models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX (identical to Qwen2/Qwen3 tokenizer.json)
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3's added tokens in id order (real ids 151643 + i). (content, special)
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]

BPE_VOCAB_SIZE = 640  # 256 byte symbols + 384 merges; + 26 added tokens = 666 ids

# Fixed training corpus (deterministic). Photo-caption-like English plus a little punctuation,
# digits, code-ish text and non-ASCII so that multi-byte merges exist.
_CORPUS_LINES = [
    "a photo of a cat",
    "a photo of a dog sitting on a red sofa",
    "a close-up photo of a cat with green eyes, soft light, 35mm film",
    "a red sports car at night in the rain, neon reflections on the street",
    "a watercolor painting of a lighthouse on a cliff above the sea",
    "an astronaut riding a horse on the moon, highly detailed, digital art",
    "a bowl of ramen with an egg, chopsticks, steam, top view",
    "the quick brown fox jumps over the lazy dog",
    "a portrait of an old man with a beard, black and white photograph",
    "a cozy cabin in a snowy forest at dusk, warm light in the windows",
    "a cat sitting on a mat next to a window, sunlight, photo",
    "a small robot holding a sign that says hello world",
    "a landscape with mountains, a lake and a blue sky with white clouds",
    "product photo of a glass bottle on a wooden table, studio lighting",
    "a city skyline at sunset, long exposure, high resolution",
    "an oil painting of flowers in a vase, impressionist style",
    "a cute cartoon cat wearing a hat, simple background",
    "make the sky purple and add a rainbow",
    "replace the cat with a dog, keep the background",
    "turn this photo into a pencil sketch",
    "café, naïve, résumé, Ünïcödé, crème brûlée, über, señor, façade",
    "猫 狗 鸟 花 山 水 日 月 — 猫が好き",
    "🐱 🐶 🌸 ⭐ — “quoted” ‘text’ … and so on",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 1024x1024",
    "def main():\n    print('hello world')\n    return 0\n",
    "The image shows a cat. It's a photo; the cat's fur is orange. We'll see, they're here, I'm sure, you've done it, he'd go.",
    "A PHOTO OF A CAT. Photo Of A Cat! photo, photos, photographic, photography",
    "user assistant system think thinking answer question",
    "first paragraph.\n\nsecond paragraph.\n\nthird paragraph.\n",
    "user\nhello there\n\nassistant\nthink\n\nanswer\n\nuser\nassistant\n",
]


def _corpus() -> list[str]:
    # repeat lines with small variations so counts are non-trivial and deterministic
    out = []
    for rep in range(4):
        for i, line in enumerate(_CORPUS_LINES):
            out.append(line)
            if rep % 2 == 0:
                out.append(line.capitalize() + ".")
            out.append(f"{line} {i} {rep}")
    return out


def _apply_qwen2_pipeline(tok: Tokenizer) -> None:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(
        BPE(
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    _apply_qwen2_pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    from tokenizers import AddedToken

    for content, special in QWEN3_ADDED_TOKENS:
        at = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
    return tok


def qwen3_chat_template() -> str:
    with open(os.path.join(HERE, "qwen3_chat_template.jinja"), encoding="utf-8") as f:
        return f.read()


def write_source_tokenizer(out_dir: str) -> dict:
    """Write a Hub-style Qwen3 tokenizer folder. Returns info (vocab sizes, special ids)."""
    os.makedirs(out_dir, exist_ok=True)
    tok = train_tokenizer()
    tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    js = json.loads(tok.to_str())
    vocab = js["model"]["vocab"]
    merges = js["model"]["merges"]
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in merges:
            a, b = (m if isinstance(m, (list, tuple)) else m.split(" "))
            f.write(f"{a} {b}\n")
    base = len(vocab)
    added_decoder = {}
    for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS):
        added_decoder[str(base + i)] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    # Mirrors Qwen/Qwen3-4B tokenizer_config.json (ids remapped to the tiny vocab).
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [
            "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
            "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
        ],
        "bos_token": None,
        "chat_template": qwen3_chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    return {
        "bpe_vocab_size": base,
        "num_added_tokens": len(QWEN3_ADDED_TOKENS),
        "total_size": base + len(QWEN3_ADDED_TOKENS),
        "special_ids": {c: base + i for i, (c, _) in enumerate(QWEN3_ADDED_TOKENS)},
    }


def template_string(prompt: str) -> str:
    """The string `apply_chat_template(..., add_generation_prompt=True, enable_thinking=False)` yields."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
