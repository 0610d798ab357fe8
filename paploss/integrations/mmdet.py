"""The searched Parameterized AP Loss inside MMDetection 3.x (SPEC §1).

Importing this module registers :class:`PAPLossRetinaHead` in MMDetection's
``MODELS`` registry. In a config::

    custom_imports = dict(imports=["paploss.integrations.mmdet"], allow_failed_imports=False)
    model = dict(bbox_head=dict(type="PAPLossRetinaHead", spec="runs/search/loss_spec.json"))

``spec`` (config key ``model.bbox_head.spec``) is resolved when the model is built,
by :func:`resolve_spec`, and may be

* a path or ``s3://`` URI of a loss-spec JSON (what a search writes, ``LossSpec.to_json``);
* an MLflow model URI ``models:/<name>@<alias>`` or ``models:/<name>/<version>``
  (the registered version's ``loss_spec.json``; tracking server from
  ``MLFLOW_TRACKING_URI``);
* inline: ``dict(points=[[12 numbers] × 4 or 5], grad_scale=g)`` (order H2, I2,
  I3, I1[, H1], as the paper's ``ctrl_points`` / ``reg_weight``), ``dict(theta=[41
  numbers])``, or a full spec dict ``dict(form=..., points=..., grad_scale=...)``;
* a :class:`paploss.LossSpec`.

Anything else, a missing file, a file that is not a spec, or control points of
the wrong shape raise at build time with a message starting with the config key.

This module imports MMDetection; nothing else in ``paploss`` imports this module.
MMDetection needs ``mmcv.ops`` at import time: with ``mmcv-lite`` (no compiled
ops) :mod:`paploss.integrations.mmcv_ops` supplies them from torchvision first.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from paploss.integrations import mmcv_ops

mmcv_ops.install()  # before anything imports mmdet.models

import torch  # noqa: E402
from mmdet.models.dense_heads import RetinaHead, RPNHead  # noqa: E402
from mmdet.models.roi_heads.bbox_heads import Shared2FCBBoxHead  # noqa: E402
from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures.bbox import bbox_overlaps, cat_boxes  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from torch import Tensor  # noqa: E402

from paploss import LossSpec, pap_loss, scale_grad  # noqa: E402
from paploss import storage  # noqa: E402

__all__ = [
    "PAPLossRetinaHead",
    "PAPLossRPNHead",
    "PAPLossBBoxHead",
    "resolve_head_spec",
    "SpecError",
    "resolve_spec",
    "pap_targets",
    "box_quality",
    "QUALITIES",
]

QUALITIES = ("giou", "iou", "l1")
SPEC_KEY = "model.bbox_head.spec"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class SpecError(ValueError):
    """A loss spec given in a config could not be used; the message starts with the config key."""


# ------------------------------------------------------------------ the spec
def _spec_from_mapping(d: Mapping[str, Any], key: str) -> LossSpec:
    d = dict(d)
    if "theta" in d:
        extra = set(d) - {"theta"}
        if extra:
            raise SpecError(f"{key}: with 'theta' give no other field, got {sorted(extra)}")
        try:
            return LossSpec.from_theta(list(d["theta"]))
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{key}.theta: {exc}") from None
    if "form" in d:
        try:
            return LossSpec.from_dict(_plain(d))
        except ValueError as exc:
            raise SpecError(f"{key}: {exc}") from None
    unknown = set(d) - {"points", "grad_scale"}
    if unknown or "points" not in d:
        raise SpecError(
            f"{key}: an inline spec is dict(points=[[12 numbers] x 4 or 5], grad_scale=g), dict(theta=[...]) "
            f"or dict(form=..., points=..., grad_scale=...); got fields {sorted(d)}"
        )
    points = d["points"]
    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence):
        raise SpecError(f"{key}.points: must be 4 or 5 lists of 12 numbers (H2, I2, I3, I1[, H1]), got {points!r}")
    for i, p in enumerate(points):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise SpecError(f"{key}.points[{i}]: must be a list of 12 numbers, got {p!r}")
    form = "shared" if len(points) == 1 else "searched"
    try:
        return LossSpec(form, tuple(tuple(p) for p in points), d.get("grad_scale", 1.0))
    except ValueError as exc:
        raise SpecError(f"{key}: {exc}") from None


def _plain(obj: Any) -> Any:
    """mmengine ConfigDicts and tuples -> plain dicts and lists (what LossSpec.from_dict reads)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _spec_from_text(text: str, where: str, key: str) -> LossSpec:
    try:
        return LossSpec.from_json(text)
    except ValueError as exc:
        raise SpecError(f"{key}: {where} is not a loss spec: {exc}") from None


def _spec_from_model_uri(uri: str, key: str) -> LossSpec:
    match = _MODEL_URI.match(uri)
    if match is None:
        raise SpecError(f"{key}: {uri!r} is not an MLflow model URI (models:/<name>@<alias> or models:/<name>/<version>)")
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = match["name"]
    try:
        if match["alias"] is not None:
            version = client.get_model_version_by_alias(name, match["alias"])
        else:
            version = client.get_model_version(name, match["version"])
    except MlflowException as exc:
        raise SpecError(f"{key}: no model version {uri!r} at tracking URI {mlflow.get_tracking_uri()}: {exc.message}") from None
    source = str(version.source).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/loss_spec.json", dst_path=tmp)
        except (MlflowException, OSError) as exc:
            raise SpecError(
                f"{key}: model version {name} v{version.version} ({uri}) has no loss_spec.json under {source}: {exc}"
            ) from None
        text = Path(local).read_text()
    return _spec_from_text(text, f"loss_spec.json of {uri} (v{version.version})", key)


def resolve_spec(spec: Any, key: str = SPEC_KEY) -> LossSpec:
    """Turn what a config gives for ``spec`` into a :class:`LossSpec` (see the module doc).

    Raises :class:`SpecError` (a ``ValueError``) or ``FileNotFoundError`` whose
    message starts with ``key``.
    """
    if isinstance(spec, LossSpec):
        return spec
    if spec is None:
        raise SpecError(f"{key}: required (a spec JSON path, an MLflow models:/ URI, or inline control points)")
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text.startswith("models:/"):
            return _spec_from_model_uri(text, key)
        try:
            content = storage.read_text(text)
        except FileNotFoundError:
            raise FileNotFoundError(f"{key}: no loss-spec file at {text!r}") from None
        except IsADirectoryError:
            raise SpecError(f"{key}: {text!r} is a folder, not a loss-spec JSON file") from None
        except UnicodeDecodeError:
            raise SpecError(f"{key}: {text!r} is not a loss spec (not UTF-8 text)") from None
        return _spec_from_text(content, repr(text), key)
    if isinstance(spec, Mapping):
        return _spec_from_mapping(spec, key)
    if isinstance(spec, Sequence) and not isinstance(spec, bytes):
        return _spec_from_mapping({"points": spec}, key)
    raise SpecError(f"{key}: expected a path, a models:/ URI, a dict or control points, got {type(spec).__name__}: {spec!r}")


# --------------------------------------------------------------- the targets
def pap_targets(labels: Tensor, label_weights: Tensor, num_classes: int) -> Tensor:
    """Per-entry targets of SPEC §1 from MMDetection's anchor labels.

    labels: [N] long, class of each anchor, ``num_classes`` for background;
    label_weights: [N], 0 where the assigner ignores the anchor (or it lies outside
    the image). Returns [N, C] float: 1 at the class of a positive anchor, 0 for the
    other classes and for negatives, -1 on every class of an ignored anchor.
    """
    targets = torch.zeros(labels.numel(), num_classes, dtype=torch.float32, device=labels.device)
    pos = (labels >= 0) & (labels < num_classes)
    targets[pos, labels[pos]] = 1.0
    targets[label_weights <= 0] = -1.0
    return targets


def box_quality(pred_deltas: Tensor, target_deltas: Tensor, coder: DeltaXYWHBBoxCoder, kind: str = "giou") -> Tensor:
    """Localisation quality ``u`` in [0, 1] of each positive anchor (SPEC §1).

    pred_deltas, target_deltas: [P, 4] encoded by ``coder`` relative to the anchor.
    Both are decoded relative to a unit anchor centred at 0 (as the paper's code
    does): IoU and GIoU do not change under the per-anchor shift and scale, and L1
    is then measured in anchor units. ``kind``:
    ``giou``: ``(GIoU + 1) / 2``; ``iou``: IoU; ``l1``: ``clamp(1 - sum|b - b*|, 0, 1)``.
    Returns [P]; differentiable in ``pred_deltas``.
    """
    if kind not in QUALITIES:
        raise ValueError(f"quality must be one of {QUALITIES}, got {kind!r}")
    unit = pred_deltas.new_tensor([-0.5, -0.5, 0.5, 0.5]).expand(pred_deltas.size(0), 4)
    pred = coder.decode(unit, pred_deltas)
    target = coder.decode(unit, target_deltas)
    if kind == "giou":
        return (bbox_overlaps(pred, target, mode="giou", is_aligned=True) + 1) / 2
    if kind == "iou":
        return bbox_overlaps(pred, target, mode="iou", is_aligned=True)
    return (1 - (pred - target).abs().sum(-1)).clamp(0, 1)


# ------------------------------------------------------------------ the head
@MODELS.register_module()
class PAPLossRetinaHead(RetinaHead):
    """RetinaNet head trained with the Parameterized AP Loss over the whole batch.

    The layers, anchors, assignment and inference are RetinaHead's; only the loss
    differs (SPEC §1). For B images with A anchors in all, C classes:

    * ``s`` [B·A, C]: the logits of every (anchor, class) entry of the batch, one vector;
    * ``t`` [B·A, C]: :func:`pap_targets` (1 / 0 / -1 for ignored anchors);
    * ``u`` [B·A, C]: :func:`box_quality` of the decoded predicted box against its
      target on the positive entry of each positive anchor, 0 elsewhere;
    * ``loss = pap_loss(s, t, u, spec, top_k)``, the ranking over the whole batch;
      the box outputs pass through ``scale_grad(·, spec.grad_scale)`` first, so the
      gradient reaching the box branch is multiplied by the searched scale.

    There is no separate classification or box loss: ``loss_cls`` / ``loss_bbox`` in
    the config are accepted (so a RetinaNet config switches with one line) but not
    used; ``loss_cls.use_sigmoid`` must stay True (one logit per class).

    Args (besides RetinaHead's):
        spec: the loss (see :func:`resolve_spec`); config key ``model.bbox_head.spec``.
        top_k: rank against only the ``top_k`` highest-scoring valid entries
            (SPEC §1; None: all).
        quality: ``"giou"`` (default), ``"iou"`` or ``"l1"``.
    """

    def __init__(
        self,
        *args: Any,
        spec: Any = None,
        top_k: int | None = 100_000,
        quality: str = "giou",
        **kwargs: Any,
    ) -> None:
        self.spec = resolve_spec(spec)
        if quality not in QUALITIES:
            raise ValueError(f"model.bbox_head.quality: must be one of {QUALITIES}, got {quality!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"model.bbox_head.top_k: must be a positive integer or None, got {top_k!r}")
        loss_cls = kwargs.get("loss_cls")
        if loss_cls is not None and not loss_cls.get("use_sigmoid", False):
            raise ValueError(
                "model.bbox_head.loss_cls.use_sigmoid: PAPLossRetinaHead needs one logit per class (use_sigmoid=True), "
                f"got loss_cls={dict(loss_cls)!r}"
            )
        kwargs.setdefault("loss_cls", dict(type="FocalLoss", use_sigmoid=True))
        if kwargs.get("reg_decoded_bbox", False):
            raise ValueError("model.bbox_head.reg_decoded_bbox: PAPLossRetinaHead regresses deltas; set it False")
        super().__init__(*args, **kwargs)
        if not isinstance(self.bbox_coder, DeltaXYWHBBoxCoder):
            raise ValueError(
                "model.bbox_head.bbox_coder: PAPLossRetinaHead needs DeltaXYWHBBoxCoder, "
                f"got {type(self.bbox_coder).__name__}"
            )
        self.top_k = top_k
        self.quality = quality
        print_log(
            f"PAPLossRetinaHead: loss = pap_loss, form {self.spec.form}, grad_scale {self.spec.grad_scale:.4g}, "
            f"quality {quality}, top_k {top_k} (loss_cls / loss_bbox of the config are not used)",
            logger="current",
        )

    def loss_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        batch_gt_instances: list,
        batch_img_metas: list[dict],
        batch_gt_instances_ignore: list | None = None,
    ) -> dict[str, Tensor]:
        """``{"loss_pap": loss}`` for the whole batch (see the class doc).

        cls_scores: per level [B, K·C, H_l, W_l]; bbox_preds: per level [B, K·4, H_l, W_l]
        (K anchors per location).
        """
        featmap_sizes = [f.size()[-2:] for f in cls_scores]
        device = cls_scores[0].device
        anchor_list, valid_flag_list = self.get_anchors(featmap_sizes, batch_img_metas, device=device)
        (labels_list, label_weights_list, bbox_targets_list, _bbox_weights, _avg) = self.get_targets(
            anchor_list, valid_flag_list, batch_gt_instances, batch_img_metas,
            batch_gt_instances_ignore=batch_gt_instances_ignore,
        )  # each a list over levels of [B, A_l(, 4)]
        logits, deltas = self.flatten_outputs(cls_scores, bbox_preds)  # [B·A, C], [B·A, 4]
        labels = torch.cat(labels_list, dim=1).reshape(-1)  # [B·A]
        label_weights = torch.cat(label_weights_list, dim=1).reshape(-1)
        bbox_targets = torch.cat(bbox_targets_list, dim=1).reshape(-1, 4)
        return {"loss_pap": self.loss_from_targets(logits, deltas, labels, label_weights, bbox_targets)}

    def flatten_outputs(self, cls_scores: list[Tensor], bbox_preds: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-level head outputs -> ``[B·A, C]`` logits and ``[B·A, 4]`` deltas.

        Row order (image, level, y, x, anchor) matches ``get_targets`` after
        concatenating its levels along dim 1.
        """
        batch = cls_scores[0].size(0)
        logits = torch.cat(
            [s.permute(0, 2, 3, 1).reshape(batch, -1, self.cls_out_channels) for s in cls_scores], dim=1
        )
        deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(batch, -1, 4) for d in bbox_preds], dim=1)
        return logits.reshape(-1, self.cls_out_channels), deltas.reshape(-1, 4)

    def loss_from_targets(
        self, logits: Tensor, deltas: Tensor, labels: Tensor, label_weights: Tensor, bbox_targets: Tensor
    ) -> Tensor:
        """The loss from flat outputs and MMDetection's flat targets (all rows of the batch).

        logits [N, C]; deltas [N, 4]; labels [N] (C = background); label_weights [N];
        bbox_targets [N, 4] encoded deltas (used on positives only). Returns a scalar.
        """
        deltas = scale_grad(deltas, self.spec.grad_scale)
        targets = pap_targets(labels, label_weights, self.cls_out_channels)
        pos = targets.eq(1).any(dim=1)  # [N] positive anchors
        u_pos = box_quality(deltas[pos].float(), bbox_targets[pos].float(), self.bbox_coder, self.quality)
        qualities = torch.zeros_like(targets).to(u_pos.dtype)
        qualities = qualities.index_put((pos.nonzero(as_tuple=True)[0], labels[pos]), u_pos)
        loss = pap_loss(logits.float(), targets, qualities, self.spec, top_k=self.top_k)
        if not bool(pos.any()):
            loss = loss + 0.0 * deltas.sum()  # keep the box branch in the graph (DDP)
        return loss


# ------------------------------------------------------- Faster R-CNN: two heads
# The two-stage detector of the paper trains both stages with the PAP loss, each head
# with its own spec (paploss.spec_set: a spec-set file names them ``rpn`` and ``roi``).
RPN_SPEC_KEY = "model.rpn_head.spec"
ROI_SPEC_KEY = "model.roi_head.bbox_head.spec"


def resolve_head_spec(spec: Any, head: str, key: str) -> LossSpec:
    """The spec of one head (``"rpn"`` or ``"roi"``): what :func:`resolve_spec` takes, or a
    spec set (``paploss.spec_set.SpecSet``, its dict, or the path of its JSON file,
    format ``paploss-specs/1``) whose entry ``head`` is taken. Errors start with ``key``."""
    from paploss.spec_set import SpecSet, read_spec

    if isinstance(spec, (str, os.PathLike)) and not os.fspath(spec).startswith("models:/"):
        text = os.fspath(spec)
        try:
            content = storage.read_text(text)
        except FileNotFoundError:
            raise FileNotFoundError(f"{key}: no loss-spec file at {text!r}") from None
        except (IsADirectoryError, UnicodeDecodeError):
            return resolve_spec(spec, key)  # its own message
        try:
            spec = read_spec(content)
        except ValueError as exc:
            raise SpecError(f"{key}: {text!r} is not a loss spec or spec set: {exc}") from None
    elif isinstance(spec, Mapping) and ("format" in spec or "heads" in spec):
        try:
            spec = SpecSet.from_dict(_plain(spec))
        except ValueError as exc:
            raise SpecError(f"{key}: {exc}") from None
    if isinstance(spec, SpecSet):
        try:
            return spec[head]
        except KeyError:
            raise SpecError(f"{key}: the spec set has no head {head!r} (heads: {list(spec.names)})") from None
    return resolve_spec(spec, key)


def _check_options(key: str, quality: str, top_k: Any) -> None:
    if quality not in QUALITIES:
        raise ValueError(f"{key}.quality: must be one of {QUALITIES}, got {quality!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{key}.top_k: must be a positive integer or None, got {top_k!r}")


@MODELS.register_module()
class PAPLossRPNHead(RPNHead):
    """MMDetection's RPN head trained with the Parameterized AP Loss (SPEC §1).

    Layers, anchors, assignment and proposals are RPNHead's; the loss ranks the
    objectness logit of **every** anchor of the batch (use ``PseudoSampler`` in
    ``train_cfg.rpn``: the config's sampler decides which anchors get targets), the
    positives' quality ``u`` the (GIoU + 1) / 2 of the decoded proposal against its gt
    (:func:`box_quality`); the box outputs' gradient is scaled by the spec's
    ``grad_scale``. The loss is ``{"loss_rpn_pap": ...}``. It is exactly
    :class:`PAPLossRetinaHead`'s loss with one class (``loss_from_targets`` is shared).

    Args (besides RPNHead's):
        spec: config key ``model.rpn_head.spec``: what :func:`resolve_spec` takes, or a
            spec set (its ``rpn`` head; :func:`resolve_head_spec`).
        top_k, quality: as :class:`PAPLossRetinaHead`.
    """

    flatten_outputs = PAPLossRetinaHead.flatten_outputs
    loss_from_targets = PAPLossRetinaHead.loss_from_targets

    def __init__(self, *args: Any, spec: Any = None, top_k: int | None = 100_000, quality: str = "giou",
                 **kwargs: Any) -> None:
        key = RPN_SPEC_KEY.rsplit(".", 1)[0]
        self.spec = resolve_head_spec(spec, "rpn", RPN_SPEC_KEY)
        _check_options(key, quality, top_k)
        loss_cls = kwargs.get("loss_cls")
        if loss_cls is not None and not loss_cls.get("use_sigmoid", False):
            raise ValueError(f"{key}.loss_cls.use_sigmoid: the RPN's objectness is one logit (use_sigmoid=True), "
                             f"got loss_cls={dict(loss_cls)!r}")
        if kwargs.get("reg_decoded_bbox", False):
            raise ValueError(f"{key}.reg_decoded_bbox: PAPLossRPNHead regresses deltas; set it False")
        super().__init__(*args, **kwargs)
        if not isinstance(self.bbox_coder, DeltaXYWHBBoxCoder):
            raise ValueError(f"{key}.bbox_coder: PAPLossRPNHead needs DeltaXYWHBBoxCoder, "
                             f"got {type(self.bbox_coder).__name__}")
        self.top_k, self.quality = top_k, quality
        print_log(f"PAPLossRPNHead: loss = pap_loss over every anchor, form {self.spec.form}, grad_scale "
                  f"{self.spec.grad_scale:.4g}, quality {quality}, top_k {top_k}", logger="current")

    def loss_by_feat(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], batch_gt_instances: list,
                     batch_img_metas: list[dict], batch_gt_instances_ignore: list | None = None) -> dict[str, Tensor]:
        """``{"loss_rpn_pap": loss}``; cls_scores per level [B, K, H_l, W_l], bbox_preds [B, K·4, H_l, W_l]."""
        loss = PAPLossRetinaHead.loss_by_feat(self, cls_scores, bbox_preds, batch_gt_instances, batch_img_metas,
                                              batch_gt_instances_ignore)["loss_pap"]
        return {"loss_rpn_pap": loss}


class _SigmoidScores(torch.nn.Module):
    """Stands in for the box head's ``loss_cls`` so that MMDetection's prediction scores
    a PAP-trained head by ``sigmoid`` of its foreground logits (the loss ranks them)
    instead of a softmax: ``custom_cls_channels`` keeps the C + 1 logits, the
    background's score is 0 (``multiclass_nms`` drops that column)."""

    custom_cls_channels = True
    custom_activation = False
    custom_accuracy = False

    def get_cls_channels(self, num_classes: int) -> int:
        return num_classes + 1

    def get_activation(self, cls_score: Tensor) -> Tensor:
        scores = torch.sigmoid(cls_score[:, :-1])
        return torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)


@MODELS.register_module()
class PAPLossBBoxHead(Shared2FCBBoxHead):
    """Faster R-CNN's box head (``Shared2FCBBoxHead``) trained with the Parameterized AP Loss.

    For R RoIs of the batch (all proposals: use ``PseudoSampler`` in ``train_cfg.rcnn``,
    as the paper does) and C classes:

    * ``s`` [R, C]: the foreground logits ``cls_score[:, :C]`` (column C, MMDetection's
      background, is not ranked and scores 0 at inference: :class:`_SigmoidScores`);
    * ``t`` [R, C]: :func:`pap_targets` of the RoI labels (-1 where ``label_weights`` is 0);
    * ``u`` [R, C]: :func:`box_quality` of the RoI's box for its own class against its
      target, on the positive entry, 0 elsewhere;
    * ``loss = pap_loss(s, t, u, spec, top_k)`` over the whole batch; the box outputs
      pass through ``scale_grad(·, spec.grad_scale)``.

    The loss is ``{"loss_roi_pap": ...}``; ``loss_cls`` / ``loss_bbox`` of the config are
    accepted and not used. Args (besides Shared2FCBBoxHead's): ``spec`` (config key
    ``model.roi_head.bbox_head.spec``; a spec set gives its ``roi`` head), ``top_k``, ``quality``.
    """

    def __init__(self, *args: Any, spec: Any = None, top_k: int | None = 100_000, quality: str = "giou",
                 **kwargs: Any) -> None:
        key = ROI_SPEC_KEY.rsplit(".", 1)[0]
        self.spec = resolve_head_spec(spec, "roi", ROI_SPEC_KEY)
        _check_options(key, quality, top_k)
        if kwargs.get("reg_decoded_bbox", False):
            raise ValueError(f"{key}.reg_decoded_bbox: PAPLossBBoxHead regresses deltas; set it False")
        super().__init__(*args, **kwargs)
        if not isinstance(self.bbox_coder, DeltaXYWHBBoxCoder):
            raise ValueError(f"{key}.bbox_coder: PAPLossBBoxHead needs DeltaXYWHBBoxCoder, "
                             f"got {type(self.bbox_coder).__name__}")
        self.loss_cls = _SigmoidScores()  # fc_cls keeps its C + 1 outputs (built above)
        self.top_k, self.quality = top_k, quality
        print_log(f"PAPLossBBoxHead: loss = pap_loss over every RoI x class, form {self.spec.form}, grad_scale "
                  f"{self.spec.grad_scale:.4g}, quality {quality}, top_k {top_k}", logger="current")

    def loss(self, cls_score: Tensor, bbox_pred: Tensor, rois: Tensor, labels: Tensor, label_weights: Tensor,
             bbox_targets: Tensor, bbox_weights: Tensor, reduction_override: str | None = None) -> dict[str, Tensor]:
        """cls_score [R, C + 1]; bbox_pred [R, 4C] (or [R, 4] class-agnostic); labels [R] (C =
        background); label_weights [R]; bbox_targets [R, 4] encoded deltas (positives)."""
        C = self.num_classes
        deltas = scale_grad(bbox_pred, self.spec.grad_scale)
        targets = pap_targets(labels, label_weights, C)
        pos = targets.eq(1).any(dim=1)
        if self.reg_class_agnostic:
            pos_deltas = deltas.view(deltas.size(0), 4)[pos]
        else:
            pos_deltas = deltas.view(deltas.size(0), C, 4)[pos, labels[pos]]
        u_pos = box_quality(pos_deltas.float(), bbox_targets[pos].float(), self.bbox_coder, self.quality)
        qualities = torch.zeros_like(targets).to(u_pos.dtype).index_put((pos.nonzero(as_tuple=True)[0], labels[pos]),
                                                                          u_pos)
        loss = pap_loss(cls_score[:, :C].float(), targets, qualities, self.spec, top_k=self.top_k)
        if not bool(pos.any()):
            loss = loss + 0.0 * deltas.sum()  # keep the box branch in the graph (DDP)
        return {"loss_roi_pap": loss}
