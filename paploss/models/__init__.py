"""Detectors wired to the loss switch (``focal+l1``, ``focal+giou``, ``paploss``)."""

from __future__ import annotations

from paploss.models.backbones import BACKBONES, build_backbone
from paploss.models.retinanet import LOSSES, build_retinanet, check_loss

__all__ = ["BACKBONES", "DETECTORS", "LOSSES", "build_backbone", "build_detector", "check_loss"]

# detector name -> (family, backbone)
DETECTORS = {
    "retinanet_mobilenet_v3": ("retinanet", "mobilenet_v3_large"),
    "retinanet_mobilenet_v3_small": ("retinanet", "mobilenet_v3_small"),
    "retinanet_resnet50": ("retinanet", "resnet50"),
    "faster_rcnn_mobilenet_v3": ("faster_rcnn", "mobilenet_v3_large"),
    "faster_rcnn_mobilenet_v3_small": ("faster_rcnn", "mobilenet_v3_small"),
}


def build_detector(name: str, num_classes: int, **kwargs):
    """Build detector ``name`` (see :data:`DETECTORS`); ``kwargs`` go to the family's builder.

    ``spec``: a :class:`~paploss.spec.LossSpec`, or for a Faster R-CNN also a
    :class:`~paploss.spec_set.SpecSet` with one spec per head (``rpn``, ``roi``)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}")
    family, backbone = DETECTORS[name]
    if kwargs.get("spec") is not None:
        from paploss.spec_set import check_spec

        check_spec(name, kwargs["spec"])
    if family == "retinanet":
        return build_retinanet(num_classes, backbone=backbone, **kwargs)
    if family == "faster_rcnn":
        from paploss.models.faster_rcnn import build_faster_rcnn

        return build_faster_rcnn(num_classes, backbone=backbone, **kwargs)
    raise AssertionError(family)  # pragma: no cover
