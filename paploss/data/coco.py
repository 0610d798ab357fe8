"""Read and validate a COCO detection annotation file.

A COCO file is a JSON object with ``images`` (``id``, ``file_name``, ``width``,
``height``), ``annotations`` (``id``, ``image_id``, ``category_id``,
``bbox = [x, y, w, h]`` in pixels, optional ``iscrowd``, ``area``) and
``categories`` (``id``, ``name``).  :func:`load_coco` checks all of that before any
training starts, so a bad dataset fails in a second with a message naming the file
and the annotation (or image) id, not an hour later inside a training loop.

Rules for bad input:

- not JSON, truncated, or not a COCO object -> :class:`CocoFormatError` naming the file;
- an annotation whose ``image_id`` or ``category_id`` is unknown, or whose ``bbox``
  is not four finite numbers, or lies outside its image (more than ``tolerance``
  pixels) -> :class:`CocoFormatError` naming the file and the annotation id;
- a missing image file (when ``images_dir`` is given) -> :class:`CocoFormatError`
  naming the annotation file, the image id and the missing path;
- a degenerate box (``w <= 0`` or ``h <= 0``) is dropped with one warning that gives
  the count and the first few annotation ids; boxes that overshoot the image border
  by less than ``tolerance`` pixels are clipped to it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from paploss import storage
from paploss.errors import InputError

__all__ = ["CocoFormatError", "load_coco", "validate_coco", "category_index"]


class CocoFormatError(InputError):
    """A COCO annotation file is malformed; the message names the file and the entry
    (an :class:`~paploss.errors.InputError`, so a ``ValueError``: exit code 2)."""


def _read(ann_path: str | os.PathLike) -> Any:
    try:
        text = storage.read_text(ann_path)
    except UnicodeDecodeError:
        raise CocoFormatError(f"{ann_path}: not a text (JSON) file") from None
    if not text.strip():
        raise CocoFormatError(f"{ann_path}: empty file, expected a COCO annotation JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (the file looks truncated)" if exc.pos >= len(text.rstrip()) - 1 else ""
        raise CocoFormatError(
            f"{ann_path}: not valid JSON{hint}: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_coco(
    coco: Any,
    source: str = "<dict>",
    images_dir: str | os.PathLike | None = None,
    tolerance: float = 1.0,
) -> dict:
    """Validate a parsed COCO dict; returns a cleaned copy (degenerate boxes dropped,
    small overshoots clipped, ``area`` and ``iscrowd`` filled in).

    ``source`` names the file in error messages."""
    _check_layout(coco, source)
    categories = _clean_categories(coco["categories"], source)
    images = _clean_images(coco["images"], source, images_dir)
    annotations, dropped = _clean_annotations(coco["annotations"], source, images, categories, tolerance)
    if dropped:
        warnings.warn(
            f"{source}: dropped {len(dropped)} degenerate box(es) with non-positive width or height "
            f"(annotation ids {dropped[:10]}{' ...' if len(dropped) > 10 else ''})",
            stacklevel=3,
        )
    info = dict(coco["info"]) if isinstance(coco.get("info"), dict) else {}
    info["dropped_degenerate"] = len(dropped)
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _check_layout(coco: Any, source: str) -> None:
    """A COCO file is an object with the lists ``images``, ``annotations`` and ``categories``."""
    if not isinstance(coco, dict):
        raise CocoFormatError(f"{source}: not a COCO annotation file (top level is {type(coco).__name__}, expected an object)")
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        raise CocoFormatError(
            f"{source}: not a COCO annotation file: missing key(s) {missing} (has {sorted(coco)[:8]})"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco[key], list):
            raise CocoFormatError(f"{source}: '{key}' must be a list, got {type(coco[key]).__name__}")


def _clean_categories(raw: list, source: str) -> list[dict]:
    """The categories (at least one), each with a unique integer ``id``, a ``name`` and a
    ``supercategory`` ("" when absent)."""
    categories = []
    cat_ids: set[int] = set()
    for i, cat in enumerate(raw):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise CocoFormatError(f"{source}: category #{i} must have an integer 'id' and a 'name', got {cat!r}")
        if cat["id"] in cat_ids:
            raise CocoFormatError(f"{source}: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])
        categories.append({"id": cat["id"], "name": str(cat["name"]), "supercategory": cat.get("supercategory", "")})
    if not categories:
        raise CocoFormatError(f"{source}: no categories")
    return categories


def _clean_images(raw: list, source: str, images_dir: str | os.PathLike | None) -> list[dict]:
    """The images, each with a unique integer ``id``, a ``file_name`` (a file of
    ``images_dir`` when given) and a positive ``width`` and ``height``."""
    images = []
    ids: set[int] = set()
    for i, img in enumerate(raw):
        if not isinstance(img, dict):
            raise CocoFormatError(f"{source}: image #{i} is not an object: {img!r}")
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                raise CocoFormatError(f"{source}: image id {img.get('id', f'#{i}')} has no '{key}'")
        if not isinstance(img["id"], int):
            raise CocoFormatError(f"{source}: image #{i} has a non-integer id {img['id']!r}")
        if img["id"] in ids:
            raise CocoFormatError(f"{source}: duplicate image id {img['id']}")
        if not (_is_number(img["width"]) and _is_number(img["height"]) and img["width"] > 0 and img["height"] > 0):
            raise CocoFormatError(
                f"{source}: image id {img['id']} has invalid size width={img['width']!r} height={img['height']!r}"
            )
        if images_dir is not None:
            path = Path(images_dir) / img["file_name"]
            if not path.is_file():
                raise CocoFormatError(
                    f"{source}: image id {img['id']}: missing image file {path} (file_name {img['file_name']!r})"
                )
        images.append({"id": img["id"], "file_name": str(img["file_name"]), "width": int(img["width"]),
                       "height": int(img["height"])})
        ids.add(img["id"])
    return images


def _clean_annotations(
    raw: list, source: str, images: list[dict], categories: list[dict], tolerance: float
) -> tuple[list[dict], list[int]]:
    """The annotations with their boxes clipped to their image, and the ids of those
    dropped as degenerate (non-positive width or height, before or after clipping).

    Each needs a unique integer ``id``, a known ``image_id`` and ``category_id``, and a
    box ``[x, y, w, h]`` of 4 finite numbers inside its image up to ``tolerance`` pixels."""
    by_id = {img["id"]: img for img in images}
    cat_ids = {cat["id"] for cat in categories}
    annotations = []
    ann_ids: set[int] = set()
    dropped: list = []
    for i, ann in enumerate(raw):
        aid = _annotation_id(ann, i, source, ann_ids)
        ann_ids.add(aid)
        img = by_id.get(ann.get("image_id"))
        if img is None:
            raise CocoFormatError(f"{source}: annotation id {aid}: unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in cat_ids:
            raise CocoFormatError(
                f"{source}: annotation id {aid}: unknown category_id {ann.get('category_id')!r} "
                f"(known: {sorted(cat_ids)})"
            )
        box = _clipped_box(ann.get("bbox"), aid, img, source, tolerance)
        if box is None:
            dropped.append(aid)
            continue
        x0, y0, x1, y1 = box
        annotations.append({
            "id": aid,
            "image_id": img["id"],
            "category_id": ann["category_id"],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": float(ann["area"]) if _is_number(ann.get("area")) else (x1 - x0) * (y1 - y0),
            "iscrowd": int(ann.get("iscrowd", 0) or 0),
        })
    return annotations, dropped


def _annotation_id(ann: Any, i: int, source: str, seen: set[int]) -> int:
    """The integer ``id`` of annotation #``i``, which must be an object and the id unseen."""
    if not isinstance(ann, dict):
        raise CocoFormatError(f"{source}: annotation #{i} is not an object: {ann!r}")
    aid = ann.get("id")
    if not isinstance(aid, int):
        raise CocoFormatError(f"{source}: annotation #{i} has no integer 'id' (got {aid!r})")
    if aid in seen:
        raise CocoFormatError(f"{source}: duplicate annotation id {aid}")
    return aid


def _clipped_box(bbox: Any, aid: int, img: dict, source: str, tolerance: float) -> tuple[float, ...] | None:
    """Box ``[x, y, w, h]`` of annotation ``aid`` as corners ``(x0, y0, x1, y1)`` clipped
    to its image; None when degenerate. A box outside the image by more than
    ``tolerance`` pixels is an error."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise CocoFormatError(f"{source}: annotation id {aid}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None
    W, H = img["width"], img["height"]
    if x < -tolerance or y < -tolerance or x + w > W + tolerance or y + h > H + tolerance:
        raise CocoFormatError(
            f"{source}: annotation id {aid}: bbox {list(bbox)} lies outside its image id {img['id']} "
            f"({W}x{H}, file {img['file_name']})"
        )
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(W)), min(y + h, float(H))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return x0, y0, x1, y1


def load_coco(
    ann_path: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    tolerance: float = 1.0,
) -> dict:
    """Read and validate a COCO annotation file (local or ``s3://``).

    Returns a clean dict with ``images``, ``annotations``, ``categories`` and
    ``info["dropped_degenerate"]`` (the number of boxes dropped).  With
    ``images_dir`` every image file is checked to exist.  Raises
    :class:`CocoFormatError` (a ``ValueError``) naming the file and the entry."""
    return validate_coco(_read(ann_path), source=str(ann_path), images_dir=images_dir, tolerance=tolerance)


def category_index(coco: dict) -> tuple[list[int], dict[int, int]]:
    """Sorted category ids and the map ``category id -> contiguous label 0..K-1``."""
    ids = sorted(c["id"] for c in coco["categories"])
    return ids, {cid: k for k, cid in enumerate(ids)}
