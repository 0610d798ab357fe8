"""Backbones with a feature pyramid for the dense detectors, built from scratch.

``mobilenet_v3`` (large or small, any width multiplier) returns the feature maps
at strides 8, 16 and 32, and ``resnet50`` those of C3-C5, each through an FPN with
``fpn_channels`` channels, plus P6 and P7 (strides 64, 128) as RetinaNet uses.

No weights are downloaded unless ``weights="DEFAULT"`` (torchvision's ImageNet
weights) is asked for explicitly; the warm start of this project instead loads the
backbone body saved by :func:`paploss.engine.pretrain`.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small, resnet50
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

__all__ = ["BACKBONES", "build_backbone"]

# feature indices (in ``model.features`` / resnet layer names) at strides 8, 16, 32
_MOBILENET_LAYERS = {
    "mobilenet_v3_large": (mobilenet_v3_large, ("4", "7", "16")),
    "mobilenet_v3_small": (mobilenet_v3_small, ("2", "4", "12")),
}
BACKBONES = (*_MOBILENET_LAYERS, "resnet50")


def build_backbone(name: str, fpn_channels: int = 256, width_mult: float = 1.0, weights: str | None = None) -> BackboneWithFPN:
    """A ``BackboneWithFPN`` whose ``body`` is the classification trunk (what
    pre-training trains and ``init`` loads) and whose output is 5 levels P3-P7 of
    ``fpn_channels`` channels each: ``[N, C, H/8, W/8] .. [N, C, H/128, W/128]``."""
    if name in _MOBILENET_LAYERS:
        factory, layers = _MOBILENET_LAYERS[name]
        kwargs = {"width_mult": width_mult} if weights is None else {}
        trunk = factory(weights=weights, **kwargs).features
        in_channels = [trunk[int(i)].out_channels for i in layers]
        return_layers = {layer: str(k) for k, layer in enumerate(layers)}
    elif name == "resnet50":
        net = resnet50(weights=weights)
        trunk = nn.Sequential()
        for child in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            trunk.add_module(child, getattr(net, child))
        in_channels = [512, 1024, 2048]
        return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
    else:
        raise ValueError(f"unknown backbone {name!r}; known: {list(BACKBONES)}")
    return BackboneWithFPN(
        trunk, return_layers, in_channels, fpn_channels, extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels)
    )
