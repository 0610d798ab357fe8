"""One training engine for proxy trials and final trainings (SPEC §3-4).

``train(cfg)`` trains a detector on ``cfg.data`` (a dataset folder or ``s3://``
prefix in COCO layout), evaluates COCO AP on ``cfg.val_ann`` and returns a
:class:`TrainResult`.  Properties:

- **Repeatable.**  Weights are initialised from ``cfg.seed``; the image order and
  the flips of iteration ``i`` are a pure function of ``(seed, i)``.  A CPU run is
  bit-for-bit repeatable, and a run interrupted and resumed from its checkpoint
  ends with the same weights as an uninterrupted one.
- **Schedule.**  SGD (momentum 0.9, weight decay 1e-4) or AdamW; linear warm-up from
  ``warmup_factor * lr`` over ``warmup_iters``, then steps by ``lr_gamma`` at the
  fractions ``lr_steps`` of the run (SPEC §4 defaults).
- **Divergence stop (SPEC §3).**  An iteration whose loss is not finite, or equals
  1.0 to 1e-6 (the PAP loss of a collapsed ranking), is counted ("bad") and, when
  not finite, not applied.  After more than ``diverge_patience`` (50) bad
  iterations the run stops with ``diverged=True`` and all metrics 0 (reward 0).
- **Box-collapse stop** (``box_collapse``, off by default).  A PAP loss whose I3 rises
  faster than I1 (times the ranking term) is lowered by worse boxes: the positives' box
  quality u falls within tens of iterations, I3(u) goes to 0, and with it every
  classification gradient, so the detector finds nothing (docs/research/search-quality.md).
  With ``box_collapse = q``, more than ``diverge_patience`` iterations
  whose positives' mean u is below q stop the run with ``box_collapsed=True``; unlike a
  divergence, the model is evaluated as it is (its AP, near 0, is the reward).
- **Checkpoints** (``out_dir/checkpoint.pt``, atomic, local or ``s3://``) every
  ``checkpoint_every`` iterations and at the end, with ``metrics.json`` beside them;
  ``resume=True`` continues a run from its checkpoint.
- **DDP.**  Under ``torchrun`` (``WORLD_SIZE > 1``) each process takes
  ``batch_size / world_size`` images of every batch (gloo on CPU, nccl on CUDA);
  rank 0 evaluates and writes.  A step equals the single-process step on the global
  batch: the PAP loss ranks the entries of every process's images at once (gathered
  with autograd) and batch norm uses the global batch's statistics
  (:mod:`paploss.distributed`).
- **Mixed precision** (``amp``): bfloat16 autocast on a CUDA device that has it
  (``torch.cuda.is_bf16_supported()``), float32 elsewhere; the PAP loss and its box
  qualities are computed in float32 outside autocast either way.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from paploss import checkpoints, storage
from paploss.config import MMDET_PREFIX, PROXY_PRESETS, TrainConfig, TrainResult
from paploss.data.coco import load_coco
from paploss.data.dataset import CocoDetection
from paploss.distributed import convert_batchnorm
from paploss.evaluate import METRICS, evaluate_model
from paploss.models import DETECTORS, build_detector
from paploss.spec_set import is_mmdet, mmdet_config

__all__ = [
    "PROXY_PRESETS",
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate_checkpoint",
    "pretrain",
    "load_checkpoint",
    "build_model",
    "lr_at",
]

CHECKPOINT = "checkpoint.pt"
METRICS_FILE = "metrics.json"


# ----------------------------------------------------------------------------- helpers
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N)") from None


def lr_at(cfg: TrainConfig, it: int, total: int) -> float:
    """Learning rate of iteration ``it`` (0-based) of ``total``: linear warm-up from
    ``warmup_factor * lr`` to ``lr`` over ``warmup_iters``, times ``lr_gamma`` for every
    step fraction passed."""
    factor = 1.0
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor = cfg.warmup_factor * (1 - alpha) + alpha
    drops = sum(1 for s in cfg.lr_steps if it >= round(s * total))
    return cfg.lr * factor * cfg.lr_gamma**drops


def batch_plan(seed: int, it: int, batch_size: int, n: int) -> tuple[list[int], list[bool]]:
    """Image indices and flips of iteration ``it``: epoch-wise seeded permutations of
    ``range(n)``, read as one endless stream; flips from a generator seeded by ``(seed, it)``."""
    idx = []
    for p in range(it * batch_size, (it + 1) * batch_size):
        epoch, k = divmod(p, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        idx.append(int(torch.randperm(n, generator=g)[k]))
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * (it + 1))
    flips = (torch.rand(batch_size, generator=g) < 0.5).tolist()
    return idx, flips


def amp_enabled(amp: bool, device: torch.device) -> bool:
    """Whether a run with ``amp`` trains under bfloat16 autocast on ``device``: only on
    a CUDA device that supports bfloat16 (float32 otherwise, e.g. on CPU)."""
    return bool(amp) and device.type == "cuda" and torch.cuda.is_bf16_supported()


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def load_split(root: Path, name: str, check_images: bool = True) -> dict:
    ann = root / "annotations" / f"{name}.json"
    if not ann.exists():
        have = sorted(p.stem for p in (root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
        raise FileNotFoundError(f"no split {name!r}: {ann} does not exist (splits here: {have})")
    return load_coco(ann, images_dir=root / "images" if check_images else None)


def build_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    _family, _backbone = DETECTORS[cfg.detector]
    return build_detector(
        cfg.detector, num_classes, loss=cfg.loss, spec=cfg.spec, image_size=cfg.image_size,
        fpn_channels=cfg.fpn_channels, width_mult=cfg.width_mult, head_norm=cfg.head_norm,
        anchor_size=cfg.anchor_size, quality=cfg.quality, top_k=cfg.top_k, backbone_weights=cfg.backbone_weights,
        detach_i3=cfg.detach_i3,
    )


def load_backbone(model: torch.nn.Module, init: str, cfg: TrainConfig) -> dict:
    """Load the backbone body saved by :func:`pretrain` into ``model.backbone.body``."""
    blob = checkpoints.load(init, checkpoints.BACKBONE, keys=("backbone", "state_dict"))
    want = DETECTORS[cfg.detector][1]
    if blob["backbone"] != want or float(blob.get("width_mult", 1.0)) != float(cfg.width_mult):
        raise ValueError(
            f"{init}: backbone {blob['backbone']} (width {blob.get('width_mult', 1.0)}) does not fit detector "
            f"{cfg.detector} (backbone {want}, width {cfg.width_mult})"
        )
    model.backbone.body.load_state_dict(blob["state_dict"])
    return blob


def _is_bad(loss: float, heads: tuple[float, ...] = ()) -> bool:
    """SPEC §3's sign of a failed training: the loss is NaN or exactly 1.0 (to 1e-6).
    With several PAP-loss heads (Faster R-CNN's RPN and RoI head: ``heads``, each one's
    loss) the sum is their count when all collapse, so each is checked for 1.0."""
    if not math.isfinite(loss) or abs(loss - 1.0) <= 1e-6:
        return True
    return len(heads) > 1 and all(abs(h - 1.0) <= 1e-6 for h in heads)


# ----------------------------------------------------------------------------- train
def train(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None, progress: bool = True) -> TrainResult:
    """Train ``cfg`` and evaluate it on ``cfg.val_ann``; see the module docstring.

    An MMDetection detector (``cfg.detector`` a name of ``paploss.spec_set.MMDET_DETECTORS``,
    whose config this installation ships, or ``"mmdet:<config file>"``) trains that config
    instead (``paploss.integrations.mmdet_train``, needs the ``mmdet`` extra), with the same
    schedule, loss switch, divergence stop and metrics."""
    if is_mmdet(cfg.detector):
        from paploss.integrations.mmdet_train import train as mmdet_train

        return mmdet_train(mmdet_config(cfg.detector), cfg, on_step)
    t0 = time.time()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    rank, world = _dist_info()
    own_pg = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        own_pg = True
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    try:
        return _train(cfg, device, rank, world, on_step, progress, t0)
    finally:
        if own_pg:
            torch.distributed.destroy_process_group()


def _train(cfg, device, rank, world, on_step, progress, t0) -> TrainResult:
    """The body of :func:`train` once the device and the process group are set: data,
    model and optimizer, an optional resume, the iterations, then evaluation and the
    final checkpoint."""
    root = storage.localize(cfg.data)
    train_coco, val_coco, train_set = _load_train_data(cfg, root)
    total = cfg.iterations or max(1, math.ceil(cfg.epochs * len(train_set) / cfg.batch_size))
    torch.manual_seed(cfg.seed)
    model, params, opt = _build_training(cfg, train_set.num_classes, device, world)

    ckpt_uri = storage.join(cfg.out_dir, CHECKPOINT) if cfg.out_dir else None
    run = _RunState()
    if ckpt_uri and cfg.resume and storage.exists(ckpt_uri):
        run, done, metrics = _resume(cfg, ckpt_uri, model, opt)
        if done:
            return TrainResult(metrics=metrics, diverged=run.diverged, losses=run.losses, checkpoint=ckpt_uri,
                               seconds=time.time() - t0, iterations=run.start, box_collapsed=run.collapsed,
                               box_quality=run.qualities)

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = amp_enabled(cfg.amp, device)
    model.train()
    bar = tqdm(range(run.start, total), desc=f"train {cfg.loss}", disable=not progress or rank != 0,
               initial=run.start, total=total, leave=False)
    for it in bar:
        if run.diverged or run.collapsed:
            break
        lr = lr_at(cfg, it, total)
        value, heads = _step(cfg, net, opt, params, train_set, it, lr, device, rank, world, use_amp)
        _record_step(cfg, run, value, model, device, world, heads)
        if on_step is not None:
            on_step(it, value)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2g}")
        if ckpt_uri and rank == 0 and cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < total:
            checkpoints.save(ckpt_uri, _state(cfg, model, opt, it + 1, run.losses, run.bad, run.diverged, train_coco,
                                              done=False, box_quality=run.qualities))
    bar.close()

    metrics = _final_metrics(cfg, model, val_coco, root, run.diverged, device, rank, world, progress)
    iterations = len(run.losses)
    if ckpt_uri and rank == 0:
        _write_final(cfg, ckpt_uri, model, opt, run, train_coco, metrics, t0)
    if world > 1:
        torch.distributed.barrier()
    return TrainResult(metrics=metrics, diverged=run.diverged, losses=run.losses, checkpoint=ckpt_uri,
                       seconds=time.time() - t0, iterations=iterations, box_collapsed=run.collapsed,
                       box_quality=run.qualities)


@dataclass
class _RunState:
    """Where a run stands after ``start`` iterations: the loss of each iteration, the bad
    ones counted for the divergence stop, the positives' mean box quality u of each
    iteration (PAP loss only) with the iterations whose u was below ``cfg.box_collapse``
    (``low``), and whether either stop has fired."""

    start: int = 0
    losses: list = field(default_factory=list)
    bad: int = 0
    diverged: bool = False
    qualities: list = field(default_factory=list)
    low: int = 0
    collapsed: bool = False


def _load_train_data(cfg: TrainConfig, root: Path) -> tuple[dict, dict, CocoDetection]:
    """The training and validation splits of ``root`` and the training set; the two
    splits must have the same categories and the training split at least one image."""
    train_coco = load_split(root, cfg.train_ann)
    val_coco = load_split(root, cfg.val_ann)
    train_cats = sorted((c["id"], c["name"]) for c in train_coco["categories"])
    if train_cats != sorted((c["id"], c["name"]) for c in val_coco["categories"]):
        raise ValueError(f"{cfg.data}: splits {cfg.train_ann!r} and {cfg.val_ann!r} have different categories")
    train_set = CocoDetection(train_coco, root / "images")
    if len(train_set) == 0:
        raise ValueError(f"{cfg.data}: split {cfg.train_ann!r} has no images")
    return train_coco, val_coco, train_set


def _build_training(cfg: TrainConfig, num_classes: int, device: torch.device, world: int):
    """The model (backbone from ``cfg.init`` when given, global batch norm under DDP) on
    ``device``, its trainable parameters, and their SGD or AdamW optimizer."""
    model = build_model(cfg, num_classes)
    if cfg.init:
        load_backbone(model, cfg.init, cfg)
    if world > 1:  # batch norm over the global batch (same parameters, buffers and state dict keys)
        model = convert_batchnorm(model)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, params, opt


def _resume(cfg: TrainConfig, ckpt_uri: str, model, opt) -> tuple[_RunState, bool, dict | None]:
    """Load the checkpoint of a run of ``cfg`` into ``model`` and ``opt``; returns where
    the run stands, whether it had finished, and its metrics (None before the end). A
    checkpoint of another config is refused."""
    state = checkpoints.load(ckpt_uri, checkpoints.CHECKPOINT, keys=_STATE_KEYS)
    if _fingerprint(state["config"]) != _fingerprint(cfg.to_dict()):
        raise ValueError(f"{ckpt_uri} holds a run of a different config; use another out_dir or resume=False")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    run = _RunState(start=state["iteration"], losses=list(state["losses"]), bad=state["bad"],
                    diverged=state["diverged"], qualities=list(state.get("box_quality", [])))
    if cfg.box_collapse is not None:
        run.low = sum(q < cfg.box_collapse for q in run.qualities)
        run.collapsed = run.low > cfg.diverge_patience
    return run, bool(state.get("done")), state["metrics"]


def _step(cfg, net, opt, params, train_set, it, lr, device, rank, world, use_amp) -> tuple[float, tuple[float, ...]]:
    """One optimizer step, iteration ``it`` at learning rate ``lr``: this process's share
    of the batch of :func:`batch_plan`, the loss (bfloat16 autocast when ``use_amp``).
    Returns its mean over the processes and the PAP-loss heads' own losses (the
    ``paploss*`` entries of the model's loss dict). A non-finite loss is not applied."""
    for group in opt.param_groups:
        group["lr"] = lr
    idx, flips = batch_plan(cfg.seed, it, cfg.batch_size, len(train_set))
    per_rank = cfg.batch_size // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    items = [train_set.get(i, hflip=cfg.hflip and f) for i, f in zip(idx[mine], flips[mine])]
    images = [im.to(device) for im, _ in items]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for _, t in items]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
        loss_dict = net(images, targets)
    loss = sum(loss_dict.values())
    value = float(loss.detach())
    heads = [float(v.detach()) for k, v in loss_dict.items() if k.startswith("paploss")]
    if world > 1:  # every rank must take the same decisions
        v = torch.tensor([value, *heads], device=device)
        torch.distributed.all_reduce(v)
        value, heads = float(v[0]) / world, [float(h) / world for h in v[1:]]
    opt.zero_grad(set_to_none=True)
    if math.isfinite(value):
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return value, tuple(heads)


def _record_step(cfg: TrainConfig, run: _RunState, value: float, model, device, world: int,
                 heads: tuple[float, ...] = ()) -> None:
    """Add an iteration's loss ``value`` to ``run`` and apply the two stops: the
    divergence stop on bad losses (:func:`_is_bad`, per PAP head with ``heads``), and
    (PAP loss) the box-collapse stop on low u."""
    run.bad += _is_bad(value, heads)
    run.losses.append(value)
    if run.bad > cfg.diverge_patience:
        run.diverged = True
    if cfg.loss == "paploss":
        run.qualities.append(_box_quality(model, device, world))
        if cfg.box_collapse is not None:
            run.low += run.qualities[-1] < cfg.box_collapse
            run.collapsed = run.low > cfg.diverge_patience


def _final_metrics(cfg, model, val_coco, root, diverged, device, rank, world, progress) -> dict:
    """COCO AP of the trained model on the validation split, evaluated on rank 0 and
    shared with every process; all 0 (reward 0) for a diverged run."""
    if diverged:
        metrics = {k: 0.0 for k in METRICS}
    elif rank == 0:
        val_set = CocoDetection(_limit(val_coco, cfg.max_val_images), root / "images")
        metrics = evaluate_model(model, val_set, batch_size=cfg.eval_batch_size, device=device, progress=progress)
    else:
        metrics = {}
    if world > 1:
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _write_final(cfg, ckpt_uri, model, opt, run: _RunState, train_coco, metrics, t0) -> None:
    """The finished run's checkpoint (``done=True``, with its metrics) and ``metrics.json``
    beside it."""
    iterations = len(run.losses)
    checkpoints.save(ckpt_uri, _state(cfg, model, opt, iterations, run.losses, run.bad, run.diverged, train_coco,
                                      done=True, metrics=metrics, box_quality=run.qualities))
    storage.write_json(storage.join(cfg.out_dir, METRICS_FILE),
                       {"metrics": metrics, "diverged": run.diverged, "box_collapsed": run.collapsed,
                        "iterations": iterations, "final_loss": run.losses[-1] if run.losses else None,
                        "seconds": time.time() - t0, "config": cfg.to_dict()})


def _box_quality(model: torch.nn.Module, device: torch.device, world: int) -> float:
    """The positives' mean box quality u of the last step (the PAP loss head's
    ``box_quality``), averaged over the processes so that all take the same decision;
    NaN when the batch had no positive (never counted as low)."""
    q = model.head.box_quality.detach().float().reshape(1).to(device)
    if world > 1:
        torch.distributed.all_reduce(q)
        q /= world
    return float(q)


def _limit(coco: dict, n: int | None) -> dict:
    if n is None or n >= len(coco["images"]):
        return coco
    keep = {im["id"] for im in sorted(coco["images"], key=lambda im: im["id"])[:n]}
    return {**coco, "images": [im for im in coco["images"] if im["id"] in keep],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}


_VOLATILE = ("out_dir", "resume", "checkpoint_every", "device", "num_threads", "data", "eval_batch_size")


# fields added after checkpoints were first written, with the value an older checkpoint's run had
_ADDED_FIELDS = {"box_collapse": None, "detach_i3": False}


def _fingerprint(d: dict) -> str:
    d = {**_ADDED_FIELDS, **d}  # a checkpoint written before a field existed ran with its default
    return json.dumps({k: v for k, v in d.items() if k not in _VOLATILE}, sort_keys=True, default=str)


_STATE_KEYS = ("config", "iteration", "model", "optimizer", "losses", "bad", "diverged", "done", "categories")


def _state(cfg, model, opt, iteration, losses, bad, diverged, coco, done, metrics=None, box_quality=()) -> dict:
    return {
        "format": checkpoints.CHECKPOINT, "config": cfg.to_dict(), "iteration": iteration,
        "model": model.state_dict(), "optimizer": opt.state_dict(), "losses": losses, "bad": bad,
        "diverged": diverged, "done": done, "metrics": metrics, "categories": coco["categories"],
        "box_quality": list(box_quality),
    }


# ----------------------------------------------------------------------------- evaluate
def load_checkpoint(uri: str) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Rebuild the model of a checkpoint; returns ``(model, config, raw state)``."""
    state = checkpoints.load(uri, checkpoints.CHECKPOINT, keys=_STATE_KEYS)
    cfg = TrainConfig.from_dict(state["config"])
    model = build_model(replace(cfg, init=None, backbone_weights=None), len(state["categories"]))
    model.load_state_dict(state["model"])
    return model, cfg, state


def evaluate_checkpoint(checkpoint: str, data: str | None = None, ann: str = "val", *, batch_size: int = 16,
                        device: str = "auto", progress: bool = True, max_images: int | None = None) -> dict:
    """COCO AP (dict of :data:`~paploss.evaluate.METRICS`) of a checkpoint on
    split ``ann`` of ``data`` (default: the dataset it was trained on)."""
    model, cfg, state = load_checkpoint(checkpoint)
    root = storage.localize(data or cfg.data)
    coco = load_split(root, ann)
    if sorted(c["id"] for c in coco["categories"]) != sorted(c["id"] for c in state["categories"]):
        raise ValueError(f"split {ann!r} of {data or cfg.data} has other categories than {checkpoint} was trained on")
    dev = resolve_device(device)
    model.to(dev)
    return evaluate_model(model, CocoDetection(_limit(coco, max_images), root / "images"), batch_size=batch_size,
                          device=dev, progress=progress)


# ----------------------------------------------------------------------------- pretrain
def pretrain(
    data: str,
    out_file: str,
    *,
    ann: str = "train",
    detector: str = "retinanet_mobilenet_v3_small",
    width_mult: float = 1.0,
    iterations: int = 600,
    image_size: int = 128,
    crop_size: int = 64,
    batch_size: int = 32,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: str = "auto",
    num_threads: int | None = None,
    progress: bool = True,
) -> str:
    """Pre-train the backbone body of ``detector`` on a classification task and save
    it to ``out_file``; returns ``out_file``.

    The task (as an ImageNet backbone, no detection loss involved): classify crops
    around the ground-truth boxes of split ``ann`` into the K classes, plus a
    (K+1)-th "background" class for random crops that overlap no box by more than
    IoU 0.1.  Crops get random context (box enlarged 1.0-1.6x), shift and flips and
    are resized to ``crop_size``; images are first resized to ``image_size`` so
    object scales match the detector's.  SGD with cosine decay.  The file holds the
    body's state dict, the backbone name and the final training accuracy."""
    if num_threads:
        torch.set_num_threads(num_threads)
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; known: {sorted(DETECTORS)}")
    dev = resolve_device(device)
    root = storage.localize(data)
    coco = load_split(root, ann)
    ds = CocoDetection(coco, root / "images")
    K = ds.num_classes
    torch.manual_seed(seed)
    body, last, classifier = _crop_classifier(detector, K, width_mult, crop_size)
    net = torch.nn.ModuleDict({"body": body, "fc": classifier}).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    objects = _pretrain_objects(ds)
    if not objects:
        raise ValueError(f"{data}: split {ann!r} has no boxes to pre-train on")
    correct = seen = 0
    bar = tqdm(range(iterations), desc="pretrain", disable=not progress, leave=False)
    net.train()
    for it in bar:
        for group in opt.param_groups:
            group["lr"] = _pretrain_lr(lr, it, iterations)
        picks = torch.randint(len(objects), (batch_size,), generator=gen).tolist()
        x, y = _crop_batch(ds, objects, picks, image_size, crop_size, K, gen, dev)
        logits = classifier(body(x)[last].mean(dim=(2, 3)))
        loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if (it + 1) % 20 == 0 or it + 1 == iterations:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{correct / seen:.2f}")
            last_acc, correct, seen = correct / max(seen, 1), 0, 0
    backbone = DETECTORS[detector][1]
    checkpoints.save(out_file, {"format": checkpoints.BACKBONE, "backbone": backbone, "width_mult": width_mult,
                     "state_dict": body.state_dict(), "train_accuracy": last_acc, "iterations": iterations,
                     "classes": [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])],
                     "data": str(data), "ann": ann, "seed": seed})
    return out_file


# ImageNet's per-channel mean and standard deviation, which crops are normalised with
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _crop_classifier(detector: str, K: int, width_mult: float, crop_size: int):
    """The backbone body of ``detector`` (weights from the current torch seed), the name
    of its last feature map, and a linear classifier of that map's pooled channels into
    the K classes plus background."""
    body = build_detector(detector, K, width_mult=width_mult, fpn_channels=16).backbone.body
    last = list(body.return_layers.values())[-1]
    body.eval()
    with torch.no_grad():
        ch = body(torch.zeros(1, 3, crop_size, crop_size))[last].shape[1]
    return body, last, torch.nn.Linear(ch, K + 1)


def _pretrain_objects(ds: CocoDetection) -> list[tuple[int, torch.Tensor, int]]:
    """Every ground-truth box of ``ds`` as ``(image index, box xyxy, label)``, in image order."""
    objects = []
    for i in range(len(ds)):
        target = ds.get(i)[1]
        objects += [(i, b, int(l)) for b, l in zip(target["boxes"], target["labels"])]
    return objects


def _pretrain_lr(lr: float, it: int, iterations: int) -> float:
    """Cosine decay from ``lr`` over ``iterations``, with a linear warm-up over the first 20."""
    return lr * 0.5 * (1 + math.cos(math.pi * it / iterations)) * min(1.0, (it + 1) / 20)


def _crop_batch(ds, objects, picks, image_size, crop_size, K, gen, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised crops ``(B, 3, crop_size, crop_size)`` and labels ``(B,)`` of one
    pre-training batch: for each picked object a crop of it (:func:`_object_crop`), every
    fourth one (j % 4 == 3) a background crop of its image (:func:`_background_crop`,
    label K), each flipped with probability 1/2. Draws from ``gen`` in batch order."""
    from torchvision.ops import roi_align

    rois, labels, imgs = [], [], []
    for j, p in enumerate(picks):
        i, box, label = objects[p]
        img, gt, box = _resized(ds, i, box, image_size)
        H, W = img.shape[-2:]
        if j % 4 == 3:
            box, label = _background_crop(gt, W, H, gen), K
        else:
            box = _object_crop(box, gen)
        if torch.rand(1, generator=gen).item() < 0.5:
            img, box = img.flip(-1), torch.stack([W - box[2], box[1], W - box[0], box[3]])
        imgs.append(img)
        rois.append(torch.cat([torch.tensor([float(j)]), box]))
        labels.append(label)
    batch = torch.stack([torch.nn.functional.pad(im, (0, image_size - im.shape[-1], 0, image_size - im.shape[-2]))
                         for im in imgs]).to(dev)
    crops = roi_align(batch, torch.stack(rois).to(dev), output_size=crop_size, aligned=True)
    mean = torch.tensor(_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=dev).view(1, 3, 1, 1)
    return (crops - mean) / std, torch.tensor(labels, device=dev)


def _resized(ds: CocoDetection, i: int, box: torch.Tensor, image_size: int):
    """Image ``i`` of ``ds`` resized so that its longer side is ``image_size``, with its
    ground-truth boxes and ``box`` scaled alike: ``(image, boxes, box)``."""
    img, tgt = ds.get(i)
    H, W = img.shape[-2:]
    scale = image_size / max(H, W)
    if scale == 1.0:
        return img, tgt["boxes"], box
    img = torch.nn.functional.interpolate(img[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
    return img, tgt["boxes"] * scale, box * scale


def _background_crop(gt: torch.Tensor, W: int, H: int, gen: torch.Generator) -> torch.Tensor:
    """A random box of 0.1-0.4 of the image's width and height that overlaps no box of
    ``gt`` by IoU 0.1 or more (the last of 10 tries otherwise)."""
    from torchvision.ops import box_iou

    size = torch.empty(2).uniform_(0.1, 0.4, generator=gen) * torch.tensor([W, H])
    for _ in range(10):
        xy = torch.rand(2, generator=gen) * (torch.tensor([W, H]) - size)
        cand = torch.cat([xy, xy + size])[None]
        if len(gt) == 0 or box_iou(cand, gt).max() < 0.1:
            break
    return cand[0]


def _object_crop(box: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``box`` with random context: enlarged 1.0-1.6x per side length and its centre
    shifted by up to 10% of the new size."""
    c = (box[:2] + box[2:]) / 2
    wh = (box[2:] - box[:2]) * torch.empty(2).uniform_(1.0, 1.6, generator=gen)
    c = c + (torch.rand(2, generator=gen) - 0.5) * 0.2 * wh
    return torch.cat([c - wh / 2, c + wh / 2])
