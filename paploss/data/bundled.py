"""Write a bundled dataset (``shapes`` or ``digits``) to disk in COCO layout.

Layout::

    out/images/train_000000.png ...  val_000000.png ...
    out/annotations/train.json       (COCO)
    out/annotations/val.json         (COCO)

The dataset is generated into a hidden sibling folder and renamed into place
(:func:`paploss.storage.atomic_dir`), so a crash never leaves a half-written dataset
under ``out``; calling again with the same arguments finds it complete and returns at
once.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from paploss import storage

__all__ = ["BUNDLED", "BundledSpec", "make_dataset"]


@dataclass(frozen=True)
class BundledSpec:
    """Default sizes of a bundled dataset (chosen so the quick search runs in minutes on 2 CPU cores)."""

    n_train: int
    n_val: int
    image_size: int


BUNDLED: dict[str, BundledSpec] = {
    "shapes": BundledSpec(n_train=1000, n_val=250, image_size=128),
    "digits": BundledSpec(n_train=1000, n_val=250, image_size=128),
}

_SPLIT_SALT = {"train": 0, "val": 1}


def _generator(name: str):
    if name == "shapes":
        from paploss.data.shapes import CATEGORIES, render_shapes

        return CATEGORIES, lambda rng, size, split: render_shapes(rng, size)
    from paploss.data.digits import CATEGORIES, render_digits

    return CATEGORIES, lambda rng, size, split: render_digits(rng, size, split=split)


def make_dataset(
    name: str,
    out: str | os.PathLike,
    *,
    n_train: int | None = None,
    n_val: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Generate the bundled dataset ``name`` into the local folder ``out``; returns ``out``.

    Image ``i`` of split ``s`` depends only on ``(seed, s, i, image_size)``.  If ``out``
    already holds this exact dataset it is returned untouched; if it holds anything
    else a ``FileExistsError`` says so."""
    if name not in BUNDLED:
        raise ValueError(f"unknown dataset name {name!r}; known: {sorted(BUNDLED)}")
    if storage.is_s3(out):
        raise ValueError(f"out must be a local folder, got {out!r}: generate locally, then upload with paploss.storage.upload_dir")
    spec = BUNDLED[name]
    n_train = spec.n_train if n_train is None else int(n_train)
    n_val = spec.n_val if n_val is None else int(n_val)
    image_size = spec.image_size if image_size is None else int(image_size)
    for arg, value, low in (("n_train", n_train, 1), ("n_val", n_val, 1), ("image_size", image_size, 32)):
        if value < low:
            raise ValueError(f"{arg} must be >= {low}, got {value}")
    info = {"dataset": name, "seed": int(seed), "n_train": n_train, "n_val": n_val, "image_size": image_size,
            "generator": "paploss.data v1"}
    out = Path(out)
    marker = out / "annotations" / "val.json"
    if marker.exists():
        existing = storage.read_json(marker).get("info", {})
        if {k: existing.get(k) for k in info} == info:
            return out
        raise FileExistsError(f"{out} already holds a different dataset ({existing}); choose another --out")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")

    categories, render = _generator(name)
    cats = [{"id": k + 1, "name": c, "supercategory": name} for k, c in enumerate(categories)]
    # an empty ``out`` (checked above) is replaced; one filled meanwhile raises FileExistsError
    with storage.atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        ann_id = 1
        for split, n in (("train", n_train), ("val", n_val)):
            images, anns = [], []
            for i in tqdm(range(n), desc=f"{name} {split}", disable=not progress, leave=False):
                rng = np.random.default_rng([int(seed), _SPLIT_SALT[split], i, image_size])
                pixels, objects = render(rng, image_size, split)
                file_name = f"{split}_{i:06d}.png"
                Image.fromarray(pixels).save(tmp / "images" / file_name)
                images.append({"id": i + 1, "file_name": file_name, "width": image_size, "height": image_size})
                for label, (x, y, w, h) in objects:
                    anns.append({"id": ann_id, "image_id": i + 1, "category_id": label + 1, "bbox": [x, y, w, h],
                                 "area": w * h, "iscrowd": 0})
                    ann_id += 1
            storage.write_json(tmp / "annotations" / f"{split}.json",
                               {"info": {**info, "split": split}, "images": images, "annotations": anns,
                                "categories": cats}, indent=None)
    return out


def describe() -> dict:
    """The bundled datasets and their default sizes (for ``--help`` and docs)."""
    return {k: asdict(v) for k, v in BUNDLED.items()}
