"""COCO AP: pycocotools through ``coco_ap`` against a slow, obviously-correct twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paploss.evaluate import coco_ap, detections_to_coco

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def slow_ap(gt: dict, dets: list[dict], iou_t: float) -> float:
    """AP at one IoU threshold as COCO defines it, written out plainly (no crowds,
    all areas, 100 detections per image): per category, detections sorted by score
    are matched greedily to the unmatched ground truth of their image with the highest
    IoU >= iou_t; precision is made monotone from the right and read at 101 recall
    points; the mean over categories with ground truth."""
    aps = []
    for cat in sorted({c["id"] for c in gt["categories"]}):
        gts = [a for a in gt["annotations"] if a["category_id"] == cat]
        if not gts:
            continue
        per_image = {}
        for d in dets:
            if d["category_id"] == cat:
                per_image.setdefault(d["image_id"], []).append(d)
        scored = []  # (score, is_tp)
        for image_id, ds in per_image.items():
            ds = sorted(ds, key=lambda d: -d["score"])[:100]
            g = [a for a in gts if a["image_id"] == image_id]
            used = [False] * len(g)
            for d in ds:
                best, best_iou = -1, min(iou_t, 1 - 1e-10)
                for k, a in enumerate(g):
                    if used[k]:
                        continue
                    iou = _iou(d["bbox"], a["bbox"])
                    if iou >= best_iou:
                        best, best_iou = k, iou
                if best >= 0:
                    used[best] = True
                scored.append((d["score"], best >= 0))
        scored.sort(key=lambda x: -x[0])
        tp = np.cumsum([s[1] for s in scored]) if scored else np.zeros(0)
        fp = np.cumsum([not s[1] for s in scored]) if scored else np.zeros(0)
        recall = tp / len(gts)
        precision = tp / np.maximum(tp + fp, np.spacing(1))
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        q = np.zeros(len(RECALL_POINTS))
        idx = np.searchsorted(recall, RECALL_POINTS, side="left")
        for r, i in enumerate(idx):
            if i < len(precision):
                q[r] = precision[i]
        aps.append(q.mean())
    return float(np.mean(aps))


def _random_case(rng: np.random.Generator, n_images: int, n_cats: int, n_gt: int, n_det: int):
    images = [{"id": i + 1, "file_name": f"{i}.png", "width": 100, "height": 100} for i in range(n_images)]
    anns, dets = [], []
    for k in range(n_gt):
        w, h = rng.uniform(10, 60, 2)
        x, y = rng.uniform(0, 100 - w), rng.uniform(0, 100 - h)
        anns.append({"id": k + 1, "image_id": int(rng.integers(1, n_images + 1)), "category_id": int(rng.integers(1, n_cats + 1)),
                     "bbox": [x, y, w, h], "area": 50.0 * 50.0, "iscrowd": 0})
    for _ in range(n_det):
        if anns and rng.random() < 0.6:  # near a ground-truth box
            a = anns[int(rng.integers(len(anns)))]
            x, y, w, h = (v + rng.normal(0, 4) for v in a["bbox"])
            box = [x, y, max(w, 1.0), max(h, 1.0)]
            image_id, cat = a["image_id"], a["category_id"] if rng.random() < 0.8 else int(rng.integers(1, n_cats + 1))
        else:
            w, h = rng.uniform(5, 50, 2)
            box = [rng.uniform(0, 100 - w), rng.uniform(0, 100 - h), w, h]
            image_id, cat = int(rng.integers(1, n_images + 1)), int(rng.integers(1, n_cats + 1))
        dets.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": float(rng.random())})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(1, n_cats + 1)]}
    return gt, dets


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n_images=st.integers(1, 4), n_cats=st.integers(1, 3),
       n_gt=st.integers(1, 12), n_det=st.integers(1, 30))
def test_coco_ap_matches_slow_twin(seed, n_images, n_cats, n_gt, n_det):
    gt, dets = _random_case(np.random.default_rng(seed), n_images, n_cats, n_gt, n_det)
    cats_with_gt = {a["category_id"] for a in gt["annotations"]}
    gt["categories"] = [c for c in gt["categories"] if c["id"] in cats_with_gt]
    dets = [d for d in dets if d["category_id"] in cats_with_gt]
    if not dets:
        return
    m = coco_ap(gt, dets)
    per_t = [slow_ap(gt, dets, t) for t in IOU_THRESHOLDS]
    assert m["AP"] == pytest.approx(np.mean(per_t), abs=1e-9)
    assert m["AP50"] == pytest.approx(per_t[0], abs=1e-9)
    assert m["AP75"] == pytest.approx(per_t[5], abs=1e-9)
    assert m["APs"] == -1 and m["APl"] == -1


def test_perfect_and_empty_detections():
    gt, _ = _random_case(np.random.default_rng(0), 3, 2, 8, 0)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    assert coco_ap(gt, perfect)["AP"] == pytest.approx(1.0)
    assert coco_ap(gt, [])["AP"] == 0.0
    with pytest.raises(ValueError, match="unknown category_id 42"):
        coco_ap(gt, [dict(perfect[0], category_id=42)])
    with pytest.raises(ValueError, match="unknown image_id 99"):
        coco_ap(gt, [dict(perfect[0], image_id=99)])


def test_detections_to_coco_converts_boxes_and_labels():
    out = detections_to_coco(
        [{"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}],
        [7], cat_ids=[3, 9])
    assert out == [{"image_id": 7, "category_id": 9, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
