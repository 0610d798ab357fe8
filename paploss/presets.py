"""Named sizes of a search (``paploss run --preset``, ``paploss search --preset``, ``make run PRESET=``).

A preset fixes the sizes of a search; every value can be overridden on the command
line. ``rounds`` and ``parallelism`` are compile-time values of the KFP pipeline (a
Python loop over rounds, each a sub-pipeline; ``ParallelFor`` takes a constant
parallelism); everything else is a run-time pipeline parameter. The training
options (``proxy``, ``final``) are fields of :class:`paploss.config.TrainConfig`,
``pretrain`` the options of :func:`paploss.engine.pretrain`; unknown names are
rejected before any training starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = ["Preset", "PRESETS", "SQUARE_THETA", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """Sizes of one search (see ``docs/pipeline.md`` for what each preset is for)."""

    rounds: int
    samples: int
    parallelism: int
    dataset: str = "bundled:shapes"
    bundled: dict = field(default_factory=dict)  # options of the bundled dataset (n_train, n_val, image_size)
    detector: str = ""  # "" = the engine's default
    proxy: dict = field(default_factory=dict)  # TrainConfig fields of a proxy trial
    final: dict = field(default_factory=dict)  # TrainConfig fields of the final trainings
    pretrain: dict = field(default_factory=dict)  # options of engine.pretrain
    controller: dict = field(default_factory=dict)  # Controller options (sigma, lr, steps, ...)
    max_failed_trials: int = 0  # 0 = a quarter of all trials (set in __post_init__)
    attempts: int = 2  # tries of a trial before it counts as failed
    seed: int = 0
    split_seed: int = 0
    # selection by re-evaluation after the last round: the select_top best samples,
    # each trained again with every seed of select_seeds (0: off, the searched loss is μ)
    select_top: int = 0
    select_seeds: list = field(default_factory=lambda: [1, 2, 3])
    # how the selection ranks the samples to pick its candidates (SELECT_RANKS)
    select_rank: str = "reward"
    # proxy trainings per sampled loss, each with its own seed; its reward is their mean (init_search)
    reward_seeds: int = 1
    # search-train/search-val splits the rounds cycle through (prepare_data, init_search)
    search_splits: int = 1
    # the share of train each search split holds out as search-val (prepare_data)
    search_val_fraction: float = 0.2
    # the learning-rate sweep before the finals (paploss.steps.lr_sweep): {"lrs": [...], training options of
    # its short trainings on search-train}; each final loss trains at its best lr on search-val. Fewer than
    # two lrs: no sweep, every final at the final options' lr
    lr_sweep: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_failed_trials == 0:
            object.__setattr__(self, "max_failed_trials", max(1, self.rounds * self.samples * self.reward_seeds // 4))

    def with_overrides(self, **overrides: Any) -> "Preset":
        known = {f.name for f in fields(self)}
        unknown = sorted(k for k in overrides if k not in known)
        if unknown:
            raise ValueError(f"unknown preset field(s) {unknown}; known: {sorted(known)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if "rounds" in given or "samples" in given or "reward_seeds" in given:
            if "max_failed_trials" not in given:
                given["max_failed_trials"] = 0  # recomputed from the new sizes
        return replace(self, **given)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


#: The search's θ of the handcrafted ``square`` form (``paploss.spec.form_theta("square")``, written out so that
#: reading a preset imports no torch): 5 functions × 8 control-point numbers, then the gradient scale 1.
SQUARE_THETA = [0.2, 0.04, 0.25, 0.125, 1 / 3, 5 / 21, 0.5, 7 / 16] * 5 + [0.5]

PRESETS: dict[str, Preset] = {
    # the plumbing end to end in a few minutes: tiny data, a few iterations per training
    "smoke": Preset(
        rounds=2, samples=2, parallelism=2,
        bundled={"n_train": 48, "n_val": 16, "image_size": 64},
        proxy={"preset": "smoke"},
        final={"preset": "smoke", "iterations": 8},
        pretrain={"iterations": 10, "batch_size": 8, "num_threads": 1},
        lr_sweep={"lrs": [0.01, 0.02], "iterations": 2, "warmup_iters": 1},
    ),
    # the README's main job: a real (small) search on the bundled shapes, about 10
    # minutes on 2 idle CPU cores (proxy trials shortened from the engine's quick preset)
    "quick": Preset(
        rounds=2, samples=4, parallelism=2,
        bundled={"n_train": 500, "n_val": 100},
        proxy={"preset": "quick", "iterations": 60, "warmup_iters": 10},
        final={"preset": "quick", "iterations": 120, "warmup_iters": 20},
        pretrain={"iterations": 200, "num_threads": 2},
    ),
    # the README's main job (`make run`): the method's gain over the baselines in under 10 minutes on 2 idle
    # CPU cores. The search starts at the handcrafted `square` (the controller's mean μ) with a small spread,
    # every PAP loss trains with detach_i3 (not the paper's), two trainings at a time with one thread each;
    # every final loss gets its best lr from a 2-point sweep on search-val
    "demo": Preset(
        rounds=2, samples=4, parallelism=2,
        bundled={"n_train": 500, "n_val": 100},
        proxy={"preset": "quick", "iterations": 80, "warmup_iters": 10, "detach_i3": True, "num_threads": 1},
        final={"preset": "quick", "iterations": 400, "warmup_iters": 40, "detach_i3": True, "num_threads": 1},
        pretrain={"iterations": 200, "num_threads": 2},
        controller={"mu": SQUARE_THETA, "sigma": 0.1},
        lr_sweep={"lrs": [0.01, 0.02], "iterations": 60, "warmup_iters": 6},
    ),
    # the paper's search: 40 rounds x 8 samples, 1-epoch proxies, 12-epoch final trainings (GPUs)
    "paper": Preset(
        rounds=40, samples=8, parallelism=8,
        proxy={"preset": "paper"},
        final={"preset": "paper", "epochs": 12, "lr_steps": [8 / 12, 11 / 12]},
        pretrain={"crop_size": 128, "iterations": 20000},
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None

