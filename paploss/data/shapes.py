"""The bundled ``shapes`` dataset: filled shapes on textured backgrounds.

Five classes (ellipse, rectangle, triangle, diamond, cross) of varied size (12-45 %
of the image side), aspect ratio (1:2 to 2:1), colour and overlap, drawn on smooth
random textures with unannotated clutter (thin strokes, dots).  Boxes are exact (the
tight box of the drawn polygon), so localisation quality is measurable and matters.

Each image is a pure function of ``(seed, split, index)``: the same call gives the
same pixels on every machine, and changing ``n_train`` does not change image 0.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from paploss.data.render import overlaps_too_much, textured_background, contrasting_colour

__all__ = ["CATEGORIES", "render_shapes"]

CATEGORIES = ["ellipse", "rectangle", "triangle", "diamond", "cross"]


def _draw(draw: ImageDraw.ImageDraw, kind: int, box: tuple[int, int, int, int], colour, rng) -> None:
    x0, y0, x1, y1 = box  # inclusive pixel corners
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == 0:
        draw.ellipse(box, fill=colour)
    elif kind == 1:
        draw.rectangle(box, fill=colour)
    elif kind == 2:
        if rng.random() < 0.5:
            draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=colour)
        else:
            draw.polygon([(x0, y0), (x1, y0), (cx, y1)], fill=colour)
    elif kind == 3:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    else:
        tw, th = max(1, round((x1 - x0 + 1) / 3)), max(1, round((y1 - y0 + 1) / 3))
        draw.rectangle((x0, round(cy - th / 2), x1, round(cy + th / 2)), fill=colour)
        draw.rectangle((round(cx - tw / 2), y0, round(cx + tw / 2), y1), fill=colour)


def render_shapes(rng: np.random.Generator, image_size: int, max_objects: int = 5) -> tuple[np.ndarray, list]:
    """One image: ``uint8[H, W, 3]`` and a list of ``(label, [x, y, w, h])`` with
    ``label`` in ``0..4`` indexing :data:`CATEGORIES`."""
    S = image_size
    bg = textured_background(rng, S)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    # clutter: thin strokes and dots, smaller than any object, not annotated
    for _ in range(int(rng.integers(2, 7))):
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            p = rng.uniform(0, S, 2)
            q = p + rng.uniform(-0.25 * S, 0.25 * S, 2)
            draw.line([tuple(p), tuple(q)], fill=col, width=1)
        else:
            r = rng.uniform(0.5, 0.03 * S + 1)
            c = rng.uniform(0, S, 2)
            draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=col)
    objects: list = []
    boxes: list = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            side = S * rng.uniform(0.12, 0.45)
            aspect = float(np.exp(rng.uniform(-np.log(2), np.log(2))))
            w = int(np.clip(round(side * np.sqrt(aspect)), 6, S - 2))
            h = int(np.clip(round(side / np.sqrt(aspect)), 6, S - 2))
            x0 = int(rng.integers(0, S - w + 1))
            y0 = int(rng.integers(0, S - h + 1))
            box = [x0, y0, w, h]
            if not overlaps_too_much(box, boxes):
                break
        else:
            continue
        kind = int(rng.integers(0, len(CATEGORIES)))
        local = bg[y0:y0 + h, x0:x0 + w].reshape(-1, 3).mean(0)
        _draw(draw, kind, (x0, y0, x0 + w - 1, y0 + h - 1), contrasting_colour(rng, local), rng)
        boxes.append(box)
        objects.append((kind, [float(v) for v in box]))
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + rng.normal(0, 4, arr.shape).round().astype(np.int16)  # sensor noise
    return np.clip(arr, 0, 255).astype(np.uint8), objects
