"""torchvision Faster R-CNN (FPN) with the loss chosen by name, on both stages.

The detector: a backbone with FPN (P3-P7, :func:`paploss.models.backbones.build_backbone`),
torchvision's RPN over all five levels (one anchor size per level, ``anchor_size *
2^l``, aspect ratios 0.5 / 1 / 2; matcher IoU 0.7 / 0.3), RoIAlign 7×7 on P3-P5 and a
two-layer MLP box head with class-specific boxes. Sized for CPU: images resized to
``image_size``, and proposals per image sized to the images (below).

Proposals per image (``rpn_post_nms_top_n``, training / testing). The paper's Faster
R-CNN keeps 1000 training proposals per 1333×800 image (MMDetection's
``rpn_proposal.max_per_img``) and samples 512 of them for its baselines' RoI loss. Ours
keeps the same density of proposals per pixel, :func:`training_proposals`, but never
fewer than the baselines' RoI sampler takes (``box_batch_size_per_image``, 128): at
128 px that density is ~15, so training keeps 128 proposals per image, which every loss
sees alike. The baselines then sample from the same 128 proposals (+ the gt boxes) that
the PAP loss ranks all of, so ranking every proposal costs a step what sampling does
(the shapes images hold a few objects each; 128 proposals are ~8× the paper's density).
At test time 128 proposals per image (``rpn_post_nms_top_n[1]``) whatever the size.

Labels: like every paploss detector it takes and returns classes 0..K-1 (torchvision's
Faster R-CNN uses 0 for the background, so :class:`TwoStageDetector` shifts them by one).

The loss switch (the names are those of :data:`paploss.models.LOSSES`; for a two-stage
detector the classification loss of the baselines is cross-entropy, the paper's "CE"):

- ``focal+l1``: torchvision's own losses. RPN: binary cross-entropy on the objectness
  of 256 sampled anchors per image (half positive at most) + smooth L1 (beta 1/9) on
  the positives' deltas; RoI head: softmax cross-entropy over K + 1 classes on
  ``box_batch_size_per_image`` sampled proposals per image (25 % positive at most) +
  smooth L1 (beta 1/9) on the class-specific deltas of the positives.
- ``focal+giou``: the same, except the RoI head's box loss is ``10 · (1 - GIoU)`` of the
  decoded class-specific boxes (MMDetection's Faster R-CNN GIoU config; its RPN keeps L1).
- ``paploss``: the Parameterized AP Loss as the only loss of *both* stages, each with its
  own :class:`~paploss.spec.LossSpec` (a :class:`~paploss.spec_set.SpecSet` with heads
  ``rpn`` and ``roi``, or one ``LossSpec`` for both):

  * RPN: ranks the objectness logit of **every** anchor of the batch (targets from the
    RPN matcher, ignored anchors left out; no 256-anchor sampler), box quality ``u`` of
    the decoded proposal against its matched gt;
  * RoI head: ranks **every** proposal × foreground class of the batch (no sampling, as
    MMDetection's ``PseudoSampler``), ``u`` of the decoded box of the proposal's class;
  * the box outputs of each head pass through ``scale_grad(·, grad_scale)`` of its spec.

  The loss dict is ``{"paploss_rpn", "paploss_roi"}``; at inference the RoI scores are
  ``sigmoid`` of the K foreground logits (the loss ranks them; the background column
  is not trained), instead of the baselines' softmax.

Targets and qualities: :mod:`paploss.models.two_stage_targets`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops
from torchvision.ops.misc import Conv2dNormActivation

from paploss.models.backbones import build_backbone
from paploss.models.retinanet import check_loss
from paploss.models.targets import QUALITIES
from paploss.models.two_stage_targets import KeepAll, delta_quality, roi_targets, rpn_targets

__all__ = ["PAPRegionProposalNetwork", "PAPRoIHeads", "TwoStageDetector", "build_faster_rcnn", "training_proposals",
           "GIOU_WEIGHT"]

GIOU_WEIGHT = 10.0  # the RoI box loss weight of focal+giou (MMDetection's Faster R-CNN GIoU config)
PAPER_PROPOSALS = 1000  # training proposals per image of the paper's Faster R-CNN (rpn_proposal.max_per_img)
PAPER_IMAGE_AREA = 1333 * 800  # the image those proposals cover (MMDetection's 1x COCO resize)
TEST_PROPOSALS = 128  # proposals per image at inference, whatever the image size


def training_proposals(image_size: int, box_batch_size_per_image: int) -> int:
    """Training proposals per image on images of side ``image_size``: the paper's density
    ``PAPER_PROPOSALS / PAPER_IMAGE_AREA`` per pixel of ``image_size²``, but at least
    ``box_batch_size_per_image`` (the RoI sampler's batch of the baselines), so that the
    baselines' sampler and the PAP loss see the same proposals. 128 px: max(128, 15) = 128;
    512 px: 246; 1024 px: 983."""
    if image_size < 1 or box_batch_size_per_image < 1:
        raise ValueError(f"image_size and box_batch_size_per_image must be >= 1, got {image_size}, "
                         f"{box_batch_size_per_image}")
    return max(box_batch_size_per_image, round(PAPER_PROPOSALS * image_size**2 / PAPER_IMAGE_AREA))


class _PapOptions:
    """What both PAP-loss heads share: the spec, quality, top_k, detach_i3, and what the
    last training step ranked (for tests and the engine's box-collapse stop)."""

    box_quality = None  # the positives' mean u of the last step (detached 0-d; NaN without positives)
    ranked = None  # the last step's entry counts: {"entries", "ranked", "positives"}

    def _set_options(self, loss: str, spec, quality: str, top_k: int | None, detach_i3: bool) -> None:
        check_loss(loss, spec)
        if quality not in QUALITIES:
            raise ValueError(f"unknown quality {quality!r}; known: {list(QUALITIES)}")
        self.loss, self.spec, self.quality, self.top_k, self.detach_i3 = loss, spec, quality, top_k, detach_i3

    def _pap(self, logits: Tensor, t: Tensor, u: Tensor) -> Tensor:
        """``pap_loss`` over the flattened entries; records the counts and the mean u."""
        from paploss.loss import pap_loss

        valid = int((t != -1).sum())
        self.ranked = {"entries": t.numel(), "ranked": valid if self.top_k is None else min(valid, self.top_k),
                       "positives": int((t == 1).sum())}
        self.box_quality = u.detach()[t == 1].mean()
        return pap_loss(logits.reshape(-1).float(), t.reshape(-1), u.reshape(-1), self.spec, top_k=self.top_k,
                        detach_i3=self.detach_i3)


class PAPRegionProposalNetwork(_PapOptions, RegionProposalNetwork):
    """torchvision's RPN; with ``loss="paploss"`` its loss is ``{"paploss_rpn"}``, the PAP
    loss over every anchor of the batch (``compute_loss``; the sampler is not used)."""

    def __init__(self, *args, loss: str = "focal+l1", spec=None, quality: str = "giou", top_k: int | None = 100_000,
                 detach_i3: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_options(loss, spec, quality, top_k, detach_i3)

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``objectness [A, 1]``, ``pred_bbox_deltas [A, 4]`` for all ``A`` anchors of the batch."""
        if self.loss != "paploss":
            return super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
        from paploss.loss import scale_grad

        deltas = scale_grad(pred_bbox_deltas, self.spec.grad_scale)
        t, u = rpn_targets(deltas.float(), labels, regression_targets, self.box_coder, self.quality)
        loss = self._pap(objectness, t, u)
        return loss, loss.new_zeros(())  # the second is dropped by forward

    def forward(self, images, features, targets=None):
        boxes, losses = super().forward(images, features, targets)
        if self.loss == "paploss" and losses:
            losses = {"paploss_rpn": losses["loss_objectness"]}
        return boxes, losses


class PAPRoIHeads(_PapOptions, RoIHeads):
    """torchvision's ``RoIHeads`` with the loss switch of the module doc. With the PAP loss
    the sampler keeps every proposal (:class:`KeepAll`) and the loss is ``{"paploss_roi"}``."""

    def __init__(self, *args, loss: str = "focal+l1", spec=None, quality: str = "giou", top_k: int | None = 100_000,
                 detach_i3: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_options(loss, spec, quality, top_k, detach_i3)
        if loss == "paploss":
            self.fg_bg_sampler = KeepAll()

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or self.loss == "focal+l1":
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)  # [R, K + 1], [R, (K + 1) * 4]
        if self.loss == "paploss":
            return [], {"paploss_roi": self.pap_loss(class_logits, box_regression, labels, regression_targets)}
        return [], self.giou_loss(class_logits, box_regression, labels, regression_targets)

    def pap_loss(self, class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                 regression_targets: list[Tensor]) -> Tensor:
        """The PAP loss over every proposal × foreground class: logits ``class_logits[:, 1:]``."""
        from paploss.loss import scale_grad

        box_regression = scale_grad(box_regression, self.spec.grad_scale)
        t, u = roi_targets(box_regression.float(), labels, regression_targets, self.box_coder, self.quality)
        return self._pap(class_logits[:, 1:], t, u)

    def giou_loss(self, class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                  regression_targets: list[Tensor]) -> dict[str, Tensor]:
        """``focal+giou``: cross-entropy + ``GIOU_WEIGHT · sum_pos (1 - GIoU) / #sampled`` (the
        normalisation of torchvision's smooth-L1 box loss)."""
        lab = torch.cat(labels)
        pos = torch.where(lab > 0)[0]
        pred = box_regression.reshape(lab.shape[0], -1, 4)[pos, lab[pos]]
        u = delta_quality(pred.float(), torch.cat(regression_targets)[pos], self.box_coder, "giou")
        box = GIOU_WEIGHT * (2.0 * (1.0 - u)).sum() / max(1, lab.numel())
        return {"loss_classifier": F.cross_entropy(class_logits, lab), "loss_box_reg": box}

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """As torchvision's, but with the PAP loss the scores are ``sigmoid`` of the
        foreground logits (the background column carries no score)."""
        if self.loss != "paploss":
            return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)[:, 1:]  # [R, K, 4]
        pred_scores = torch.sigmoid(class_logits[:, 1:])  # [R, K]
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes.split(per_image), pred_scores.split(per_image), image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape).reshape(-1, 4)
            labels = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(scores).reshape(-1)
            scores = scores.reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


class TwoStageDetector(GeneralizedRCNN):
    """torchvision's ``GeneralizedRCNN`` (what ``FasterRCNN`` builds) taking and giving
    labels 0..K-1 like the other paploss detectors (torchvision's are 1..K).

    ``head`` is the RoI box head: with the PAP loss the engine reads its
    ``box_quality`` (the positives' mean u of the last step), as RetinaNet's ``model.head``."""

    @property
    def head(self) -> PAPRoIHeads:
        return self.roi_heads

    def forward(self, images, targets=None):
        if targets is not None:
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        out = super().forward(images, targets)
        if self.training:
            return out
        return [{**d, "labels": d["labels"] - 1} for d in out]


def _head_specs(spec) -> dict:
    """``{"rpn": LossSpec | None, "roi": LossSpec | None}`` from a SpecSet, one LossSpec or None."""
    from paploss.spec import LossSpec
    from paploss.spec_set import FAMILY_HEADS, SpecSet

    names = FAMILY_HEADS["faster_rcnn"]
    if spec is None or isinstance(spec, LossSpec):
        return {n: spec for n in names}
    if not isinstance(spec, SpecSet):
        raise ValueError(f"spec must be a LossSpec or a SpecSet with heads {list(names)}, got {type(spec).__name__}")
    if set(spec.names) != set(names):
        raise ValueError(f"a Faster R-CNN has the heads {list(names)}; the spec set has {list(spec.names)}")
    return {n: spec[n] for n in names}


def _rpn_head(channels: int, norm: bool) -> RPNHead:
    head = RPNHead(channels, 3)
    if norm:  # GroupNorm after the shared 3x3 conv (the dense head, as RetinaNet's head_norm)
        groups = 32 if channels % 32 == 0 else 8
        head.conv = nn.Sequential(Conv2dNormActivation(channels, channels, kernel_size=3,
                                                       norm_layer=partial(nn.GroupNorm, groups)))
        for layer in head.conv.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
    return head


def build_faster_rcnn(
    num_classes: int,
    *,
    backbone: str = "mobilenet_v3_large",
    loss: str = "focal+l1",
    spec=None,
    image_size: int = 128,
    fpn_channels: int = 64,
    width_mult: float = 1.0,
    head_norm: bool = False,
    anchor_size: float = 16.0,
    quality: str = "giou",
    top_k: int | None = 100_000,
    backbone_weights: str | None = None,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
    detach_i3: bool = False,
    representation_size: int = 256,
    rpn_pre_nms_top_n: tuple[int, int] = (1000, 500),
    rpn_post_nms_top_n: tuple[int, int] | None = None,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 128,
) -> TwoStageDetector:
    """A Faster R-CNN for ``num_classes`` classes (labels 0..K-1) on square images of side
    ``image_size``. ``spec``: a ``SpecSet`` with heads ``rpn`` and ``roi`` or one
    ``LossSpec`` for both (for ``loss="paploss"``). ``rpn_*_top_n``: (training, testing)
    proposals per image before / after the RPN's NMS; ``rpn_post_nms_top_n=None``:
    (:func:`training_proposals`, ``TEST_PROPOSALS``), see the module doc;
    ``*_batch_size_per_image``: the baselines' sampled anchors (RPN) and proposals (RoI
    head) per image."""
    specs = _head_specs(spec)
    if rpn_post_nms_top_n is None:
        rpn_post_nms_top_n = (training_proposals(image_size, box_batch_size_per_image), TEST_PROPOSALS)
    body = build_backbone(backbone, fpn_channels=fpn_channels, width_mult=width_mult, weights=backbone_weights)
    levels = 5
    anchors = AnchorGenerator(tuple((anchor_size * 2**lvl,) for lvl in range(levels)), ((0.5, 1.0, 2.0),) * levels)
    options = dict(loss=loss, quality=quality, top_k=top_k, detach_i3=detach_i3)
    rpn = PAPRegionProposalNetwork(
        anchors, _rpn_head(fpn_channels, head_norm), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=rpn_batch_size_per_image, positive_fraction=0.5,
        pre_nms_top_n=dict(training=rpn_pre_nms_top_n[0], testing=rpn_pre_nms_top_n[1]),
        post_nms_top_n=dict(training=rpn_post_nms_top_n[0], testing=rpn_post_nms_top_n[1]), nms_thresh=0.7,
        spec=specs["rpn"], **options)
    roi_heads = PAPRoIHeads(
        MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
        TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        FastRCNNPredictor(representation_size, num_classes + 1),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=box_batch_size_per_image, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=score_thresh, nms_thresh=0.5, detections_per_img=detections_per_img,
        spec=specs["roi"], **options)
    transform = GeneralizedRCNNTransform(image_size, image_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return TwoStageDetector(body, rpn, roi_heads, transform)
