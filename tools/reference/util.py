"""Small helpers shared by the reference generator: metrics, synthetic images, capture hooks."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import PIL.Image
import torch


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round an f32 tensor to bf16-representable values (result stays f32)."""
    return t.to(torch.bfloat16).to(torch.float32)


def rel_l2(ref: torch.Tensor, other: torch.Tensor) -> float:
    a = ref.detach().to(torch.float64)
    b = other.detach().to(torch.float64)
    den = float(a.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def max_abs(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float((ref.detach().to(torch.float64) - other.detach().to(torch.float64)).abs().max())


def pixel_diff(ref_u8: torch.Tensor, other_u8: torch.Tensor) -> dict:
    d = (ref_u8.to(torch.int32) - other_u8.to(torch.int32)).abs().to(torch.float64)
    return {"mean_abs_255": float(d.mean()), "max_abs_255": int(d.max())}


def spread_entry(f32: torch.Tensor, bf16: torch.Tensor, f32_key: str, bf16_key: str, image_u8=None) -> dict:
    e = {
        "f32_key": f32_key,
        "bf16_key": bf16_key,
        "rel_l2": rel_l2(f32, bf16),
        "max_abs": max_abs(f32, bf16),
    }
    if image_u8 is not None:
        e.update(pixel_diff(*image_u8))
    return e


# ----------------------------------------------------------------------------------------------
# synthetic images (smooth, deterministic, uint8 HWC)


def synthetic_image(height: int, width: int, variant: int) -> np.ndarray:
    y, x = np.meshgrid(
        np.linspace(0.0, 1.0, height, dtype=np.float64), np.linspace(0.0, 1.0, width, dtype=np.float64), indexing="ij"
    )
    rng = np.random.RandomState(1000 + variant)
    a, b, c, d = rng.uniform(0.5, 2.5, size=4)
    ph = rng.uniform(0, 2 * math.pi, size=3)
    cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.15, 0.35)
    red = 0.5 + 0.4 * np.sin(2 * math.pi * (a * x + b * y) + ph[0])
    green = 0.5 + 0.4 * np.cos(2 * math.pi * (c * x - d * y) + ph[1]) * (0.6 + 0.4 * x)
    blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (r * r)))
    blue = 0.15 + 0.7 * blob + 0.1 * np.sin(2 * math.pi * 3 * y + ph[2])
    img = np.stack([red, green, blue], axis=-1)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def rect_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    m = np.zeros((height, width), dtype=np.uint8)
    m[top:bottom, left:right] = 255
    return m


def to_pil(arr: np.ndarray) -> PIL.Image.Image:
    if arr.ndim == 2:
        return PIL.Image.fromarray(arr, mode="L")
    return PIL.Image.fromarray(arr, mode="RGB")


def u8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr))


# ----------------------------------------------------------------------------------------------
# capture helpers


@contextlib.contextmanager
def capture_method(obj, name: str, store: list, pick=lambda args, kwargs, out: out):
    """Temporarily wrap obj.<name> (instance attribute) and append pick(...) of each call to store."""
    orig = getattr(obj, name)

    def wrapped(*args, **kwargs):
        out = orig(*args, **kwargs)
        store.append(pick(args, kwargs, out))
        return out

    setattr(obj, name, wrapped)
    try:
        yield store
    finally:
        try:
            delattr(obj, name)
        except AttributeError:
            setattr(obj, name, orig)


def decode_output(out):
    """vae.decode(..., return_dict=False) returns a tuple; return_dict=True a DecoderOutput."""
    if isinstance(out, tuple):
        return out[0]
    return out.sample


@contextlib.contextmanager
def patched_attr(module, name: str, value):
    orig = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, orig)
