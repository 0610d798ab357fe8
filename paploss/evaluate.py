"""COCO box AP through pycocotools.

``coco_ap(gt, detections)`` is the standard COCO evaluation (``COCOeval``, iouType
``bbox``): AP averaged over IoU thresholds 0.50:0.05:0.95 and over categories, with
101-point interpolated precision, at most 100 detections per image; plus AP at IoU
0.5 and 0.75 and AP for small (< 32²), medium and large (> 96²) boxes.  Areas come
from the ground-truth ``area`` field as in COCO.  A value of -1 means "no ground
truth in that bucket" (pycocotools' convention, kept as is).

``evaluate_model`` runs a torchvision detector over a :class:`~paploss.data.dataset.CocoDetection`
and scores it; detections map contiguous labels back to the file's category ids.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["METRICS", "coco_ap", "detections_to_coco", "evaluate_model", "model_detections"]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ap(gt: dict, detections: list[dict], max_dets: int = 100) -> dict[str, float]:
    """COCO bbox metrics of ``detections`` (``image_id``, ``category_id``,
    ``bbox = [x, y, w, h]``, ``score``) against the ground truth ``gt`` (a COCO dict).

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` as fractions in [0, 1]
    (-1 where pycocotools gives -1).  No detections at all gives 0 for every bucket
    that has ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = copy.deepcopy(gt)
    for a in gt["annotations"]:
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
        a.setdefault("iscrowd", 0)
    gt.setdefault("info", {})
    image_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for d in detections:
        if d["image_id"] not in image_ids:
            raise ValueError(f"detection for unknown image_id {d['image_id']!r}")
        if d["category_id"] not in cat_ids:
            raise ValueError(f"detection with unknown category_id {d['category_id']!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not detections:
            stats = np.array([0.0 if _has_gt(gt, rng) else -1.0 for rng in ("all", "all", "all", "small", "medium", "large")])
            return dict(zip(METRICS, (float(s) for s in stats)))
        coco_dt = coco_gt.loadRes([dict(d, bbox=[float(v) for v in d["bbox"]], score=float(d["score"])) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(METRICS, (float(s) for s in ev.stats[:6])))


def _has_gt(gt: dict, area_range: str) -> bool:
    lo, hi = {"all": (0, 1e10), "small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e10)}[area_range]
    return any(lo <= a["area"] <= hi and not a["iscrowd"] for a in gt["annotations"])


def detections_to_coco(outputs: Iterable[dict], image_ids: Iterable[int], cat_ids: list[int]) -> list[dict]:
    """torchvision detector outputs (``boxes float[n, 4]`` x0y0x1y1, ``scores float[n]``,
    ``labels int64[n]`` contiguous) -> COCO result dicts with ``bbox = [x, y, w, h]``."""
    out = []
    for o, image_id in zip(outputs, image_ids):
        boxes = o["boxes"].detach().cpu().double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for b, s, lab in zip(xywh, o["scores"].tolist(), o["labels"].tolist()):
            out.append({"image_id": int(image_id), "category_id": int(cat_ids[lab]), "bbox": b, "score": float(s)})
    return out


def evaluate_model(model: torch.nn.Module, dataset, *, batch_size: int = 8, device: str | torch.device = "cpu",
                   progress: bool = False, max_dets: int = 100) -> dict[str, float]:
    """COCO AP of ``model`` (a torchvision detector, put in eval mode here and
    restored after) on ``dataset`` (a ``CocoDetection``)."""
    dets = model_detections(model, dataset, batch_size=batch_size, device=device, progress=progress)
    return coco_ap(dataset.coco, dets, max_dets=max_dets)


@torch.no_grad()
def model_detections(model: torch.nn.Module, dataset, *, batch_size: int = 8, device: str | torch.device = "cpu",
                     progress: bool = False) -> list[dict]:
    """``model``'s detections on every image of ``dataset``, as COCO result dicts
    (what :func:`evaluate_model` scores)."""
    was_training = model.training
    model.eval()
    dets: list[dict] = []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="evaluate", disable=not progress, leave=False):
            idx = list(range(start, min(start + batch_size, len(dataset))))
            images = [dataset.get(i)[0].to(device) for i in idx]
            outputs = model(images)
            dets += detections_to_coco(outputs, [dataset.images[i]["id"] for i in idx], dataset.cat_ids)
    finally:
        model.train(was_training)
    return dets
