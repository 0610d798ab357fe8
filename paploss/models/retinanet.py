"""torchvision RetinaNet with the loss chosen by name.

- ``focal+l1``: torchvision's own losses (sigmoid focal loss, alpha 0.25, gamma 2;
  L1 on the box deltas), each normalised by the number of positive anchors per image.
- ``focal+giou``: the same focal loss and GIoU loss on the decoded boxes.
- ``paploss``: the Parameterized AP Loss of a :class:`~paploss.spec.LossSpec` as the
  *only* loss: classification scores and box outputs are trained through it, the
  box branch by the qualities ``u`` (SPEC §1) and with its gradient multiplied by
  the spec's ``grad_scale`` (``scale_grad``, SPEC §2).  The ranking runs over every
  (anchor, class) entry of the whole batch at once: under DDP of the global batch
  (every process's entries, gathered with autograd: :mod:`paploss.distributed`); in
  float32 outside autocast.

The head is torchvision's ``RetinaNetHead`` (4 conv layers per branch, optionally
with GroupNorm) with ``compute_loss`` replaced; the rest of ``RetinaNet`` (anchor
matching at IoU 0.5 / 0.4, post-processing, NMS) is unchanged.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

from paploss.models.backbones import build_backbone
from paploss.models.targets import dense_targets

__all__ = ["LOSSES", "LossHead", "build_retinanet", "anchor_generator", "check_loss"]

LOSSES = ("focal+l1", "focal+giou", "paploss")


def check_loss(loss: str, spec) -> None:
    """Raise a ``ValueError`` naming the known losses for an unknown ``loss``."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {list(LOSSES)}")
    if loss == "paploss" and spec is None:
        raise ValueError("loss 'paploss' needs a LossSpec (spec=...), e.g. LossSpec.handcrafted('square')")


class LossHead(RetinaNetHead):
    """``RetinaNetHead`` whose ``compute_loss`` is the chosen loss.

    Returns a dict of scalar losses: ``{"classification", "bbox_regression"}`` for the
    baselines, ``{"paploss"}`` for the PAP loss. With the PAP loss, ``box_quality`` then
    holds the batch's mean u over its positive entries (a detached 0-d tensor)."""

    box_quality = None

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *, loss: str = "focal+l1",
                 spec=None, quality: str = "giou", top_k: int | None = 100_000, norm_layer=None,
                 detach_i3: bool = False):
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        check_loss(loss, spec)
        self.loss = loss
        self.spec = spec
        self.quality = quality
        self.top_k = top_k
        self.detach_i3 = detach_i3  # paploss.loss.pap_loss's option: no gradient into u through I3
        if loss == "focal+giou":
            self.regression_head._loss_type = "giou"

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        if self.loss != "paploss":
            return super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        from paploss.distributed import gather_ranked_entries
        from paploss.loss import pap_loss, scale_grad

        # float32 outside autocast: the qualities (GIoU of decoded boxes) and the loss's
        # sums are too coarse in bfloat16; a no-op for a float32 model without autocast
        with torch.autocast(device_type=head_outputs["cls_logits"].device.type, enabled=False):
            cls_logits = head_outputs["cls_logits"].float()  # [N, A, K]
            bbox_regression = scale_grad(head_outputs["bbox_regression"].float(), self.spec.grad_scale)  # [N, A, 4]
            t, u = dense_targets(cls_logits, bbox_regression, anchors, matched_idxs, targets,
                                 self.regression_head.box_coder, self.quality)
            # under DDP: the entries of every process's images (SPEC §1: one ranking over the whole batch)
            s, t, u = gather_ranked_entries(cls_logits, t, u, self.top_k)
            loss = pap_loss(s, t, u, self.spec, top_k=self.top_k, detach_i3=self.detach_i3)
        # the positives' mean box quality u (NaN without positives), read by the engine's box-collapse stop
        self.box_quality = u.detach()[t == 1].mean()
        return {"paploss": loss}


def anchor_generator(anchor_size: float, levels: int = 5) -> AnchorGenerator:
    """RetinaNet anchors: on level l (stride 8 * 2^l) sizes anchor_size * 2^l * {2^0, 2^(1/3), 2^(2/3)},
    aspect ratios {0.5, 1, 2}: 9 anchors per location."""
    sizes = tuple(tuple(anchor_size * 2**lvl * 2 ** (k / 3) for k in range(3)) for lvl in range(levels))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)


def build_retinanet(
    num_classes: int,
    *,
    backbone: str = "mobilenet_v3_large",
    loss: str = "focal+l1",
    spec=None,
    image_size: int = 128,
    fpn_channels: int = 256,
    width_mult: float = 1.0,
    head_norm: bool = False,
    anchor_size: float = 32.0,
    quality: str = "giou",
    top_k: int | None = 100_000,
    backbone_weights: str | None = None,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
    detach_i3: bool = False,
) -> RetinaNet:
    """A RetinaNet for ``num_classes`` classes (labels 0..K-1) on square images of
    side ``image_size`` (resized so; ``min_size = max_size = image_size``)."""
    body = build_backbone(backbone, fpn_channels=fpn_channels, width_mult=width_mult, weights=backbone_weights)
    anchors = anchor_generator(anchor_size)
    norm = None
    if head_norm:
        groups = 32 if fpn_channels % 32 == 0 else 8
        norm = partial(nn.GroupNorm, groups)
    head = LossHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes, loss=loss, spec=spec,
                    quality=quality, top_k=top_k, norm_layer=norm, detach_i3=detach_i3)
    return RetinaNet(body, num_classes, min_size=image_size, max_size=image_size, anchor_generator=anchors, head=head,
                     score_thresh=score_thresh, detections_per_img=detections_per_img)
