"""paploss: search a Parameterized AP Loss (Tao et al., NeurIPS 2021) for object detection.

The names below are imported lazily so that ``import paploss`` (and ``paploss --help``)
stays fast and does not pull in torch until it is needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LossSpec": "paploss.spec",
    "pap_loss": "paploss.loss",
    "scale_grad": "paploss.loss",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'paploss' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
