"""``mmcv.ops`` for ``mmcv-lite``: the few operations a RetinaNet needs, from torchvision.

MMDetection 3.3 imports ``mmcv.ops`` as soon as ``mmdet.models`` is imported
(``mmdet/models/layers/bbox_nms.py`` does ``from mmcv.ops.nms import batched_nms``).
``mmcv-lite`` ships the Python files of ``mmcv.ops`` but not their compiled
extension ``mmcv._ext``, and the full ``mmcv`` has no wheels for current torch
(building it takes 35-45 minutes on two cores). So, when ``mmcv._ext`` is missing,
:func:`install` puts a meta-path finder in front of ``sys.meta_path`` that serves
``mmcv.ops`` and every ``mmcv.ops.<submodule>`` from this file instead:

========================  ===============================================
name                      implementation
========================  ===============================================
``nms``                   ``torchvision.ops.nms`` (``offset``, ``score_threshold``, ``max_num`` as mmcv)
``batched_nms``           mmcv's own algorithm (class offsets, ``split_thr``) on top of ``nms``
``roi_align``/``RoIAlign``  ``torchvision.ops.roi_align`` (``pool_mode='avg'`` only)
``sigmoid_focal_loss``    plain torch, the same maths as mmcv's kernel
``get_compiler_version``  a string saying that ops come from torchvision
========================  ===============================================

Every other name (deformable convolutions, CARAFE, ...) resolves to a class whose
construction or call raises :class:`MmcvOpUnavailable` naming the operation: the
modules that merely import it keep importing, and a config that really uses it
fails at build time with a clear message instead of a silent substitute.

When the compiled ``mmcv`` is installed, :func:`install` does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MmcvOpUnavailable",
    "install",
    "installed",
    "nms",
    "batched_nms",
    "roi_align",
    "RoIAlign",
    "sigmoid_focal_loss",
]

_PACKAGE = "mmcv.ops"


class MmcvOpUnavailable(RuntimeError):
    """An ``mmcv.ops`` operation that needs the compiled ``mmcv`` was used."""


# --------------------------------------------------------------------------- nms
def nms(
    boxes: Tensor | np.ndarray,
    scores: Tensor | np.ndarray,
    iou_threshold: float,
    offset: int = 0,
    score_threshold: float = 0,
    max_num: int = -1,
) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray]:
    """Greedy non-maximum suppression, with ``mmcv.ops.nms``'s signature.

    boxes: [N, 4] (x1, y1, x2, y2); scores: [N]. With ``offset=1`` widths are
    ``x2 - x1 + 1`` (as mmcv): shifting x2, y2 by the offset gives exactly that.
    Returns ``dets`` [K, 5] (box, score) and ``inds`` [K] (int64) into the input,
    in decreasing score order; numpy in, numpy out.
    """
    import torchvision

    if offset not in (0, 1):
        raise ValueError(f"nms: offset must be 0 or 1, got {offset!r}")
    is_numpy = isinstance(boxes, np.ndarray)
    boxes_t = torch.from_numpy(boxes) if is_numpy else boxes
    scores_t = torch.from_numpy(scores) if isinstance(scores, np.ndarray) else scores
    if boxes_t.dim() != 2 or boxes_t.size(1) != 4 or boxes_t.size(0) != scores_t.size(0):
        raise ValueError(
            f"nms: boxes must be [N, 4] and scores [N], got {tuple(boxes_t.shape)} and {tuple(scores_t.shape)}"
        )
    valid = None
    cand_boxes, cand_scores = boxes_t, scores_t
    if score_threshold > 0:
        valid = torch.nonzero(scores_t > score_threshold, as_tuple=False).squeeze(1)
        cand_boxes, cand_scores = boxes_t[valid], scores_t[valid]
    for_iou = cand_boxes.detach().float()
    if offset:
        for_iou = torch.cat([for_iou[:, :2], for_iou[:, 2:] + offset], dim=1)
    inds = torchvision.ops.nms(for_iou, cand_scores.detach().float(), float(iou_threshold))
    if max_num > 0:
        inds = inds[:max_num]
    if valid is not None:
        inds = valid[inds]
    dets = torch.cat([boxes_t[inds], scores_t[inds].reshape(-1, 1)], dim=1)
    if is_numpy:
        return dets.cpu().numpy(), inds.cpu().numpy()
    return dets, inds


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    nms_cfg: dict | None,
    class_agnostic: bool = False,
) -> tuple[Tensor, Tensor]:
    """NMS per cluster ``idxs``, with ``mmcv.ops.batched_nms``'s signature and algorithm.

    boxes: [N, 4]; scores: [N]; idxs: [N] (class of each box). Boxes of different
    classes are moved apart by ``idx * (max coordinate + 1)`` so one NMS call keeps
    classes separate. ``nms_cfg``: ``None`` (sort only) or ``dict(type='nms',
    iou_threshold=..., split_thr=10000, class_agnostic=False, max_num=-1)``.
    Returns ``dets`` [K, 5] sorted by score and ``keep`` [K].
    """
    if nms_cfg is None:
        scores, inds = scores.sort(descending=True)
        return torch.cat([boxes[inds], scores[:, None]], -1), inds
    cfg = dict(nms_cfg)
    if "iou_thr" in cfg:  # mmcv's deprecated name
        cfg["iou_threshold"] = cfg.pop("iou_thr")
    class_agnostic = cfg.pop("class_agnostic", class_agnostic)
    op = cfg.pop("type", "nms")
    if op != "nms":
        raise MmcvOpUnavailable(
            f"batched_nms: nms_cfg type {op!r} needs the compiled mmcv; the mmcv-lite ops from "
            "paploss.integrations.mmcv_ops provide type='nms' only"
        )
    if boxes.size(-1) != 4:
        raise MmcvOpUnavailable("batched_nms: rotated boxes ([N, 5]) need the compiled mmcv")
    if class_agnostic or boxes.numel() == 0:
        boxes_for_nms = boxes
    else:
        max_coordinate = boxes.max()
        offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
        boxes_for_nms = boxes + offsets[:, None]
    split_thr = cfg.pop("split_thr", 10000)
    if boxes_for_nms.shape[0] < split_thr:
        dets, keep = nms(boxes_for_nms, scores, **cfg)
        boxes = boxes[keep]
        scores = dets[:, -1]
    else:
        max_num = cfg.pop("max_num", -1)
        total_mask = scores.new_zeros(scores.size(), dtype=torch.bool)
        scores_after = scores.new_zeros(scores.size())
        for cluster in torch.unique(idxs):
            mask = (idxs == cluster).nonzero(as_tuple=False).view(-1)
            dets, keep = nms(boxes_for_nms[mask], scores[mask], **cfg)
            total_mask[mask[keep]] = True
            scores_after[mask[keep]] = dets[:, -1]
        keep = total_mask.nonzero(as_tuple=False).view(-1)
        scores, order = scores_after[keep].sort(descending=True)
        keep = keep[order]
        boxes = boxes[keep]
        if max_num > 0:
            keep, boxes, scores = keep[:max_num], boxes[:max_num], scores[:max_num]
    return torch.cat([boxes, scores[:, None]], -1), keep


# --------------------------------------------------------------------- roi align
def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    pool_mode: str = "avg",
    aligned: bool = True,
) -> Tensor:
    """``mmcv.ops.roi_align`` through ``torchvision.ops.roi_align``.

    input: [B, C, H, W]; rois: [K, 5] (batch index, x1, y1, x2, y2).
    Returns [K, C, oh, ow]. ``sampling_ratio <= 0`` is adaptive in both libraries.
    """
    import torchvision

    if pool_mode != "avg":
        raise MmcvOpUnavailable(f"roi_align: pool_mode={pool_mode!r} needs the compiled mmcv (only 'avg')")
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    return torchvision.ops.roi_align(
        input, rois.to(input.dtype), tuple(output_size), float(spatial_scale), int(sampling_ratio), bool(aligned)
    )


class RoIAlign(torch.nn.Module):
    """``mmcv.ops.RoIAlign`` (the layer Faster R-CNN's RoI extractor builds) on torchvision."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        pool_mode: str = "avg",
        aligned: bool = True,
        use_torchvision: bool = False,
    ) -> None:
        super().__init__()
        if pool_mode != "avg":
            raise MmcvOpUnavailable(f"RoIAlign: pool_mode={pool_mode!r} needs the compiled mmcv (only 'avg')")
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.pool_mode = pool_mode
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.pool_mode, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned} (torchvision)"
        )


# -------------------------------------------------------------------- focal loss
def sigmoid_focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: float = 0.25,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``mmcv.ops.sigmoid_focal_loss`` in plain torch (mmdet's FocalLoss calls it on GPU).

    input: [N, C] logits; target: [N] class indices, ``C`` meaning background
    (no positive class). With p = sigmoid(x) and y the one-hot target,
    ``l = -alpha y (1-p)^gamma log p - (1-alpha)(1-y) p^gamma log(1-p)``,
    elementwise [N, C]; ``weight`` [N] multiplies rows; ``mean`` divides the sum
    by N (as mmcv's kernel wrapper does).
    """
    num_classes = input.size(1)
    y = torch.nn.functional.one_hot(target.long(), num_classes + 1)[:, :num_classes].to(input.dtype)
    p = input.sigmoid()
    log_p = torch.nn.functional.logsigmoid(input)
    log_not_p = torch.nn.functional.logsigmoid(-input)
    loss = -alpha * y * (1 - p).pow(gamma) * log_p - (1 - alpha) * (1 - y) * p.pow(gamma) * log_not_p
    if weight is not None:
        loss = loss * weight.view(-1, 1)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / input.size(0)
    raise ValueError(f"sigmoid_focal_loss: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def get_compiler_version() -> str:
    return "none: mmcv-lite, ops from torchvision via paploss.integrations.mmcv_ops"


def get_compiling_cuda_version() -> str:
    return "none: mmcv-lite, ops from torchvision via paploss.integrations.mmcv_ops"


_PROVIDED: dict[str, Any] = {
    "nms": nms,
    "batched_nms": batched_nms,
    "roi_align": roi_align,
    "RoIAlign": RoIAlign,
    "sigmoid_focal_loss": sigmoid_focal_loss,
    "get_compiler_version": get_compiler_version,
    "get_compiling_cuda_version": get_compiling_cuda_version,
}


def _unavailable(name: str) -> type:
    """A class standing for an op we do not provide: importing it works, using it raises."""

    def _refuse(cls, *args, **kwargs):
        raise MmcvOpUnavailable(
            f"mmcv.ops.{name} needs the compiled mmcv (mmcv._ext), which is not installed: "
            f"mmcv-lite is, and paploss.integrations.mmcv_ops provides only {sorted(_PROVIDED)}. "
            "Install the full mmcv built for your torch to use this operation."
        )

    return type(name, (torch.nn.Module,), {"__new__": _refuse, "__module__": _PACKAGE, "__doc__": f"Unavailable: {name}."})


# -------------------------------------------------------------------- the finder
class _OpsModule(types.ModuleType):
    """``mmcv.ops`` or one of its submodules: provided names, else an unavailable op."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = _PROVIDED.get(name)
        if value is None:
            value = _unavailable(name)
        setattr(self, name, value)  # the same object on every access
        return value


class _OpsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == _PACKAGE or fullname.startswith(_PACKAGE + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _OpsModule(spec.name)
        module.__path__ = []  # a package, so ``mmcv.ops.nms`` etc. import too
        return module

    def exec_module(self, module):
        module.__dict__.update(_PROVIDED)


def _has_compiled_mmcv() -> bool:
    try:
        return importlib.util.find_spec("mmcv._ext") is not None
    except ModuleNotFoundError:  # no mmcv at all
        return False


def installed() -> bool:
    """True when ``mmcv.ops`` is (or will be) served from this module."""
    return any(isinstance(f, _OpsFinder) for f in sys.meta_path)


def install() -> bool:
    """Serve ``mmcv.ops`` from this module when the compiled mmcv is missing.

    Idempotent; returns True when the replacement is active. Must run before
    ``mmdet.models`` is first imported (``paploss.integrations.mmdet`` does it
    on import, which ``custom_imports`` in a config triggers before the model is built).
    """
    if installed():
        return True
    if _has_compiled_mmcv():
        return False
    if _PACKAGE in sys.modules and not isinstance(sys.modules[_PACKAGE], _OpsModule):
        return False  # a working mmcv.ops was already imported by someone else
    sys.meta_path.insert(0, _OpsFinder())
    return True
