"""Train and evaluate an MMDetection config as one paploss run (a proxy trial or a final training).

:func:`train` is the MMDetection twin of :func:`paploss.engine.train`: it takes the
same :class:`paploss.config.TrainConfig` (data folder with ``images/`` and
``annotations/<split>.json``, loss, spec, schedule, seed, divergence patience)
plus the path of an MMDetection config that defines the model, and returns a
:class:`paploss.config.TrainResult` with COCO AP on ``cfg.val_ann`` under the
engine's metric names (``AP``, ``AP50``, ...). So a pipeline whose detector names
an MMDetection config (``detector="mmdet:configs/mmdet/paploss_retinanet_tiny_shapes.py"``)
runs its trials through MMDetection with the rest of the search unchanged.

What comes from the MMDetection config: the model (backbone, neck, head layers,
anchors, assigner, test settings), the data pipelines (resize, flips) and the
runtime. What the TrainConfig overrides: the datasets (``CocoDataset`` on
``cfg.data``, classes from the annotation file), ``num_classes``, the head's loss
(``paploss`` -> :class:`~paploss.integrations.mmdet.PAPLossRetinaHead` with
``cfg.spec``; ``focal+l1`` / ``focal+giou`` -> MMDetection's ``RetinaHead`` with
Focal Loss and L1 / GIoU (weight 2, as MMDetection's ATSS/GFL configs); a Deformable
DETR head switches through :func:`paploss.integrations.mmdet_detr.switch_head`), the
schedule (iterations, SGD/AdamW, linear warm-up from ``warmup_factor`` over
``warmup_iters``, steps by ``lr_gamma`` at the fractions ``lr_steps``, gradient
clipping; the config's ``optim_wrapper.paramwise_cfg`` is kept), the seed and the work folder; and
for a config paploss ships (a detector name of ``paploss.spec_set.MMDET_DETECTORS``) the image size:
every ``Resize`` of its pipelines at ``cfg.image_size`` square (a user's own config keeps its sizes).
Divergence (SPEC §3): an iteration whose loss is not finite or equals 1.0 to 1e-6 is bad; after more than
``diverge_patience`` bad iterations the run stops with ``diverged=True`` and all
metrics 0.

Not supported (a clear error): ``cfg.init`` (the engine's warm-start file is a
torchvision backbone; give MMDetection weights in the config's ``load_from`` or
``init_cfg`` instead); ``cfg.detach_i3`` on a head without that switch (a RetinaNet:
only the Deformable DETR head takes it).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from paploss.integrations import mmdet as _mmdet  # noqa: F401  (registers the head, supplies mmcv.ops: first)
from paploss.integrations import mmdet_detr as _mmdet_detr  # registers PAPLossDeformableDETRHead

from mmengine.hooks import Hook  # noqa: E402
from mmengine.optim import DefaultOptimWrapperConstructor  # noqa: E402
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS  # noqa: E402

from paploss import storage  # noqa: E402
from paploss.spec_set import MMDET_DETECTORS  # noqa: E402

__all__ = ["DivergenceHook", "Diverged", "GroupedOptimWrapperConstructor", "build_config", "merge_param_groups", "train",
           "METRIC_KEYS"]

# MMDetection CocoMetric key -> paploss.evaluate.METRICS name
METRIC_KEYS = {
    "coco/bbox_mAP": "AP",
    "coco/bbox_mAP_50": "AP50",
    "coco/bbox_mAP_75": "AP75",
    "coco/bbox_mAP_s": "APs",
    "coco/bbox_mAP_m": "APm",
    "coco/bbox_mAP_l": "APl",
}

# the optimizer constructor of every run (registered below in mmengine's OPTIM_WRAPPER_CONSTRUCTORS)
GROUPED_CONSTRUCTOR = "GroupedOptimWrapperConstructor"


def merge_param_groups(groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups with equal settings (every key but ``params``) merged
    into one, in first-seen order; each parameter keeps its settings.

    With a ``paramwise_cfg`` mmengine gives every parameter a group of its own (160 for the
    tiny Deformable DETR), and the optimizer's per-group work then took most of a CPU
    training step; SGD and AdamW update each parameter from its group's settings alone,
    so merging changes no update (tests: the same steps as mmengine's own groups)."""
    merged: dict[tuple, dict] = {}
    for group in groups:
        key = tuple(sorted((k, repr(v)) for k, v in group.items() if k != "params"))
        if key in merged:
            merged[key]["params"].extend(group["params"])
        else:
            merged[key] = {**group, "params": list(group["params"])}
    return list(merged.values())


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class GroupedOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's optimizer construction (``paramwise_cfg`` included), then
    :func:`merge_param_groups` on the optimizer, before any scheduler reads its groups."""

    def __call__(self, model):
        wrapper = super().__call__(model)
        wrapper.optimizer.param_groups[:] = merge_param_groups(wrapper.optimizer.param_groups)
        return wrapper


class Diverged(RuntimeError):
    """Raised by :class:`DivergenceHook` to stop a run that diverged (SPEC §3)."""


class DivergenceHook(Hook):
    """Counts bad iterations (loss not finite, or 1.0 to 1e-6) and stops after ``patience`` of them.

    The loss read is ``loss_pap`` when the model has it (the PAP loss; with a Deformable
    DETR the last decoder layer's), else the total ``loss``. Also reports every
    iteration's loss to ``on_step(iteration, loss)`` and keeps the metrics of the last
    validation.
    """

    priority = "VERY_LOW"

    def __init__(self, patience: int = 50, on_step: Callable[[int, float], None] | None = None) -> None:
        if patience < 0:
            raise ValueError(f"diverge_patience must be >= 0, got {patience}")
        self.patience = int(patience)
        self.on_step = on_step
        self.bad = 0
        self.losses: list[float] = []
        self.metrics: dict[str, float] | None = None

    def observe(self, iteration: int, loss: float) -> None:
        """Record one iteration's loss; raise :class:`Diverged` past the patience."""
        self.losses.append(loss)
        if self.on_step is not None:
            self.on_step(iteration, loss)
        if not math.isfinite(loss) or abs(loss - 1.0) <= 1e-6:
            self.bad += 1
            if self.bad > self.patience:
                raise Diverged(
                    f"diverged at iteration {iteration}: {self.bad} iterations with a loss that is NaN/Inf or 1.0 "
                    f"(patience {self.patience}; SPEC §3)"
                )

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        outputs = outputs or {}
        # the PAP loss itself where there is one: a Deformable DETR's total sums a PAP loss per
        # decoder layer, and only its last layer's ``loss_pap`` reads 1.0 when it collapses
        loss = outputs.get("loss_pap", outputs.get("loss"))
        if loss is None:
            raise KeyError(f"the model's train_step returned no 'loss' (got keys {sorted(outputs or {})})")
        self.observe(int(runner.iter), float(loss.detach() if hasattr(loss, "detach") else loss))

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.metrics = dict(metrics or {})


def _classes(ann_file: Path) -> tuple[str, ...]:
    coco = json.loads(ann_file.read_text())
    cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
    if not cats:
        raise ValueError(f"{ann_file}: no categories")
    return tuple(c["name"] for c in cats)


def _resized(pipeline: list, size: int, where: str) -> list:
    """``pipeline`` with every ``Resize`` step at ``size`` x ``size`` (its ``keep_ratio`` kept)."""
    steps = [dict(step) for step in pipeline]
    resizes = [step for step in steps if step.get("type") == "Resize"]
    if not resizes:
        raise ValueError(f"the MMDetection config's {where}.dataset.pipeline has no Resize step to set image_size {size} on")
    for step in resizes:
        step["scale"] = (int(size), int(size))
    return steps


def _dataset(base: Any, where: str, data_root: str, ann: str, classes, test_mode: bool, limit: int | None,
             image_size: int | None = None) -> dict:
    base = dict(base or {})
    if "pipeline" not in base:
        raise ValueError(
            f"the MMDetection config's {where}.dataset has no 'pipeline' (wrapped datasets such as RepeatDataset "
            "are not supported here): give the CocoDataset directly"
        )
    pipeline = base["pipeline"] if image_size is None else _resized(base["pipeline"], image_size, where)
    out = dict(
        type="CocoDataset", data_root=data_root, ann_file=f"annotations/{ann}.json", data_prefix=dict(img="images/"),
        metainfo=dict(classes=classes), pipeline=pipeline, test_mode=test_mode,
        filter_cfg=dict(filter_empty_gt=not test_mode),
    )
    if limit is not None:
        out["indices"] = int(limit)
    return out


def _head(head: dict, cfg) -> dict:
    if head.get("type") in _mmdet_detr.HEAD_TYPES:  # a Deformable DETR: its own loss switch (detach_i3 too)
        return _mmdet_detr.switch_head(head, cfg)
    if cfg.detach_i3:
        raise ValueError(f"detach_i3: the MMDetection head {head.get('type')!r} has no such switch (of the "
                         f"MMDetection heads only {_mmdet_detr.HEAD_TYPES[-1]} takes it); train without detach_i3")
    head = dict(head)
    for key in ("spec", "top_k", "quality"):
        head.pop(key, None)
    if cfg.loss == "paploss":
        head.update(type="PAPLossRetinaHead", spec=cfg.spec.to_dict(), top_k=cfg.top_k, quality=cfg.quality,
                    reg_decoded_bbox=False)
    else:
        focal = dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)
        if cfg.loss == "focal+l1":
            head.update(type="RetinaHead", loss_cls=focal, loss_bbox=dict(type="L1Loss", loss_weight=1.0),
                        reg_decoded_bbox=False)
        else:  # focal+giou
            head.update(type="RetinaHead", loss_cls=focal, loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
                        reg_decoded_bbox=True)
    return head


def build_config(config_file: str | os.PathLike, cfg, work_dir: str):
    """The MMDetection ``Config`` of one run: ``config_file`` with ``cfg``'s data, loss and schedule.

    ``cfg``: a :class:`paploss.config.TrainConfig`. Returns ``(mmengine Config, total iterations)``.
    """
    from mmengine.config import Config

    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"detector: no MMDetection config at {str(config_file)!r}")
    if cfg.init:
        raise ValueError(
            f"init={cfg.init!r}: the engine's warm-start file does not fit an MMDetection model; "
            "set load_from or the backbone's init_cfg in the MMDetection config instead"
        )
    if cfg.loss == "paploss" and cfg.spec is None:
        raise ValueError("loss 'paploss' needs a spec")
    loaded = Config.fromfile(str(config_file))
    # no yapf: formatting the config's text for the log and the checkpoint took half of a tiny model's training
    # (mmengine 0.10.7's fromfile drops its format_python_code for a plain config, hence the copy)
    mm = Config(loaded.to_dict(), cfg_text=loaded.text, filename=loaded.filename, format_python_code=False)
    if "model" not in mm or "bbox_head" not in mm.model:
        raise ValueError(
            f"{config_file}: the MMDetection config has no model.bbox_head (a RetinaNet-style or Deformable DETR "
            "detector is needed)"
        )
    data = storage.localize(cfg.data)
    train_json = data / "annotations" / f"{cfg.train_ann}.json"
    val_json = data / "annotations" / f"{cfg.val_ann}.json"
    for path in (train_json, val_json):
        if not path.is_file():
            raise FileNotFoundError(f"data: no annotation file {path} (from data={cfg.data!r})")
    classes = _classes(train_json)
    n_train = len(json.loads(train_json.read_text())["images"])
    total = cfg.iterations if cfg.iterations is not None else max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))

    mm.model.bbox_head = _head(mm.model.bbox_head.to_dict(), cfg)
    mm.model.bbox_head["num_classes"] = len(classes)
    root = str(data) + "/"
    # a config paploss ships (a detector name: spec_set.MMDET_DETECTORS) is sized by the TrainConfig; a user's own
    # (mmdet:<config file>) keeps its pipelines' sizes
    sized = cfg.image_size if cfg.detector in MMDET_DETECTORS else None
    train_loader = mm.get("train_dataloader") or {}
    val_loader = mm.get("val_dataloader") or {}
    mm.train_dataloader = dict(
        batch_size=cfg.batch_size, num_workers=0, persistent_workers=False,
        sampler=dict(type="InfiniteSampler", shuffle=True),
        dataset=_dataset(train_loader.get("dataset"), "train_dataloader", root, cfg.train_ann, classes, False, None,
                         sized),
    )
    mm.val_dataloader = dict(
        batch_size=cfg.eval_batch_size, num_workers=0, persistent_workers=False, drop_last=False,
        sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=_dataset(val_loader.get("dataset"), "val_dataloader", root, cfg.val_ann, classes, True, cfg.max_val_images,
                         sized),
    )
    mm.val_evaluator = dict(type="CocoMetric", ann_file=str(val_json), metric="bbox", format_only=False)
    for key in ("test_dataloader", "test_evaluator", "test_cfg"):
        mm.pop(key, None)
    mm.train_cfg = dict(type="IterBasedTrainLoop", max_iters=total, val_interval=total + 1)
    mm.val_cfg = dict(type="ValLoop")
    optimizer = (
        dict(type="SGD", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
        if cfg.optimizer == "sgd"
        else dict(type="AdamW", lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    )
    paramwise = (mm.get("optim_wrapper") or {}).get("paramwise_cfg")
    mm.optim_wrapper = dict(type="OptimWrapper", optimizer=optimizer, constructor=GROUPED_CONSTRUCTOR)
    if paramwise:  # the config's per-parameter multipliers (e.g. Deformable DETR's sampling offsets) stay
        mm.optim_wrapper["paramwise_cfg"] = paramwise
    if cfg.grad_clip:
        mm.optim_wrapper["clip_grad"] = dict(max_norm=float(cfg.grad_clip), norm_type=2)
    schedulers = []
    if cfg.warmup_iters > 0:
        # mmengine's LinearLR reaches the full rate at step end - 1; the engine's lr_at at warmup_iters
        schedulers.append(dict(type="LinearLR", start_factor=cfg.warmup_factor, by_epoch=False, begin=0,
                               end=cfg.warmup_iters + 1))
    milestones = sorted({round(s * total) for s in cfg.lr_steps if round(s * total) < total})
    if milestones:
        schedulers.append(dict(type="MultiStepLR", by_epoch=False, begin=0, end=total, milestones=milestones,
                               gamma=cfg.lr_gamma))
    mm.param_scheduler = schedulers
    mm.auto_scale_lr = dict(enable=False, base_batch_size=cfg.batch_size)
    mm.default_hooks = dict(
        timer=dict(type="IterTimerHook"),
        logger=dict(type="LoggerHook", interval=max(1, min(50, total // 10 or 1))),
        param_scheduler=dict(type="ParamSchedulerHook"),
        # the final checkpoint only where it is kept (cfg.out_dir): None drops mmengine's default one
        checkpoint=(dict(type="CheckpointHook", interval=total, by_epoch=False, max_keep_ckpts=1) if cfg.out_dir
                    else None),
    )
    mm.custom_hooks = []
    mm.log_processor = dict(type="LogProcessor", window_size=10, by_epoch=False)
    mm.randomness = dict(seed=int(cfg.seed))
    mm.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                      dist_cfg=dict(backend="nccl" if cfg.device == "cuda" else "gloo"))
    mm.launcher = "none"
    mm.work_dir = work_dir
    mm.load_from = mm.get("load_from")
    mm.resume = False
    mm.visualizer = dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name=f"paploss-{time.time_ns()}")
    return mm, total


def train(config_file: str | os.PathLike, cfg, on_step: Callable[[int, float], None] | None = None):
    """Train the MMDetection config ``config_file`` as ``cfg`` says; see the module doc.

    Returns a :class:`paploss.config.TrainResult` (metrics under ``paploss.evaluate.METRICS``
    names, zeros when diverged or when nothing was detected).
    """
    import torch
    from mmengine.runner import Runner

    from paploss.config import TrainResult
    from paploss.evaluate import METRICS

    t0 = time.time()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    with tempfile.TemporaryDirectory(prefix="paploss-mmdet-") as tmp:
        work_dir = cfg.out_dir or tmp
        if storage.is_s3(work_dir):
            raise ValueError(f"out_dir={work_dir!r}: MMDetection writes its work folder locally; give a local out_dir")
        mm, total = build_config(config_file, cfg, work_dir)
        runner = Runner.from_cfg(copy.deepcopy(mm))
        hook = DivergenceHook(cfg.diverge_patience, on_step)
        runner.register_hook(hook, priority="VERY_LOW")
        zeros = {k: 0.0 for k in METRICS}
        try:
            runner.train()
        except Diverged:
            return TrainResult(metrics=zeros, diverged=True, losses=hook.losses, checkpoint=None,
                               seconds=time.time() - t0, iterations=len(hook.losses))
        raw = hook.metrics if hook.metrics is not None else (runner.val() or {})  # the loop validates at its end
        metrics = dict(zeros)
        metrics.update({METRIC_KEYS[k]: float(v) for k, v in raw.items() if k in METRIC_KEYS})
        checkpoint = Path(work_dir, f"iter_{total}.pth")
        return TrainResult(
            metrics=metrics, diverged=False, losses=hook.losses,
            checkpoint=str(checkpoint) if cfg.out_dir and checkpoint.exists() else None,
            seconds=time.time() - t0, iterations=len(hook.losses),
        )
