"""Proxy trials packed per GPU: ``k`` trials share one GPU under CUDA MPS.

A proxy trial (a small detector, a few hundred iterations) leaves most of a GPU idle.
Run ``k = trials_per_gpu`` of them on one GPU at once and, under CUDA MPS, their
kernels run side by side instead of taking turns (sixteen 1200-iteration trainings on
one H100: about 6x the throughput of one at a time, BENCHMARKS.md).  Three parts:

* **Resources** (:func:`trial_resources`, pure): what each trial's task requests when
  one GPU's share of a node (``cpu``, ``memory``, one GPU) is split among ``k``
  trials: one unit of the accelerator resource (the cluster's device plugin advertises
  each GPU ``k`` times under MPS sharing), ``cpu / k`` and ``memory / k``.
* **Memory** (:func:`check_fits`, pure; :func:`check_gpu` reads the GPU): ``k``
  trials of an estimated size (:func:`estimate_trial_bytes`) must fit the GPU's total
  memory and this trial the memory free now, else one clear
  :class:`~paploss.errors.InputError` naming how many would fit.
* **MPS** (:func:`mps_running`): whether an MPS control daemon listens on the pipe
  directory (``$CUDA_MPS_PIPE_DIRECTORY``, default ``/tmp/nvidia-mps``).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from paploss.errors import InputError

__all__ = ["DEFAULT_MPS_PIPE_DIRECTORY", "CONTEXT_BYTES", "MIN_TRIAL_MEMORY", "TrialResources", "trial_resources",
           "parse_cpu", "parse_memory", "check_fits", "check_gpu", "estimate_trial_bytes", "mps_pipe_directory",
           "mps_running", "packing_note", "GiB"]

GiB = 1 << 30
DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"  # nvidia-cuda-mps-control's default
CONTEXT_BYTES = 512 << 20  # GPU memory of one process's CUDA context and torch's kernels (rough, per trial)
MIN_TRIAL_MEMORY = 2 * GiB  # host memory one trial process needs at least (torch, CUDA, the data)
_SAFETY = 1.5  # activations measured on CPU x this: allocator slack, cuDNN workspaces, the loss's temporaries


# ----------------------------------------------------------------------------- resources
_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?$")
_MEMORY_UNITS = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def parse_cpu(q: str, where: str = "cpu") -> int:
    """A Kubernetes CPU quantity (``"4"``, ``"0.5"``, ``"500m"``) in millicores."""
    m = _CPU.match(str(q).strip())
    if not m:
        raise InputError(where, f"{q!r} is not a CPU quantity (e.g. 4, 0.5, 500m)")
    return int(round(float(m.group(1)) * (1 if m.group(2) else 1000)))


def parse_memory(q: str, where: str = "memory") -> int:
    """A Kubernetes memory quantity (``"16G"``, ``"16Gi"``, ``"512Mi"``, bytes) in bytes."""
    m = _MEMORY.match(str(q).strip())
    if not m:
        raise InputError(where, f"{q!r} is not a memory quantity (e.g. 16G, 16Gi, 512Mi)")
    return int(float(m.group(1)) * _MEMORY_UNITS[m.group(2)])


@dataclass(frozen=True)
class TrialResources:
    """What one proxy trial's task requests: ``accelerator_limit`` units of
    ``accelerator`` (1: one of the GPU's ``trials_per_gpu`` shares), ``cpu`` (a quantity
    in millicores, e.g. ``"4000m"``) and ``memory`` (in MiB, e.g. ``"16384Mi"``);
    ``gpu_fraction`` = 1 / ``trials_per_gpu`` of a physical GPU."""

    trials_per_gpu: int
    accelerator: str
    accelerator_limit: int
    cpu: str
    memory: str
    gpu_fraction: float


def trial_resources(trials_per_gpu: int, *, cpu: str = "4", memory: str = "16G",
                    accelerator: str = "nvidia.com/gpu") -> TrialResources:
    """The requests of one proxy trial when ``trials_per_gpu`` trials share one GPU.

    ``cpu`` and ``memory`` are one GPU's share of a node (what one unpacked training
    task requests); each of the ``k`` trials gets ``cpu / k`` and ``memory / k`` (at
    least :data:`MIN_TRIAL_MEMORY`, else an :class:`InputError`) and one unit of
    ``accelerator``: under MPS sharing the device plugin advertises each GPU as ``k``
    units (its ``replicas``, which must equal ``k``), so ``k`` such tasks land on one GPU.
    ``k = 1`` gives back ``cpu`` and ``memory`` as they are, in the same units.
    """
    k = trials_per_gpu
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError("trials_per_gpu", f"must be an integer >= 1, got {k!r}")
    milli = parse_cpu(cpu)
    mem = parse_memory(memory)
    per_mem = mem // k
    if per_mem < MIN_TRIAL_MEMORY:
        raise InputError("trials_per_gpu", f"{k} trials per GPU give each {per_mem / GiB:.2f} GiB of the {memory} "
                         f"memory per GPU; a trial needs at least {MIN_TRIAL_MEMORY / GiB:.0f} GiB: at most "
                         f"{max(1, mem // MIN_TRIAL_MEMORY)} trials per GPU, or more memory")
    per_cpu = max(1, milli // k)
    return TrialResources(trials_per_gpu=k, accelerator=accelerator, accelerator_limit=1, cpu=f"{per_cpu}m",
                          memory=f"{max(1, per_mem >> 20)}Mi", gpu_fraction=1.0 / k)


# ----------------------------------------------------------------------------- GPU memory
def check_fits(trials_per_gpu: int, per_trial_bytes: int, free_bytes: int, total_bytes: int) -> int:
    """Refuse to pack when it cannot fit: ``k`` trials of ``per_trial_bytes`` each must
    fit the GPU's ``total_bytes``, and one more trial the ``free_bytes`` left now (the
    other trials on the GPU may have started already).  Returns how many trials of that
    size the GPU holds (``total // per_trial``); raises one :class:`InputError` line
    otherwise."""
    k = trials_per_gpu
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError("trials_per_gpu", f"must be an integer >= 1, got {k!r}")
    if per_trial_bytes <= 0:
        raise InputError("trials_per_gpu", f"the memory estimate per trial must be > 0 bytes, got {per_trial_bytes}")
    most = total_bytes // per_trial_bytes
    if k * per_trial_bytes > total_bytes:
        raise InputError("trials_per_gpu", f"{k} trials of about {per_trial_bytes / GiB:.2f} GiB each need "
                         f"{k * per_trial_bytes / GiB:.1f} GiB, more than this GPU's {total_bytes / GiB:.1f} GiB: "
                         f"at most {most} fit")
    if per_trial_bytes > free_bytes:
        raise InputError("trials_per_gpu", f"a trial of about {per_trial_bytes / GiB:.2f} GiB does not fit the "
                         f"{free_bytes / GiB:.2f} GiB free on this GPU now ({total_bytes / GiB:.1f} GiB in all; "
                         f"{k} trials per GPU): other processes hold the rest")
    return most


def check_gpu(trials_per_gpu: int, per_trial_bytes: int, device=None) -> int:
    """:func:`check_fits` with this process's GPU (``torch.cuda.mem_get_info``); an
    :class:`InputError` without CUDA.  Returns how many trials the GPU holds."""
    import torch

    if not torch.cuda.is_available():
        raise InputError("trials_per_gpu", f"{trials_per_gpu} trials per GPU need a CUDA GPU; none is visible")
    free, total = torch.cuda.mem_get_info(device)
    return check_fits(trials_per_gpu, per_trial_bytes, free, total)


def _saved_bytes(model, images, targets) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward
    (each storage once; the parameters left out)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(images, targets)
    sum(losses.values()).backward()  # frees the graph (and checks it runs)
    return sum(seen.values())


def estimate_trial_bytes(cfg, num_classes: int) -> int:
    """A rough upper bound of one training's GPU memory, measured on the CPU::

        CONTEXT_BYTES + 4 x parameter bytes (weights, gradients, momentum, a copy)
                      + 1.5 x batch_size x activations of one image

    where the activations of one image are half what autograd saves in one training
    forward of two images of ``cfg.image_size`` (random, one box each), float32 (an overestimate under
    bfloat16 autocast).  ``cfg`` a :class:`paploss.config.TrainConfig` of a paploss
    detector (not ``mmdet:``).  The GPU check script prints it beside the measured peak.
    """
    import torch

    from paploss.engine import build_model

    if not isinstance(num_classes, int) or num_classes < 1:
        raise InputError("num_classes", f"must be an integer >= 1, got {num_classes!r}")
    s = cfg.image_size
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(cfg, num_classes)
        images = [torch.rand(3, s, s) for _ in range(2)]  # two: group norm of a 1x1 map needs more than one
    targets = [{"boxes": torch.tensor([[s / 4, s / 4, 3 * s / 4, 3 * s / 4]]), "labels": torch.tensor([0])}] * 2
    activations = _saved_bytes(model, images, targets) / 2
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(CONTEXT_BYTES + 4 * param_bytes + _SAFETY * cfg.batch_size * activations)


# ----------------------------------------------------------------------------- MPS
def mps_pipe_directory() -> Path:
    """Where an MPS control daemon listens: ``$CUDA_MPS_PIPE_DIRECTORY`` or ``/tmp/nvidia-mps``."""
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_MPS_PIPE_DIRECTORY)


def mps_running(pipe_directory: str | os.PathLike | None = None) -> bool:
    """Whether an MPS control daemon is up: its pipe directory holds the named pipe
    ``control`` that ``nvidia-cuda-mps-control -d`` creates (and removes on ``quit``).
    CUDA processes started with that directory then share the GPU through it."""
    control = Path(pipe_directory or mps_pipe_directory()) / "control"
    try:
        return stat.S_ISFIFO(control.stat().st_mode)
    except OSError:
        return False


def packing_note(trials_per_gpu: int) -> str | None:
    """A line for the log when ``k > 1`` trials share a GPU without MPS (they then take
    turns: about 1.4x one trial's throughput for 16, against 6x under MPS); else None."""
    if trials_per_gpu > 1 and not mps_running():
        return (f"{trials_per_gpu} trials per GPU but no CUDA MPS daemon at {mps_pipe_directory()}: the trials "
                "take turns on the GPU (time-slicing), far slower than side by side under MPS")
    return None



# ----------------------------------------------------------------------------- a trial's own check
#: Set by the pipeline on every proxy-trial task when ``trials_per_gpu`` > 1.
TRIALS_PER_GPU_ENV = "PAPLOSS_TRIALS_PER_GPU"


def check_packed_trial(cfg) -> str | None:
    """Before a proxy trial trains: when the pipeline packs k > 1 trials per GPU
    (``$PAPLOSS_TRIALS_PER_GPU``) and this trial trains on CUDA, check that k trials of
    its estimated size fit the GPU and that this one fits what is free now (one
    :class:`InputError` line otherwise). Returns :func:`packing_note` (a warning when no
    MPS daemon is up), None when there is nothing to say or no packing."""
    try:
        k = int(os.environ.get(TRIALS_PER_GPU_ENV, "1") or 1)
    except ValueError:
        raise InputError(TRIALS_PER_GPU_ENV, f"must be an integer, got {os.environ[TRIALS_PER_GPU_ENV]!r}") from None
    if k <= 1:
        return None
    from paploss.engine import resolve_device

    if resolve_device(cfg.device).type != "cuda":
        return None
    import json

    with open(Path(cfg.data) / "annotations" / f"{cfg.train_ann}.json", encoding="utf-8") as f:
        num_classes = len(json.load(f)["categories"])
    check_gpu(k, estimate_trial_bytes(cfg, num_classes))
    return packing_note(k)
