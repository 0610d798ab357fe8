"""The search split of SPEC §4: search-train / search-val cut out of a training set.

The proxy trials of the search train on ``search_train`` and take their reward on
``search_val``; the real validation set is never touched by the search.  The split
is by image (no image in both), seeded and deterministic, and stratified so that
every class occurs in both parts with about ``val_fraction`` of its boxes' images in
``search_val`` (iterative stratification, Sechidis et al. 2011, then a repair pass
that guarantees every class is on both sides).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from paploss import storage
from paploss.data.coco import load_coco

__all__ = ["search_split", "split_image_ids"]


def split_image_ids(coco: dict, val_fraction: float = 0.2, seed: int = 0, source: str = "<dict>") -> tuple[list[int], list[int]]:
    """Split the image ids of a validated COCO dict; returns sorted (train_ids, val_ids)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    image_ids = sorted(img["id"] for img in coco["images"])
    if len(image_ids) < 2:
        raise ValueError(f"{source}: cannot split {len(image_ids)} image(s) into two non-empty parts")
    labels: dict[int, set[int]] = defaultdict(set)
    for ann in coco["annotations"]:
        labels[ann["image_id"]].add(ann["category_id"])
    images_per_class = Counter(c for s in labels.values() for c in s)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    lonely = sorted(c for c, n in images_per_class.items() if n < 2)
    if lonely:
        raise ValueError(
            f"{source}: class(es) {[names[c] for c in lonely]} (ids {lonely}) occur in fewer than 2 images, "
            "so they cannot be on both sides of the split"
        )
    rng = np.random.default_rng(seed)
    order = [image_ids[i] for i in rng.permutation(len(image_ids))]
    n_val = int(np.clip(round(val_fraction * len(image_ids)), 1, len(image_ids) - 1))
    want_val = {c: val_fraction * n for c, n in images_per_class.items()}
    want_total = {"val": float(n_val), "train": float(len(image_ids) - n_val)}
    # rarest label first; images without labels last
    rank = {img: min((images_per_class[c] for c in labels[img]), default=len(image_ids) + 1) for img in order}
    order.sort(key=lambda img: rank[img])  # stable: ties keep the seeded order
    side: dict[int, str] = {}
    val_count: Counter = Counter()
    train_count: Counter = Counter()
    for img in order:
        if labels[img]:
            rarest = min(labels[img], key=lambda c: (images_per_class[c], c))
            need_val = want_val[rarest] - val_count[rarest]
            need_train = (images_per_class[rarest] - want_val[rarest]) - train_count[rarest]
            choice = "val" if (need_val, want_total["val"]) > (need_train, want_total["train"]) else "train"
        else:
            choice = "val" if want_total["val"] > want_total["train"] else "train"
        if want_total[choice] < 0.5:  # that side is full
            choice = "train" if choice == "val" else "val"
        side[img] = choice
        want_total[choice] -= 1
        (val_count if choice == "val" else train_count).update(labels[img])
    # repair: every class on both sides
    for c in sorted(images_per_class):
        for missing in ("val", "train"):
            holders = [i for i in order if c in labels[i]]
            if any(side[i] == missing for i in holders):
                continue
            other = "train" if missing == "val" else "val"
            # move the holder whose other classes stay covered on its side
            for cand in holders:
                if all(sum(1 for j in order if side[j] == other and k in labels[j]) > 1 for k in labels[cand]):
                    side[cand] = missing
                    break
            else:
                raise ValueError(f"{source}: cannot place class {names[c]!r} (id {c}) on both sides of the split")
    train_ids = sorted(i for i, s in side.items() if s == "train")
    val_ids = sorted(i for i, s in side.items() if s == "val")
    return train_ids, val_ids


def _subset(coco: dict, ids: list[int], info: dict) -> dict:
    keep = set(ids)
    return {
        "info": {**coco.get("info", {}), **info},
        "images": [img for img in coco["images"] if img["id"] in keep],
        "annotations": [a for a in coco["annotations"] if a["image_id"] in keep],
        "categories": coco["categories"],
    }


def search_split(
    root: str | os.PathLike,
    *,
    source: str = "train",
    val_fraction: float = 0.2,
    seed: int = 0,
    suffix: str = "",
) -> tuple[Path | str, Path | str]:
    """Write ``annotations/search_train<suffix>.json`` and ``annotations/search_val<suffix>.json``
    under ``root`` (a local folder or ``s3://`` prefix) from ``annotations/<source>.json``,
    the second last (its presence marks the pair written).

    Returns the two written paths (``Path`` locally, URI strings on S3)."""
    src = storage.join(root, "annotations", f"{source}.json")
    coco = load_coco(src)
    train_ids, val_ids = split_image_ids(coco, val_fraction=val_fraction, seed=seed, source=src)
    info = {"split_of": source, "val_fraction": val_fraction, "split_seed": seed}
    out = []
    for name, ids in ((f"search_train{suffix}", train_ids), (f"search_val{suffix}", val_ids)):
        dst = storage.join(root, "annotations", f"{name}.json")
        storage.write_json(dst, _subset(coco, ids, {**info, "split": name}), indent=None)
        out.append(dst if storage.is_s3(root) else Path(dst))
    return out[0], out[1]
