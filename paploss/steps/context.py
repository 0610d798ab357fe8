"""The search's run context: what every task after init-search needs to know, in one small dict."""

from __future__ import annotations

from typing import Any, Mapping

from paploss.steps.options import train_options
from paploss.steps.work import plain

__all__ = ["run_context", "training_options", "tracking_of"]


def run_context(work: str, search_name: str, tracking: Mapping[str, str] | None, *, proxy: Mapping[str, Any],
                final: Mapping[str, Any], detector: str = "", proxy_epochs: float = 0.0, final_epochs: float = 0.0,
                seed: int = 0, attempts: int = 1, max_failed_trials: int = 0, model_name: str = "paploss-retinanet",
                promote: bool = True, promote_rule: str = "beat-baselines") -> dict:
    """``{"work", "search_name", "tracking", "proxy", "final", "detector", "proxy_epochs",
    "final_epochs", "seed", "attempts", "max_failed_trials", "model_name", "promote",
    "promote_rule"}``, JSON-able (a KFP ``Dict`` parameter holds no nulls: the training
    options stay as given and :func:`training_options` resolves them where they are used);
    ``tracking`` None logs nothing. The KFP pipeline passes it from task to task as one parameter."""
    return plain({"work": work, "search_name": search_name, "tracking": dict(tracking) if tracking else {},
                  "proxy": dict(proxy), "final": dict(final), "detector": detector,
                  "proxy_epochs": float(proxy_epochs), "final_epochs": float(final_epochs), "seed": int(seed),
                  "attempts": int(attempts), "max_failed_trials": int(max_failed_trials), "model_name": model_name,
                  "promote": bool(promote), "promote_rule": promote_rule})


def training_options(run: Mapping[str, Any], which: str) -> dict:
    """The resolved ``proxy`` or ``final`` training options of a run context
    (:func:`~paploss.steps.options.train_options`: preset expanded, detector and epochs folded in)."""
    return train_options(run[which], run["detector"], run[f"{which}_epochs"])


def tracking_of(run: Mapping[str, Any]) -> dict | None:
    """The run context's MLflow settings, or None when it logs nothing."""
    return dict(run["tracking"]) or None
