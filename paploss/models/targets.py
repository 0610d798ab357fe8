"""Dense targets and localisation qualities for the Parameterized AP Loss (SPEC §1).

For a batch of ``N`` images, ``A`` anchors (or locations) per image and ``K``
classes, the detector gives ``cls_logits [N, A, K]`` and box outputs
``bbox_regression [N, A, 4]``.  The assigner gives, per image, ``matched_idxs [A]``:
the index of the matched ground-truth box (>= 0, a positive anchor), -1 (negative)
or -2 (ignored, between the IoU thresholds).  From these:

    t[n, a, k] =  1   if a is positive and k is the class of its box
                  0   for the other classes of a positive anchor and all of a negative one
                 -1   for every class of an ignored anchor
    u[n, a, k] = q(decode(bbox_regression[n, a]), box of a)   on the positive entries, else 0

with ``q`` the quality: ``giou``: (GIoU + 1) / 2 (default), ``iou``: IoU, ``l1``:
clamp(1 - mean |decoded deltas - target deltas|, 0, 1).  ``u`` is differentiable in
``bbox_regression``: that is how the box branch learns under the PAP loss.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou_loss

__all__ = ["QUALITIES", "dense_targets", "box_quality"]

QUALITIES = ("giou", "iou", "l1")


def box_quality(pred: Tensor, target: Tensor, kind: str = "giou", pred_deltas: Tensor | None = None,
                target_deltas: Tensor | None = None) -> Tensor:
    """Quality in [0, 1] of predicted boxes ``pred [P, 4]`` against ``target [P, 4]``
    (x0, y0, x1, y1); returns ``[P]``."""
    if kind == "giou":
        return 1.0 - generalized_box_iou_loss(pred, target, reduction="none") / 2.0
    if kind == "iou":
        lt = torch.max(pred[:, :2], target[:, :2])
        rb = torch.min(pred[:, 2:], target[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        area = lambda b: (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # noqa: E731
        return inter / (area(pred) + area(target) - inter).clamp(min=1e-7)
    if kind == "l1":
        if pred_deltas is None or target_deltas is None:
            raise ValueError("quality 'l1' needs pred_deltas and target_deltas")
        return (1.0 - (pred_deltas - target_deltas).abs().mean(dim=1)).clamp(0.0, 1.0)
    raise ValueError(f"unknown quality {kind!r}; known: {list(QUALITIES)}")


def dense_targets(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: list[Tensor],
    matched_idxs: list[Tensor],
    targets: list[dict],
    box_coder,
    quality: str = "giou",
) -> tuple[Tensor, Tensor]:
    """``(t, u)``, both ``[N, A, K]`` like ``cls_logits``; see the module docstring.

    ``anchors[n] [A, 4]``, ``matched_idxs[n] [A]``, ``targets[n]["boxes"] [G, 4]``,
    ``targets[n]["labels"] [G]`` (0..K-1)."""
    N, A, K = cls_logits.shape
    t = torch.zeros((N, A, K), dtype=cls_logits.dtype, device=cls_logits.device)
    rows, cols, labels, qual = [], [], [], []
    for n, (m, anc, tgt) in enumerate(zip(matched_idxs, anchors, targets)):
        t[n, m == -2] = -1.0
        pos = torch.where(m >= 0)[0]
        if pos.numel() == 0:
            continue
        gt_boxes = tgt["boxes"][m[pos]]
        lab = tgt["labels"][m[pos]]
        t[n, pos, lab] = 1.0
        deltas = bbox_regression[n, pos]
        pred = box_coder.decode_single(deltas, anc[pos])
        target_deltas = box_coder.encode_single(gt_boxes, anc[pos]) if quality == "l1" else None
        rows.append(torch.full_like(pos, n))
        cols.append(pos)
        labels.append(lab)
        qual.append(box_quality(pred, gt_boxes.to(pred.dtype), quality, deltas, target_deltas))
    if not qual:
        return t, torch.zeros((N, A, K), dtype=torch.float32, device=cls_logits.device)
    values = torch.cat(qual)
    u = torch.zeros((N, A, K), dtype=values.dtype, device=cls_logits.device)
    return t, u.index_put((torch.cat(rows), torch.cat(cols), torch.cat(labels)), values)
