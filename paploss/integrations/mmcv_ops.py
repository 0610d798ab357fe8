"""``mmcv.ops`` for ``mmcv-lite``: the few operations our detectors need, from torchvision and torch.

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
``MultiScaleDeformableAttention``  Deformable DETR's attention layer (mmcv's parameters,
                          initialisation and forward), sampling through
``multi_scale_deformable_attn_pytorch``  ``F.grid_sample`` (bilinear, zero padding,
                          ``align_corners=False``), on CPU and GPU alike
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
    "multi_scale_deformable_attn_pytorch",
    "MultiScaleDeformableAttention",
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


# ------------------------------------------------ multi-scale deformable attention
def _level_shapes(value_spatial_shapes: Tensor | Any) -> list[tuple[int, int]]:
    shapes = torch.as_tensor(value_spatial_shapes).tolist()
    if not shapes or any(len(hw) != 2 or min(hw) < 1 for hw in shapes):
        raise ValueError(f"multi_scale_deformable_attn: value_spatial_shapes must be [L, 2] of positive (h, w), got {shapes}")
    return [(int(h), int(w)) for h, w in shapes]


def multi_scale_deformable_attn_pytorch(
    value: Tensor,
    value_spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR, eq. 3), mmcv's formula in torch.

    Shapes: ``value`` [B, S, M, D] (S = sum over levels of h_l w_l, the levels'
    pixels flattened row-major and concatenated; M heads of D channels);
    ``value_spatial_shapes`` [L, 2] of (h_l, w_l); ``sampling_locations``
    [B, Q, M, L, P, 2] of (x, y) in [0, 1] of each level (0 and 1 are the outer
    edges of its first and last pixel); ``attention_weights`` [B, Q, M, L, P].
    Returns [B, Q, M·D]::

        out[b, q, m·D:(m+1)·D] = sum_{l, p} a[b, q, m, l, p] · V_{b,m,l}(loc[b, q, m, l, p])

    where ``V_{b,m,l}(x, y)`` [D] samples head m's channels of level l bilinearly at
    pixel coordinates ``(x w_l - 1/2, y h_l - 1/2)`` (pixel centres at integers),
    reading 0 outside the map: ``F.grid_sample(mode='bilinear', padding_mode='zeros',
    align_corners=False)`` on ``2 loc - 1``. Differentiable in ``value``,
    ``sampling_locations`` and ``attention_weights``. The compiled mmcv uses a CUDA
    kernel on GPU; this runs the same maths on every device.
    """
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError(
            "multi_scale_deformable_attn: expected value [B, S, M, D], sampling_locations [B, Q, M, L, P, 2] and "
            f"attention_weights [B, Q, M, L, P], got {tuple(value.shape)}, {tuple(sampling_locations.shape)} "
            f"and {tuple(attention_weights.shape)}"
        )
    bs, num_keys, num_heads, dims = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = _level_shapes(value_spatial_shapes)
    if (
        sampling_locations.shape[0] != bs
        or sampling_locations.shape[2] != num_heads
        or sampling_locations.shape[-1] != 2
        or attention_weights.shape != sampling_locations.shape[:-1]
        or len(shapes) != num_levels
    ):
        raise ValueError(
            f"multi_scale_deformable_attn: shapes do not agree: value {tuple(value.shape)}, "
            f"{len(shapes)} levels, sampling_locations {tuple(sampling_locations.shape)}, "
            f"attention_weights {tuple(attention_weights.shape)}"
        )
    if sum(h * w for h, w in shapes) != num_keys:
        raise ValueError(
            f"multi_scale_deformable_attn: value has {num_keys} keys but the levels {shapes} hold "
            f"{sum(h * w for h, w in shapes)} pixels"
        )
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1                                     # [B, Q, M, L, P, 2] in [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = value_list[level].flatten(2).transpose(1, 2).reshape(bs * num_heads, dims, h, w)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)            # [B·M, Q, P, 2]
        sampled.append(torch.nn.functional.grid_sample(
            v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # [B·M, D, Q, P]
    weights = attention_weights.transpose(1, 2).reshape(bs * num_heads, 1, num_queries, num_levels * num_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)     # [B·M, D, Q]
    return out.view(bs, num_heads * dims, num_queries).transpose(1, 2).contiguous()


def _base_module() -> type:
    try:
        from mmengine.model import BaseModule
    except ImportError:  # mmengine is part of every MMDetection install; plain torch keeps this file importable
        return torch.nn.Module
    return BaseModule


class MultiScaleDeformableAttention(_base_module()):
    """``mmcv.ops.MultiScaleDeformableAttention`` on :func:`multi_scale_deformable_attn_pytorch`.

    The same constructor, parameters (``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``: checkpoints load either way), initialisation and
    forward as mmcv 2.1. For a query q with reference point r (``[..., 2]``: a
    point (x, y); ``[..., 4]``: a box (x, y, w, h)), every head m, level l and
    point p samples at::

        loc = r + offset_{m,l,p}(q) / (w_l, h_l)                  (points)
        loc = r_xy + offset_{m,l,p}(q) / P · r_wh / 2             (boxes)

    with weights ``softmax over (l, p) of attention_weights(q)`` per head; the
    output is ``dropout(output_proj(sum)) + identity``. Tensors are
    ``(n, batch, dims)``, or ``(batch, n, dims)`` with ``batch_first=True``.
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        norm_cfg: dict | None = None,
        init_cfg: dict | None = None,
        value_proj_ratio: float = 1.0,
    ) -> None:
        if _base_module() is torch.nn.Module:
            super().__init__()
        else:
            super().__init__(init_cfg)
        if embed_dims % num_heads != 0:
            raise ValueError(f"MultiScaleDeformableAttention: embed_dims {embed_dims} must be divisible by num_heads {num_heads}")
        self.norm_cfg = norm_cfg
        self.dropout = torch.nn.Dropout(dropout)
        self.batch_first = batch_first
        self.im2col_step = im2col_step  # kept for mmcv's signature; the torch path needs no column step
        self.embed_dims = embed_dims
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = torch.nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = torch.nn.Linear(embed_dims, num_heads * num_levels * num_points)
        value_proj_size = int(embed_dims * value_proj_ratio)
        self.value_proj = torch.nn.Linear(embed_dims, value_proj_size)
        self.output_proj = torch.nn.Linear(value_proj_size, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's: zero offsets but a bias pointing head m at angle 2πm/M, point p at distance
        p + 1 (in pixels of each level); uniform attention; Xavier projections."""
        torch.nn.init.zeros_(self.sampling_offsets.weight)
        device = self.sampling_offsets.weight.device
        thetas = torch.arange(self.num_heads, dtype=torch.float32, device=device) * (2.0 * torch.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32, device=device).view(1, 1, -1, 1)
        self.sampling_offsets.bias.data = grid.view(-1)
        torch.nn.init.zeros_(self.attention_weights.weight)
        torch.nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            torch.nn.init.xavier_uniform_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        self._is_init = True

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """query [Q, B, E] (or [B, Q, E]); value [S, B, E] (default: query);
        key_padding_mask [B, S] (True: padding, read as 0); reference_points
        [B, Q, L, 2 or 4] in [0, 1]; spatial_shapes [L, 2] (h, w). Returns query's shape.
        ``residual``, mmcv's old name of ``identity``, is still read."""
        if "residual" in kwargs:
            if identity is not None:
                raise ValueError("MultiScaleDeformableAttention: give identity or its old name residual, not both")
            identity = kwargs.pop("residual")
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        if reference_points is None or spatial_shapes is None:
            raise ValueError("MultiScaleDeformableAttention: reference_points and spatial_shapes are required")
        bs, num_query, _ = query.shape
        _, num_value, _ = value.shape
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(bs, num_query, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(bs, num_query, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(bs, num_query, self.num_heads, self.num_levels, self.num_points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)   # (w, h)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(
                f"MultiScaleDeformableAttention: reference_points must end in 2 or 4 numbers, got {tuple(reference_points.shape)}"
            )
        output = self.output_proj(multi_scale_deformable_attn_pytorch(value, spatial_shapes, locations, weights))
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity


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
    "multi_scale_deformable_attn_pytorch": multi_scale_deformable_attn_pytorch,
    "MultiScaleDeformableAttention": MultiScaleDeformableAttention,
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
    _register_attention()
    return True


def _register_attention() -> None:
    """Put :class:`MultiScaleDeformableAttention` in mmengine's ``MODELS`` registry, as
    mmcv's own module does on import (configs may build it by type name)."""
    try:
        from mmengine.registry import MODELS
    except ImportError:
        return
    if "MultiScaleDeformableAttention" not in MODELS.module_dict:
        MODELS.register_module(name="MultiScaleDeformableAttention", module=MultiScaleDeformableAttention)
