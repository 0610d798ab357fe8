"""Small drawing helpers shared by the bundled dataset generators."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["textured_background", "contrasting_colour", "overlaps_too_much"]


def textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random texture ``uint8[size, size, 3]``: coarse colour noise upsampled
    bicubically, plus faint stripes at a random angle."""
    coarse = rng.uniform(40, 215, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(4, 16)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    base += (rng.uniform(0, 18) * stripes)[..., None]
    return np.clip(base, 0, 255).astype(np.uint8)


def contrasting_colour(rng: np.random.Generator, background: np.ndarray, min_distance: float = 90.0) -> tuple:
    """A random RGB colour at least ``min_distance`` (L2 in RGB) away from ``background``."""
    for _ in range(50):
        c = rng.integers(0, 256, 3)
        if np.linalg.norm(c - background) >= min_distance:
            return tuple(int(v) for v in c)
    return tuple(int(v) for v in np.where(background > 127, 0, 255))


def overlaps_too_much(box: list, others: list, max_iou: float = 0.3, max_cover: float = 0.5) -> bool:
    """True when ``box`` (x, y, w, h) overlaps any of ``others`` with IoU above ``max_iou``
    or covers more than ``max_cover`` of one of them (which would hide it)."""
    x0, y0, w, h = box
    for ox, oy, ow, oh in others:
        iw = max(0.0, min(x0 + w, ox + ow) - max(x0, ox))
        ih = max(0.0, min(y0 + h, oy + oh) - max(y0, oy))
        inter = iw * ih
        if inter / (w * h + ow * oh - inter) > max_iou or inter / (ow * oh) > max_cover:
            return True
    return False
