"""Figures as bytes: the loss's functions (the paper's Figure 1) and a search's rewards.

Each function draws on a fresh ``matplotlib.figure.Figure`` (no pyplot, no global
state, any backend) and returns the encoded image; the caller decides where it goes
(an MLflow artifact, a report folder, ``storage.write_bytes``). The loss and the
controller do no I/O; figures are drawn here and nowhere else.
"""

from __future__ import annotations

import io
from typing import Sequence

import torch

__all__ = ["FORMATS", "draw_functions", "functions_figure", "detectors_figure", "reward_figure"]

#: The encodings a figure can be returned in.
FORMATS = ("png", "pdf", "svg")


def _encode(fig, fmt: str, dpi: int) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"figure format {fmt!r}: expected one of {list(FORMATS)}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return buf.getvalue()


def _label(spec, title: str | None) -> str:
    return title or f"{spec.form} (gradient scale {spec.grad_scale:.3g})"


def draw_functions(spec, ax, title: str | None = None):
    """Draw the five functions of ``spec`` (a :class:`paploss.spec.LossSpec`) on one
    matplotlib ``Axes``, for a figure of the caller's; returns ``ax``."""
    from paploss.spec import FUNCTIONS

    xs = torch.linspace(0.0, 1.0, 401, dtype=torch.float64)
    for name in FUNCTIONS:
        ax.plot(xs.numpy(), spec.function(name)(xs).numpy(), label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(_label(spec, title))
    ax.legend()
    return ax


def _draw_one(ax, spec, name: str, xs: torch.Tensor, title: str) -> None:
    """Function ``name`` of ``spec`` on ``ax`` with its control points (red dots)."""
    ax.plot(xs.numpy(), spec.function(name)(xs).numpy(), color="tab:blue")
    pts = spec.points_of(name)
    if pts is not None:
        ax.plot(pts[0::2], pts[1::2], "o", color="tab:red", markersize=4)
    ax.set_title(title, fontsize="medium")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def _heads(spec) -> list[tuple[str, object]]:
    """``[(head name, LossSpec), ...]`` of a ``SpecSet``; ``[("", spec)]`` of a ``LossSpec``."""
    from paploss.spec_set import SpecSet

    return list(spec.heads) if isinstance(spec, SpecSet) else [("", spec)]


def functions_figure(spec, title: str | None = None, fmt: str = "png") -> bytes:
    """The five functions of ``spec`` side by side (1×5), each with its control points
    (red dots; the searched forms), like the paper's Figure 1. A
    :class:`~paploss.spec_set.SpecSet` (a detector with several heads) gets one row per
    head, each row titled by its head and its gradient scale (heads × 5)."""
    from matplotlib.figure import Figure

    from paploss.spec import FUNCTIONS

    heads = _heads(spec)
    xs = torch.linspace(0.0, 1.0, 401, dtype=torch.float64)
    fig = Figure(figsize=(17, 3.6 * len(heads)))
    axes = fig.subplots(len(heads), 5, sharey=True, squeeze=False)
    for row, (head, one) in zip(axes, heads):
        for ax, name in zip(row, FUNCTIONS):
            _draw_one(ax, one, name, xs, f"{head}: {name}" if head else name)
            ax.set_xlabel("x = d/2 + 1/2" if name.startswith("H") else "u")
        if head:
            row[0].set_ylabel(f"{head} head\n{_label(one, None)}")
    if len(heads) == 1:
        fig.suptitle(_label(spec, title))
    else:
        fig.suptitle(title or "one loss per head")
    fig.tight_layout()
    return _encode(fig, fmt, dpi=110)


def detectors_figure(specs, fmt: str = "png") -> bytes:
    """Each detector's searched loss, a column per detector (the paper's Figure 1 on
    several detectors): ``specs`` maps a detector's name to its ``LossSpec`` or
    ``SpecSet``; a spec set takes a column per head (``faster_rcnn_mobilenet_v3 / rpn``).
    Rows: the five functions; each column is titled by its detector (and head) and its
    gradient scale."""
    from matplotlib.figure import Figure

    from paploss.spec import FUNCTIONS

    if not specs:
        raise ValueError("detectors_figure needs at least one detector's spec")
    columns = [(f"{det} / {head}" if head else det, one) for det, spec in dict(specs).items()
               for head, one in _heads(spec)]
    xs = torch.linspace(0.0, 1.0, 401, dtype=torch.float64)
    fig = Figure(figsize=(3.4 * len(columns), 2.3 * len(FUNCTIONS)))
    axes = fig.subplots(len(FUNCTIONS), len(columns), sharey=True, squeeze=False)
    for j, (label, one) in enumerate(columns):
        for i, name in enumerate(FUNCTIONS):
            _draw_one(axes[i][j], one, name, xs, f"{label}\n{_label(one, None)}" if i == 0 else "")
            if j == 0:
                axes[i][j].set_ylabel(name)
        axes[-1][j].set_xlabel("x (H) / u (I)")
    fig.tight_layout()
    return _encode(fig, fmt, dpi=90)


def reward_figure(history: Sequence[Sequence[float | None]], noise: Sequence[tuple[float, float] | None] = (),
                  baseline: Sequence[float | None] = (), baseline_label: str = "baseline",
                  fmt: str = "png") -> bytes:
    """Rewards of every trial per round (dots) and their mean (line).

    ``history[r]``: round r's rewards (None: a failed trial). ``noise[r]``:
    ``paploss.steps.reward_noise`` of round r or None; where given, a band of ± the
    seeds' noise in one reward around the mean (dots inside it differ by luck as much
    as by their losses). ``baseline[r]``: the reward of a loss trained as round r's
    samples were, or None; a black cross labelled ``baseline_label`` (dots above it beat it)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    means = []
    for r, rewards in enumerate(history):
        ok = [x for x in rewards if x is not None]
        ax.scatter([r] * len(ok), ok, s=12, color="tab:blue", alpha=0.6)
        means.append(sum(ok) / len(ok) if ok else float("nan"))
    ax.plot(range(len(means)), means, color="tab:red", label="mean reward")
    band = [(r, noise[r][1]) for r in range(min(len(noise), len(means))) if noise[r] is not None]
    if band:
        ax.fill_between([r for r, _ in band], [means[r] - n for r, n in band], [means[r] + n for r, n in band],
                        color="tab:red", alpha=0.15, label="± seed noise of one reward")
    marks = [(r, b) for r, b in enumerate(baseline) if b is not None]
    if marks:
        ax.scatter([r for r, _ in marks], [b for _, b in marks], s=60, marker="x", color="black", zorder=3,
                   label=baseline_label)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("reward (search-val AP)")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _encode(fig, fmt, dpi=100)
