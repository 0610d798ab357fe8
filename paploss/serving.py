"""The registered detector as an MLflow model: a pyfunc that serves our checkpoint.

A registered version of ``paploss-retinanet`` is a real MLflow model, so a platform
loads it the way it loads any other::

    model = mlflow.pyfunc.load_model("models:/paploss-retinanet@champion")
    out = model.predict(images)          # images: uint8[B, H, W, 3]
    out[0]["boxes"], out[0]["scores"], out[0]["labels"]

Input: one ``numpy.ndarray`` of dtype ``uint8`` and shape ``[B, H, W, 3]``, a batch of
B RGB images of one size (channel last, values 0-255, as ``PIL.Image`` →
``numpy.asarray`` gives them; images of other sizes go in separate calls). The
detector resizes them itself as it did in training.

Parameter: ``score_threshold`` (default 0.05, the detectors' own): boxes scoring at or
below it are left out; ``model.predict(images, params={"score_threshold": 0.3})``.

Output: a list of B dicts, one per image, as torchvision's detectors give them:
``boxes`` float32[n, 4] (x0, y0, x1, y1 in the input image's pixels), ``scores``
float32[n] (descending) and ``labels`` int64[n], the COCO ``category_id`` of each box
(the dataset's own ids, not contiguous indices).

Safety: nothing is unpickled. The model folder holds the checkpoint as an artifact,
read by :func:`paploss.engine.load_checkpoint` (``torch.load(weights_only=True)``
through :mod:`paploss.checkpoints`), and a three-line ``model code`` file that
imports :class:`Detector` from this module (MLflow's models-from-code): the code that
runs is the installed ``paploss`` package's, never code carried in the artifact.
Loading therefore needs ``paploss`` installed (the project's image has it).
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import mlflow.pyfunc
import numpy as np

__all__ = ["Detector", "signature", "save_detector", "CHECKPOINT_ARTIFACT"]

#: The name of the checkpoint in the model's ``artifacts`` dict.
CHECKPOINT_ARTIFACT = "checkpoint"
#: The detectors' own score threshold (RetinaNet's and Faster R-CNN's default).
SCORE_THRESHOLD = 0.05

_MODEL_CODE = "from mlflow.models import set_model\nfrom paploss.serving import Detector\nset_model(Detector())\n"


def signature():
    """The model's signature: input uint8[-1, -1, -1, 3] (a batch of RGB images), parameter ``score_threshold``."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), name="images")]),
                          params=ParamSchema([ParamSpec("score_threshold", "double", SCORE_THRESHOLD)]))


def _batch(model_input: Any) -> np.ndarray:
    """``model_input`` checked: uint8[B, H, W, 3]; a ValueError naming what is wrong."""
    if isinstance(model_input, Mapping) and "images" in model_input:
        model_input = model_input["images"]
    arr = np.asarray(model_input)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = arr[None]  # one image
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images: expected an array of shape [B, H, W, 3] (RGB, channel last), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"images: expected dtype uint8 (values 0-255), got {arr.dtype}")
    if min(arr.shape[1:3]) < 1:
        raise ValueError(f"images: an image of size {arr.shape[1]}x{arr.shape[2]} has no pixels")
    return arr


class Detector(mlflow.pyfunc.PythonModel):
    """A paploss detector checkpoint behind MLflow's pyfunc interface (see the module doc)."""

    def load_context(self, context) -> None:
        from paploss.engine import load_checkpoint

        model, _, state = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self._model = model.eval()
        self._cat_ids = [int(c["id"]) for c in state["categories"]]

    def predict(self, context, model_input, params: dict | None = None) -> list[dict]:
        """Detections of a batch ``uint8[B, H, W, 3]`` → B dicts of ``boxes``, ``scores``, ``labels``."""
        import torch

        arr = _batch(model_input)
        threshold = float((params or {}).get("score_threshold", SCORE_THRESHOLD))
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"score_threshold={threshold}: expected a number in [0, 1)")
        owner = self._model.roi_heads if hasattr(getattr(self._model, "roi_heads", None), "score_thresh") else self._model
        images = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float().div_(255.0) for a in arr]
        before = owner.score_thresh
        try:
            owner.score_thresh = threshold
            with torch.no_grad():
                outputs = self._model(images)
        finally:
            owner.score_thresh = before
        ids = np.asarray(self._cat_ids, dtype=np.int64)
        return [{"boxes": o["boxes"].detach().cpu().numpy().astype(np.float32),
                 "scores": o["scores"].detach().cpu().numpy().astype(np.float32),
                 "labels": ids[o["labels"].detach().cpu().numpy()]} for o in outputs]


def _requirements() -> list[str]:
    out = []
    for name in ("mlflow", "torch", "torchvision", "numpy", "pycocotools"):
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def save_detector(path: str | Path, checkpoint: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the pyfunc model folder ``path`` (it must not exist) for the checkpoint
    file ``checkpoint``: ``MLmodel`` with :func:`signature`, the checkpoint under
    ``artifacts/``, the model-code file. ``metadata`` (lineage) goes into ``MLmodel``.
    Nothing is loaded or run here."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="paploss-model-") as tmp:
        code = Path(tmp, "detector.py")
        code.write_text(_MODEL_CODE)
        bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # the checkpoint's copy draws no bar
        with warnings.catch_warnings():  # no input example on purpose: saving runs no model
            warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
            mlflow.pyfunc.save_model(
                str(path), python_model=str(code), artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
                signature=signature(), pip_requirements=_requirements(), metadata=dict(metadata or {}),
            )
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar
    return path
