"""The bundled ``digits`` dataset: real handwritten digits on a canvas.

The 1,797 8x8 handwritten digits of scikit-learn's ``load_digits`` (they ship inside
the package: no download) are scaled up (14-40 % of the image side, varied aspect),
tinted and placed, several per image, on the textured backgrounds of ``shapes``.
Training images use digits written by one set of writers' samples (index % 5 != 0),
validation images the others, so validation AP measures generalisation to unseen
handwriting.  Ten classes, named ``"0"`` .. ``"9"``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from paploss.data.render import contrasting_colour, overlaps_too_much, textured_background

__all__ = ["CATEGORIES", "render_digits"]

CATEGORIES = [str(d) for d in range(10)]


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _pool(split: str) -> np.ndarray:
    n = len(_digits()[1])
    idx = np.arange(n)
    return idx[idx % 5 == 0] if split == "val" else idx[idx % 5 != 0]


def render_digits(rng: np.random.Generator, image_size: int, split: str = "train", max_objects: int = 5):
    """One image: ``uint8[H, W, 3]`` and a list of ``(label, [x, y, w, h])`` with
    ``label`` the digit 0..9; the box is the tight box of the visible stroke."""
    S = image_size
    images, targets = _digits()
    pool = _pool(split)
    canvas = textured_background(rng, S).astype(np.float32)
    objects: list = []
    boxes: list = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        k = int(pool[rng.integers(0, len(pool))])
        h = int(np.clip(round(S * rng.uniform(0.14, 0.40)), 8, S - 2))
        w = int(np.clip(round(h * rng.uniform(0.6, 1.0)), 6, S - 2))
        alpha = np.asarray(
            Image.fromarray((images[k] * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.float32
        ) / 255.0
        ys, xs = np.nonzero(alpha > 0.25)
        if len(xs) == 0:
            continue
        for _attempt in range(20):
            x0 = int(rng.integers(0, S - w + 1))
            y0 = int(rng.integers(0, S - h + 1))
            box = [x0 + int(xs.min()), y0 + int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            if not overlaps_too_much(box, boxes):
                break
        else:
            continue
        region = canvas[y0:y0 + h, x0:x0 + w]
        colour = np.array(contrasting_colour(rng, region.reshape(-1, 3).mean(0)), dtype=np.float32)
        a = np.where(alpha > 0.25, alpha, 0.0)[..., None]  # the box is where the stroke is visible
        canvas[y0:y0 + h, x0:x0 + w] = region * (1 - a) + colour * a
        boxes.append(box)
        objects.append((int(targets[k]), [float(v) for v in box]))
    canvas += rng.normal(0, 4, canvas.shape)
    return np.clip(canvas.round(), 0, 255).astype(np.uint8), objects
