"""Data-parallel training that equals one process on the global batch.

Under DDP each of the W processes (ranks) holds ``B / W`` images of a batch of ``B``.
Two parts of a detector's step see more than one image at a time, and both must see
the whole global batch for a DDP step to be the single-process step (SPEC §1: the
PAP loss ranks over the whole batch at once):

* the **PAP loss**: :func:`gather_ranked_entries` gathers the (score, target,
  quality) entries of every rank, with autograd, so that every rank computes the loss
  over the global batch;
* **batch norm** in training mode: :class:`GlobalBatchNorm2d` normalises with the
  global batch's mean and variance (:func:`convert_batchnorm`).

Gradients.  Both use ``torch.distributed.nn.functional`` collectives, whose backward
passes sum over the ranks: the gradient reaching rank r's local input ``x_r`` is
``sum_q dL_q / dx_r``, the gradient of ``sum_q L_q`` (L_q: rank q's loss).  DDP then
averages the parameters' gradients over the W ranks, so a step follows the gradient of
``(1/W) sum_q L_q``.  With the gathered PAP loss every ``L_q`` is the same global loss
``L``: the step follows ``dL/dθ``, as one process on the global batch, with no extra
scaling.  A loss that is a mean over a rank's images (the focal baselines) gives
``(1/W) sum_q L_q`` = the mean over the global batch, as before.

Only what the loss needs is gathered: the positives and, with ``top_k``, each rank's
``top_k`` highest-scoring valid entries (the global top ``top_k`` is among them), else
every valid entry.  Entries a rank leaves out have no gradient in the global loss either
(they are neither positive nor in the ranked set J), so the loss and every gradient are
unchanged, and the gathered size is at most ``W * (top_k + P)`` whatever the image size.

Without an initialised process group of more than one rank, every function here is the
identity (single-process training is unchanged).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["world", "rank", "distributed", "gather_rows", "gather_ranked_entries", "GlobalBatchNorm2d",
           "convert_batchnorm"]


def distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_rows(x: Tensor) -> Tensor:
    """The rows of ``x`` (n_r, ...) of every rank, concatenated in rank order: (sum_r n_r, ...).

    Differentiable: the gradient reaching rank r's ``x`` is the sum over the ranks of the
    gradients of their outputs at rank r's rows (``torch.distributed.nn.functional.all_gather``).
    Ranks may hold different numbers of rows (padded for the collective, cut after); the
    trailing shape and the dtype must agree.  The identity without a process group.
    """
    if not distributed():
        return x
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    padded = x if x.shape[0] == most else torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))])
    parts = _autograd_collective("all_gather", padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


def _autograd_collective(name: str, x: Tensor):
    """``torch.distributed.nn.functional.<name>(x)`` (differentiable; its backward sums over
    the ranks, module doc), without its deprecation warning (torch 2.14 points to a
    private module instead)."""
    import torch.distributed.nn.functional as F

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*")
        return getattr(F, name)(x)


def _local_keep(s: Tensor, t: Tensor, top_k: int | None) -> Tensor:
    """Indices of the entries the global loss can depend on: the positives and the
    ``top_k`` highest-scoring valid entries (all valid entries when ``top_k`` is None or
    there are no more than that), ascending. ``s``, ``t`` (N,); int64 (K,)."""
    valid = t != -1
    n_valid = int(valid.sum())
    if top_k is None or n_valid <= top_k:
        return torch.nonzero(valid).squeeze(1)
    keep = t == 1
    s_rank = torch.where(valid, s.detach(), torch.full_like(s, -math.inf, dtype=s.dtype))
    keep[torch.topk(s_rank, top_k, sorted=False).indices] = True
    return torch.nonzero(keep).squeeze(1)


def gather_ranked_entries(logits: Tensor, targets: Tensor, qualities: Tensor,
                          top_k: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """The PAP loss's entries of the global batch: ``(s, t, u)``, each (M,), for
    ``paploss.loss.pap_loss(s, t, u, spec, top_k)`` on every rank.

    Args:
        logits: this rank's scores, any shape (N entries), float.
        targets: same shape, in {-1, 0, 1}.
        qualities: same shape, ``u`` in [0, 1] (read where ``targets == 1``).
        top_k: the loss's ``top_k`` (``None``: all valid entries are ranked).

    Returns:
        ``s`` (dtype of ``logits``) and ``u`` (dtype of ``logits``) with autograd back to
        this rank's entries, ``t`` (dtype of ``logits``, no gradient); the entries of
        rank 0, then rank 1, ... (module doc: which entries).  Without a process group
        of more than one rank: the flattened inputs themselves (nothing left out).
    """
    s, t, u = logits.reshape(-1), targets.reshape(-1), qualities.reshape(-1)
    if not distributed():
        return s, t, u
    keep = _local_keep(s, t, top_k)
    rows = torch.stack([s[keep], u[keep].to(s.dtype), t[keep].to(s.dtype)], dim=1)  # (K, 3)
    both = gather_rows(rows)                                                          # (M, 3)
    return both[:, 0], both[:, 2].detach(), both[:, 1]


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the global batch.

    With a process group of more than one rank and in training mode, the per-channel
    mean and (biased) variance over ``(N, H, W)`` of every rank's input::

        n = sum_r N_r H W,   mean = sum_r sum x / n,   var = sum_r sum x² / n - mean²

    (local sums in float64, one differentiable ``all_reduce`` of ``(2C + 1,)`` numbers),
    then ``y = (x - mean) / sqrt(var + eps) * weight + bias`` and the running statistics
    updated as ``nn.BatchNorm2d`` does (unbiased variance ``var * n / (n - 1)``).  Works
    on any device and backend (``torch.nn.SyncBatchNorm`` needs a GPU).  Otherwise (one
    process, evaluation) it is ``nn.BatchNorm2d``; the state dict keys are the same.
    Input (N, C, H, W); output the same shape and dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        count = x.new_full((1,), x.numel() // c, dtype=torch.float64)
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()  # bf16 squares lose too much
        local = torch.cat([xs.sum((0, 2, 3), dtype=torch.float64), (xs * xs).sum((0, 2, 3), dtype=torch.float64),
                           count])
        total = _autograd_collective("all_reduce", local)
        n = total[-1].detach()
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            shift = self.bias.to(torch.float64) - mean * scale * self.weight.to(torch.float64)
            scale = scale * self.weight.to(torch.float64)
        else:
            shift = -mean * scale
        shape = (1, c, 1, 1)
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` (not already global) replaced by a
    :class:`GlobalBatchNorm2d` holding the same parameters and buffers (in place for
    children; returns the converted module, a new one if ``module`` itself is a
    ``BatchNorm2d``)."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, device=module.running_mean.device
                                if module.running_mean is not None else None)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
