"""Targets and qualities of the Parameterized AP Loss on the two heads of Faster R-CNN (SPEC §1).

**RPN** (one objectness logit per anchor). For a batch of ``N`` images with ``A_n``
anchors each, torchvision's RPN matcher (IoU 0.7 / 0.3, every gt keeps its best
anchor) labels each anchor 1 (positive), 0 (negative) or -1 (between the
thresholds). Over the ``A = sum_n A_n`` anchors of the batch, in torchvision's order
(image, level, y, x, anchor)::

    t[a] = label[a]                          in {1, 0, -1}: every anchor, no sampling
    u[a] = q(pred_deltas[a], target_deltas[a])   where t[a] = 1, else 0

**RoI box head** (``K + 1`` logits per proposal, column 0 the background, and
class-specific box deltas ``[R, (K + 1) * 4]``). Every proposal of the batch (the
RPN's proposals plus the gt boxes, as torchvision adds them) is labelled by the RoI
matcher: ``label[r]`` in 1..K (its gt's class), 0 (background) or -1 (ignored).
Every proposal × foreground class is an entry::

    t[r, k - 1] = 1 if label[r] == k, 0 for the other classes and for background, -1 if label[r] == -1
    u[r, k - 1] = q(box_regression[r, k], target_deltas[r])   where t[r, k - 1] = 1, else 0

for ``k = 1..K``: the quality of the box of the proposal's own class.

**Quality** ``q`` of predicted deltas against the target deltas of the same anchor or
proposal (both encoded by the head's ``BoxCoder``), ``[P, 4] -> [P]``:
``giou`` (GIoU + 1) / 2 (default), ``iou``, ``l1`` clamp(1 - mean |pred - target|, 0, 1).
For ``giou`` and ``iou`` both are decoded on one unit box: an anchor's (or proposal's)
shift and axis-wise scaling map the decoded boxes to those on the real anchor and
change neither IoU nor GIoU (every area scales by the same factor). So ``u`` is the
quality of the decoded proposal (RPN) or decoded class box (RoI) against its matched
gt box, without the anchors at hand. ``u`` is differentiable in the predicted deltas.

:class:`KeepAll` is the sampler that keeps every labelled entry (MMDetection's
``PseudoSampler``): with it torchvision's ``RoIHeads.select_training_samples`` returns
all proposals instead of 512 per image at 25 % positives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from paploss.models.targets import box_quality

__all__ = ["KeepAll", "delta_quality", "rpn_targets", "roi_targets"]


def delta_quality(pred_deltas: Tensor, target_deltas: Tensor, box_coder, kind: str = "giou") -> Tensor:
    """Quality in [0, 1] of ``pred_deltas [P, 4]`` against ``target_deltas [P, 4]``
    (encoded by ``box_coder``, a torchvision ``BoxCoder``); returns ``[P]``. See the module doc."""
    if kind == "l1":
        return box_quality(pred_deltas, target_deltas, "l1", pred_deltas, target_deltas)
    unit = pred_deltas.new_tensor([[-0.5, -0.5, 0.5, 0.5]]).expand(pred_deltas.shape[0], 4)
    pred = box_coder.decode_single(pred_deltas, unit)
    target = box_coder.decode_single(target_deltas.to(pred_deltas.dtype), unit)
    return box_quality(pred, target, kind)


def rpn_targets(pred_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor], box_coder,
                quality: str = "giou") -> tuple[Tensor, Tensor]:
    """``(t, u)``, both ``[A]`` over all anchors of the batch (see the module doc).

    ``pred_deltas [A, 4]`` (torchvision's ``concat_box_prediction_layers`` order);
    ``labels[n] [A_n]`` float in {1, 0, -1}; ``regression_targets[n] [A_n, 4]``."""
    t = torch.cat(labels).to(pred_deltas.dtype)
    if t.shape[0] != pred_deltas.shape[0]:
        raise ValueError(f"labels hold {t.shape[0]} anchors, pred_deltas {pred_deltas.shape[0]}")
    pos = torch.where(t == 1)[0]
    values = delta_quality(pred_deltas[pos], torch.cat(regression_targets)[pos], box_coder, quality)
    u = torch.zeros(t.shape, dtype=values.dtype, device=t.device)
    return t, u.index_put((pos,), values)


def roi_targets(box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor], box_coder,
                quality: str = "giou") -> tuple[Tensor, Tensor]:
    """``(t, u)``, both ``[R, K]`` over all proposals × foreground classes (see the module doc).

    ``box_regression [R, (K + 1) * 4]``; ``labels[n] [R_n]`` int64 in {-1, 0, 1..K};
    ``regression_targets[n] [R_n, 4]``."""
    lab = torch.cat(labels)
    R = lab.shape[0]
    if box_regression.shape[0] != R or box_regression.shape[1] % 4:
        raise ValueError(f"box_regression must be [{R}, (K + 1) * 4], got {tuple(box_regression.shape)}")
    K = box_regression.shape[1] // 4 - 1
    t = torch.zeros((R, K), dtype=box_regression.dtype, device=box_regression.device)
    t[lab == -1] = -1.0
    pos = torch.where(lab > 0)[0]
    cls = lab[pos]
    t[pos, cls - 1] = 1.0
    pred = box_regression.reshape(R, K + 1, 4)[pos, cls]
    values = delta_quality(pred, torch.cat(regression_targets)[pos], box_coder, quality)
    u = torch.zeros((R, K), dtype=values.dtype, device=box_regression.device)
    return t, u.index_put((pos, cls - 1), values)


class KeepAll:
    """A sampler with the interface of torchvision's ``BalancedPositiveNegativeSampler``
    that keeps every positive (label >= 1) and every negative (label 0): no sampling."""

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return [lab >= 1 for lab in labels], [lab == 0 for lab in labels]
