"""What a training run depends on (:class:`TrainConfig`) and what it gives back (:class:`TrainResult`).

A trial is a pure function of its :class:`TrainConfig`; the engine
(:mod:`paploss.engine`) and the MMDetection integration
(:mod:`paploss.integrations.mmdet_train`) both take one and return a
:class:`TrainResult`, so neither imports the other for its types.
:data:`PROXY_PRESETS` are named sets of its fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from paploss import storage

__all__ = ["MMDET_PREFIX", "PROXY_PRESETS", "TrainConfig", "TrainResult"]

MMDET_PREFIX = "mmdet:"  # detector = "mmdet:<config file>": an MMDetection model (optional extra)


@dataclass
class TrainConfig:
    """Everything a training run depends on (a trial is a pure function of it).

    ``data``: dataset folder or ``s3://`` prefix with ``images/`` and
    ``annotations/<split>.json``; ``train_ann`` / ``val_ann`` name the splits.
    ``loss``: ``"focal+l1" | "focal+giou" | "paploss"`` (``spec`` needed for paploss).
    ``detector``: a name of ``paploss.models.DETECTORS`` (torchvision), of
    ``paploss.spec_set.MMDET_DETECTORS`` (an MMDetection config shipped in the package,
    found where the training runs) or ``mmdet:<config file>`` (a user's own).
    Exactly one of ``iterations`` and ``epochs`` sets the length.  ``lr_steps`` are
    fractions of the run.  ``init``: backbone file written by :func:`pretrain`.
    ``num_threads``: torch CPU threads (1 is fastest on a shared, loaded CPU).
    """

    data: str
    train_ann: str = "train"
    val_ann: str = "val"
    loss: str = "focal+l1"
    spec: Any = None  # LossSpec | dict | None
    detector: str = "retinanet_mobilenet_v3_small"
    image_size: int = 128
    fpn_channels: int = 64
    width_mult: float = 1.0
    head_norm: bool = True
    anchor_size: float = 16.0
    quality: str = "giou"
    top_k: int | None = 100_000
    batch_size: int = 8
    iterations: int | None = None
    epochs: float | None = None
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    lr_steps: tuple[float, ...] = (0.75, 0.9)
    lr_gamma: float = 0.1
    grad_clip: float | None = 10.0
    hflip: bool = True
    init: str | None = None
    backbone_weights: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_threads: int | None = None
    out_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = True
    diverge_patience: int = 50
    box_collapse: float | None = None  # stop when the positives' mean box quality u stays below this (module doc)
    detach_i3: bool = False  # PAP loss without the gradient into u through I3 (paploss.loss.pap_loss; not SPEC §1);
    # on an MMDetection detector where its head takes it (PAPLossDeformableDETRHead)
    eval_batch_size: int = 16
    max_val_images: int | None = None

    def __post_init__(self) -> None:
        from paploss.spec import LossSpec
        from paploss.spec_set import MMDET_DETECTORS, SpecSet, check_spec, is_mmdet, read_spec

        if isinstance(self.spec, dict):
            self.spec = read_spec(self.spec)
        elif isinstance(self.spec, str):
            self.spec = read_spec(storage.read_text(self.spec) if not self.spec.lstrip().startswith("{") else self.spec)
        if self.spec is not None and not isinstance(self.spec, (LossSpec, SpecSet)):
            raise ValueError(f"spec must be a LossSpec, a SpecSet, a dict or JSON, got {type(self.spec).__name__}")
        from paploss.models import DETECTORS, check_loss  # here: a config is read without torchvision

        check_loss(self.loss, self.spec)
        if self.detector.startswith(MMDET_PREFIX):
            if not self.detector[len(MMDET_PREFIX):]:
                raise ValueError(f"detector {self.detector!r} names no MMDetection config file after {MMDET_PREFIX!r}")
        elif self.detector not in DETECTORS and self.detector not in MMDET_DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}; known: {sorted({*DETECTORS, *MMDET_DETECTORS})} "
                             f"or {MMDET_PREFIX}<config file>")
        else:
            check_spec(self.detector, self.spec)
        if (self.iterations is None) == (self.epochs is None):
            raise ValueError(f"give exactly one of iterations and epochs (got iterations={self.iterations}, epochs={self.epochs})")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        for name in ("batch_size", "image_size", "fpn_channels", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.box_collapse is not None and not 0.0 < self.box_collapse < 1.0:
            raise ValueError(f"box_collapse is a box quality u in (0, 1), got {self.box_collapse}")
        if self.box_collapse is not None and (self.loss != "paploss" or is_mmdet(self.detector)):
            raise ValueError(f"box_collapse needs the PAP loss on a paploss detector (loss={self.loss!r}, "
                             f"detector={self.detector!r}): only there is the positives' box quality u at hand")
        if self.detach_i3 and self.loss != "paploss":
            # an MMDetection detector takes it where its head does (a Deformable DETR); a head without
            # the switch is refused when its config is built (paploss.integrations.mmdet_train)
            raise ValueError(f"detach_i3 needs the PAP loss (loss={self.loss!r}): it changes the PAP loss's gradient")
        self.lr_steps = tuple(float(s) for s in self.lr_steps)
        if any(not 0 < s <= 1 for s in self.lr_steps):
            raise ValueError(f"lr_steps are fractions of the run in (0, 1], got {self.lr_steps}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec.to_dict() if self.spec is not None else None
        d["lr_steps"] = list(self.lr_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        """A config from :data:`PROXY_PRESETS` with ``overrides`` (``data`` among them)."""
        if name not in PROXY_PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PROXY_PRESETS)}")
        return cls(**{**PROXY_PRESETS[name], **overrides})


# Proxy presets: TrainConfig fields.  "quick" is the default proxy trial: 150
# iterations of batch 8 at 128 px from the pre-trained MobileNetV3-Small backbone
# (3-5 minutes measured on the 2 shared, loaded CPU cores of the development
# machine; see docs/detection.md and BENCHMARKS.md for how it was chosen).
PROXY_PRESETS: dict[str, dict] = {
    "smoke": dict(train_ann="search_train", val_ann="search_val", detector="retinanet_mobilenet_v3_small",
                  image_size=64, fpn_channels=32, anchor_size=8.0, batch_size=4, iterations=6, warmup_iters=2,
                  lr=0.01, num_threads=1, max_val_images=16),
    "quick": dict(train_ann="search_train", val_ann="search_val", detector="retinanet_mobilenet_v3_small",
                  image_size=128, fpn_channels=64, anchor_size=16.0, batch_size=8, iterations=150,
                  warmup_iters=30, lr=0.01, num_threads=1),
    "paper": dict(train_ann="search_train", val_ann="search_val", detector="retinanet_resnet50",
                  image_size=512, fpn_channels=256, head_norm=False, anchor_size=32.0, batch_size=16, epochs=1,
                  lr=0.016, warmup_iters=500, lr_steps=(1.0,), grad_clip=None),
}


@dataclass
class TrainResult:
    """What a run gives back: ``metrics`` (COCO AP on ``val_ann``; zeros when
    diverged), ``losses`` per iteration, the checkpoint URI, wall seconds;
    ``box_collapsed``: stopped early by the box-collapse stop (``TrainConfig.box_collapse``);
    ``box_quality``: with the PAP loss, the positives' mean box quality u per iteration
    (NaN where a batch had no positive; empty for the other losses)."""

    metrics: dict[str, float]
    diverged: bool
    losses: list[float] = field(default_factory=list)
    checkpoint: str | None = None
    seconds: float = 0.0
    iterations: int = 0
    box_collapsed: bool = False
    box_quality: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)
