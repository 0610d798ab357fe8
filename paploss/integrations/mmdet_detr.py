"""The Parameterized AP Loss for Deformable DETR inside MMDetection 3.x (SPEC §1).

Importing this module registers :class:`PAPLossDeformableDETRHead` in MMDetection's
``MODELS`` registry. In a Deformable DETR config::

    custom_imports = dict(imports=["paploss.integrations.mmdet_detr"], allow_failed_imports=False)
    model = dict(bbox_head=dict(type="PAPLossDeformableDETRHead", spec="runs/search/loss_spec.json"))

``spec`` (config key ``model.bbox_head.spec``) takes everything
:func:`paploss.integrations.mmdet.resolve_spec` takes (a JSON path or ``s3://`` URI,
``models:/…``, inline control points or θ, a :class:`paploss.LossSpec`).

How a query detector becomes a ranking problem. Per decoder layer, MMDetection's
Hungarian matcher (``train_cfg.assigner``, unchanged) pairs each ground-truth box
with one query. Every (query, class) entry of the batch is then ranked, none is
ignored: target 1 at the matched ground truth's class of a matched query, 0 on every
other class of it and on every class of an unmatched query. A matched query's box
quality ``u`` against its ground truth is, by default, ``(GIoU + 1) / 2`` (SPEC §1's
default; ``quality="iou"`` gives IoU). GIoU is the default for a second reason here:
early in training most matched DETR boxes do not overlap their ground truth at all,
where IoU is 0 with no gradient and the box branch would learn only from the lucky
queries; GIoU still pulls them towards the target (and the matcher's own cost uses it).

This module imports MMDetection; nothing else in ``paploss`` imports it, except the
MMDetection training adapter (:mod:`paploss.integrations.mmdet_train`).
"""

from __future__ import annotations

import copy
from typing import Any

from paploss.integrations import mmdet as _mmdet  # supplies mmcv.ops (deformable attention included) first

import torch  # noqa: E402
from mmdet.models.dense_heads import DeformableDETRHead  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_overlaps  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from torch import Tensor  # noqa: E402

from paploss import pap_loss, scale_grad  # noqa: E402

__all__ = [
    "PAPLossDeformableDETRHead",
    "HEAD_TYPES",
    "detr_targets",
    "detr_box_quality",
    "switch_head",
]

QUALITIES = _mmdet.QUALITIES
HEAD_TYPES = ("DeformableDETRHead", "PAPLossDeformableDETRHead")  # heads :func:`switch_head` handles


def detr_targets(labels: Tensor, num_classes: int) -> Tensor:
    """Per-entry targets of SPEC §1 for matched queries.

    labels: [N] long, the matched ground truth's class of each query, ``num_classes``
    for an unmatched query. Returns [N, C] float: 1 at a matched query's class, 0
    everywhere else. No entry is ignored (no -1): the matcher leaves no query undecided.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be [N], got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}] ({num_classes} = unmatched), got {labels.tolist()}")
    targets = torch.zeros(labels.numel(), num_classes, dtype=torch.float32, device=labels.device)
    pos = labels < num_classes
    targets[pos.nonzero(as_tuple=True)[0], labels[pos]] = 1.0
    return targets


def detr_box_quality(pred: Tensor, target: Tensor, kind: str = "giou") -> Tensor:
    """Quality ``u`` in [0, 1] of each matched query's box (SPEC §1).

    pred, target: [P, 4] normalised (cx, cy, w, h), as DETR heads predict and
    MMDetection's DETR targets hold them. ``giou``: ``(GIoU + 1) / 2``; ``iou``: IoU
    (both unchanged by scaling x and y to pixels); ``l1``: ``clamp(1 - sum|b - b*|,
    0, 1)`` on the normalised (cx, cy, w, h). Returns [P]; differentiable in ``pred``.
    """
    if kind not in QUALITIES:
        raise ValueError(f"quality must be one of {QUALITIES}, got {kind!r}")
    if kind == "l1":
        return (1 - (pred - target).abs().sum(-1)).clamp(0, 1)
    p, t = bbox_cxcywh_to_xyxy(pred), bbox_cxcywh_to_xyxy(target)
    if kind == "giou":
        return ((bbox_overlaps(p, t, mode="giou", is_aligned=True) + 1) / 2).clamp(0, 1)
    return bbox_overlaps(p, t, mode="iou", is_aligned=True)


@MODELS.register_module()
class PAPLossDeformableDETRHead(DeformableDETRHead):
    """Deformable DETR head trained with the Parameterized AP Loss.

    Layers, matching (Hungarian, ``train_cfg.assigner``) and inference are
    DeformableDETRHead's; only the loss differs. For one decoder layer, B images,
    Q queries and C classes:

    * ``s`` [B·Q, C]: the logits of every (query, class) entry, one vector for the batch;
    * ``t`` [B·Q, C]: :func:`detr_targets` from the matcher's labels (no ignored entry);
    * ``u`` [B·Q, C]: :func:`detr_box_quality` of a matched query's box against its
      ground truth on its target entry, 0 elsewhere;
    * ``loss = pap_loss(s, t, u, spec, top_k)``; the boxes pass through
      ``scale_grad(·, spec.grad_scale)`` first, so the gradient reaching the box
      branch is multiplied by the searched scale (SPEC §2).

    Each decoder layer gets this loss with its own matching, as MMDetection gives
    each its classification and box losses: ``loss_pap`` for the last layer,
    ``d0.loss_pap``, ``d1.loss_pap``, … for the others, and ``enc_loss_pap`` for the
    encoder's proposals when ``as_two_stage`` (every ground truth relabelled class 0,
    as MMDetection does). MMDetection sums every ``*loss*`` key.

    ``loss_cls`` / ``loss_bbox`` / ``loss_iou`` of the config are accepted (a Deformable
    DETR config switches with one line) but not used in training; ``loss_cls`` must
    have ``use_sigmoid=True`` (one logit per class: the bias initialisation and the
    sigmoid scores at inference read it).

    Args (besides DeformableDETRHead's):
        spec: the loss (:func:`paploss.integrations.mmdet.resolve_spec`).
        top_k: rank against only the ``top_k`` highest-scoring entries (SPEC §1; None: all).
        quality: ``"giou"`` (default), ``"iou"`` or ``"l1"``.
        detach_i3: :func:`paploss.pap_loss`'s option (no gradient into u through I3).
    """

    def __init__(
        self,
        *args: Any,
        spec: Any = None,
        top_k: int | None = 100_000,
        quality: str = "giou",
        detach_i3: bool = False,
        **kwargs: Any,
    ) -> None:
        self.spec = _mmdet.resolve_spec(spec)
        if quality not in QUALITIES:
            raise ValueError(f"model.bbox_head.quality: must be one of {QUALITIES}, got {quality!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"model.bbox_head.top_k: must be a positive integer or None, got {top_k!r}")
        if not isinstance(detach_i3, bool):
            raise ValueError(f"model.bbox_head.detach_i3: must be a bool, got {detach_i3!r}")
        loss_cls = kwargs.get("loss_cls")
        if loss_cls is not None and not loss_cls.get("use_sigmoid", False):
            raise ValueError(
                "model.bbox_head.loss_cls.use_sigmoid: PAPLossDeformableDETRHead needs one logit per class "
                f"(use_sigmoid=True), got loss_cls={dict(loss_cls)!r}"
            )
        kwargs.setdefault("loss_cls", dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0))
        super().__init__(*args, **kwargs)
        self.top_k = top_k
        self.quality = quality
        self.detach_i3 = detach_i3
        print_log(
            f"PAPLossDeformableDETRHead: loss = pap_loss per decoder layer, form {self.spec.form}, grad_scale "
            f"{self.spec.grad_scale:.4g}, quality {quality}, top_k {top_k} (loss_cls / loss_bbox / loss_iou of the "
            "config are not used)",
            logger="current",
        )

    def loss_by_feat(
        self,
        all_layers_cls_scores: Tensor,
        all_layers_bbox_preds: Tensor,
        enc_cls_scores: Tensor | None,
        enc_bbox_preds: Tensor | None,
        batch_gt_instances: list,
        batch_img_metas: list[dict],
        batch_gt_instances_ignore: list | None = None,
    ) -> dict[str, Tensor]:
        """``{"loss_pap": last layer, "d<i>.loss_pap": earlier layers[, "enc_loss_pap"]}``.

        all_layers_cls_scores [L, B, Q, C] logits; all_layers_bbox_preds [L, B, Q, 4]
        sigmoid (cx, cy, w, h); enc_*: [B, K, C] and [B, K, 4] or None.
        """
        if batch_gt_instances_ignore is not None:
            raise ValueError("PAPLossDeformableDETRHead: ignored ground truths are not supported (no DETR head does)")
        losses = [
            self.loss_single(cls, box, batch_gt_instances, batch_img_metas)
            for cls, box in zip(all_layers_cls_scores, all_layers_bbox_preds)
        ]
        out = {"loss_pap": losses[-1]}
        for i, loss in enumerate(losses[:-1]):
            out[f"d{i}.loss_pap"] = loss
        if enc_cls_scores is not None:
            proposal_gts = copy.deepcopy(batch_gt_instances)
            for gts in proposal_gts:
                gts.labels = torch.zeros_like(gts.labels)
            out["enc_loss_pap"] = self.loss_single(enc_cls_scores, enc_bbox_preds, proposal_gts, batch_img_metas)
        return out

    def loss_single(self, cls_scores: Tensor, bbox_preds: Tensor, batch_gt_instances: list,
                    batch_img_metas: list[dict]) -> Tensor:
        """The loss of one decoder layer: cls_scores [B, Q, C], bbox_preds [B, Q, 4]. Scalar."""
        num_imgs = cls_scores.size(0)
        labels, _lw, bbox_targets, _bw, _npos, _nneg = self.get_targets(
            [cls_scores[i] for i in range(num_imgs)], [bbox_preds[i] for i in range(num_imgs)],
            batch_gt_instances, batch_img_metas,
        )  # lists over images of [Q], [Q], [Q, 4] (normalised cx, cy, w, h), [Q, 4]
        return self.loss_from_targets(
            cls_scores.reshape(-1, self.cls_out_channels), bbox_preds.reshape(-1, 4),
            torch.cat(labels), torch.cat(bbox_targets),
        )

    def loss_from_targets(self, logits: Tensor, boxes: Tensor, labels: Tensor, bbox_targets: Tensor) -> Tensor:
        """The loss from flat outputs and the matcher's flat targets (all queries of the batch).

        logits [N, C]; boxes [N, 4] sigmoid (cx, cy, w, h); labels [N] (C: unmatched);
        bbox_targets [N, 4] normalised (cx, cy, w, h), read on matched queries only.
        """
        boxes = scale_grad(boxes, self.spec.grad_scale)
        targets = detr_targets(labels, self.cls_out_channels)
        pos = labels < self.cls_out_channels
        pos_idx = pos.nonzero(as_tuple=True)[0]
        u_pos = detr_box_quality(boxes[pos_idx].float(), bbox_targets[pos_idx].float(), self.quality)
        qualities = torch.zeros_like(targets).to(u_pos.dtype).index_put((pos_idx, labels[pos_idx]), u_pos)
        loss = pap_loss(logits.float(), targets, qualities, self.spec, top_k=self.top_k, detach_i3=self.detach_i3)
        if pos_idx.numel() == 0:
            loss = loss + 0.0 * boxes.sum()  # keep the box branch in the graph (DDP)
        return loss


def switch_head(head: dict, cfg) -> dict:
    """A Deformable DETR ``model.bbox_head`` dict with the loss ``cfg`` (a
    :class:`paploss.config.TrainConfig`) asks for:

    * ``paploss``: :class:`PAPLossDeformableDETRHead` with ``cfg.spec``, ``top_k``,
      ``quality``, ``detach_i3``;
    * ``focal+l1``: ``DeformableDETRHead``, Focal Loss (weight 2) and L1 (weight 5), no
      GIoU term (weight 0);
    * ``focal+giou``: ``DeformableDETRHead`` with MMDetection's own Deformable DETR
      losses, Focal (2) + L1 (5) + GIoU (2): a DETR box loss always keeps the L1 term.
    """
    if head.get("type") not in HEAD_TYPES:
        raise ValueError(f"model.bbox_head.type: expected one of {HEAD_TYPES}, got {head.get('type')!r}")
    head = dict(head)
    for key in ("spec", "top_k", "quality", "detach_i3"):
        head.pop(key, None)
    focal = dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0)
    head["loss_cls"] = focal
    head["loss_bbox"] = dict(type="L1Loss", loss_weight=5.0)
    if cfg.loss == "paploss":
        head.update(type="PAPLossDeformableDETRHead", spec=cfg.spec.to_dict(), top_k=cfg.top_k, quality=cfg.quality,
                    detach_i3=bool(getattr(cfg, "detach_i3", False)), loss_iou=dict(type="GIoULoss", loss_weight=2.0))
    elif cfg.loss == "focal+l1":
        head.update(type="DeformableDETRHead", loss_iou=dict(type="GIoULoss", loss_weight=0.0))
    elif cfg.loss == "focal+giou":
        head.update(type="DeformableDETRHead", loss_iou=dict(type="GIoULoss", loss_weight=2.0))
    else:
        raise ValueError(f"loss must be 'paploss', 'focal+l1' or 'focal+giou' for a Deformable DETR, got {cfg.loss!r}")
    return head
