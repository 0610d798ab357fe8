"""``python -m bench.search`` / ``make bench-search``: does the searched loss win?

The paper's Tables 2 and 3 measured on the bundled datasets. For each
dataset (``shapes``, ``digits``):

1. prepare the data (train / val, and search-train / search-val cut out of train)
   and pre-train the warm start (the analogue of the paper's ImageNet backbone);
2. search a loss twice with PPO: ``searched`` (five separate functions and the
   gradient scale) and ``searched-shared`` (one function for all five places);
3. train the final detector from the same warm start with every loss — the two
   searched ones, ``focal+l1``, ``focal+giou``, the handcrafted ``sigmoid``,
   ``sqrt``, ``linear``, ``square`` and ``transfer`` (the loss searched on the
   *other* dataset; ``transfer-shared``, its shared search's, on request) — for
   each seed, and evaluate on the held-out ``val`` split, never on search-val.

All losses share the detector, the schedule, the data, the warm start and the
seeds; only the loss differs. Results go to ``<out>/bench_search.json``
(``{dataset: {loss: {"AP": [per seed], "AP50": [...], "AP75": [...]}}}``),
``<out>/bench_search.md`` (the table, mean ± std over seeds), the figures of the
searched functions and of the reward per round, and an MLflow run per dataset.

The searches and the finals are the product's own flow (:func:`paploss.flow.search`,
:func:`paploss.flow.finals`) with the benchmark's :class:`WarmStarts` as their map: a
process pool that trains each task from its warm start. What is the benchmark's
alone: several warm starts, the losses and seeds compared, the reward baseline
(:mod:`bench.baseline`), the report and the MLflow summary. Every piece is cached
under ``--work`` by the steps (search states per round, one JSON per trial and per
final training), so a stopped benchmark resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import click

from paploss import flow, presets, steps, storage
from paploss.search_cli import int_list
from paploss.spec import HANDCRAFTED_FORMS, grad_scale_from_theta
from paploss.spec_set import detector_names

__all__ = ["BenchConfig", "LOSSES", "KNOWN_LOSSES", "TRANSFERS", "split_scale", "BENCH_PRESETS", "WarmStarts",
           "run_search", "run_finals", "final_jobs", "run_bench", "summarize", "goal_check", "goal_lines", "goal_text",
           "reward_table", "mu_travel", "shared_options", "bench"]

DATASETS = ("shapes", "digits")  # the bundled datasets; a transfer loss takes its loss from the other one


def other_dataset(dataset: str) -> str:
    """The bundled dataset that is not ``dataset``: where its transfer losses come from."""
    return next(d for d in DATASETS if d != dataset)


SEARCH_MODES = ("searched", "searched-shared")  # the separate search's loss, the shared search's
START_FORMS = ("linear", "square", "sqrt")  # forms a search can start from (paploss.spec.form_theta); linear = SPEC's
LOSSES = ("searched", "searched-shared", "focal+l1", "focal+giou", "sigmoid", "sqrt", "linear", "square", "transfer")
# A transfer loss trains, on each dataset, the loss the named search found on the other one: "transfer" (the
# issue's, the separate search) and "transfer-shared" (the shared search: the form whose selected loss leads,
# BENCHMARKS.md, issue 8, finding 20; not in the default LOSSES, whose run it would lengthen by 6 finals).
TRANSFERS = {"transfer": "searched", "transfer-shared": "searched-shared"}
KNOWN_LOSSES = (*LOSSES, *(t for t in TRANSFERS if t not in LOSSES))


def start_theta(start: str, shared: bool) -> list[float]:
    """The starting mean θ of a search (41 numbers; 9 for the shared form) for ``start``:
    one of ``START_FORMS`` (that form's piecewise-linear θ in every function,
    :func:`paploss.spec.form_theta`), or a LossSpec JSON file of a searched loss (its
    functions and gradient scale: a search refining a loss found earlier). A shared loss
    starts the separate search with its one function in all five places; a separate
    loss cannot start the shared search. Errors name the file."""
    from paploss.spec import LossSpec, form_theta

    if start in START_FORMS:
        return form_theta(start, functions=1 if shared else 5)
    try:
        spec = LossSpec.from_json(storage.read_text(start))
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"start {start!r} is neither a form of {list(START_FORMS)} nor a readable LossSpec file: "
                         f"{exc}") from None
    if spec.form not in ("searched", "shared") or (shared and spec.form != "shared"):
        want = "a 'shared'" if shared else "a 'searched' or 'shared'"
        raise ValueError(f"start file {start}: its form is {spec.form!r}; the {'shared' if shared else 'separate'} "
                         f"search starts from {want} loss")
    theta = list(spec.to_theta())
    return theta if spec.form == "searched" or shared else theta[:8] * 5 + theta[8:]


# Beyond LOSSES, "<loss>@g<value>" names one of the handcrafted forms or searched losses
# with its gradient scale (SPEC §2) set to <value>: "square@g1.8", "searched-shared@g1".
# An ablation: which part of a searched loss's gain is its functions, which its scale.
SCALED = (*SEARCH_MODES, *HANDCRAFTED_FORMS)
METRICS = ("AP", "AP50", "AP75")


def split_scale(loss: str) -> tuple[str, float | None]:
    """``"square@g1.8"`` -> ``("square", 1.8)``; a name without ``@g`` -> ``(loss, None)``.
    Raises a ``ValueError`` naming the loss when the base is not one of ``SCALED`` or
    the scale is not a number in [0.1, 10] (the range of the searched scale)."""
    base, sep, value = loss.partition("@g")
    if not sep:
        return loss, None
    try:
        g = float(value)
    except ValueError:
        g = math.nan
    if base not in SCALED or not grad_scale_from_theta(0.0) <= g <= grad_scale_from_theta(1.0):
        raise ValueError(f"loss {loss!r}: '<loss>@g<scale>' needs a loss of {list(SCALED)} and a gradient scale "
                         f"in [0.1, 10], e.g. 'square@g1.8'")
    return base, g

# Sizes of the benchmark. "default" takes about 2 hours on 2 idle CPU cores (estimated from
# measured per-round and per-training times, BENCHMARKS.md); "smoke" checks the plumbing in minutes.
BENCH_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"pipeline_preset": "smoke", "rounds": 2, "samples": 2, "seeds": (0, 1)},
    "default": {"pipeline_preset": "quick", "rounds": 8, "samples": 4, "seeds": (0, 1, 2),
                "proxy_iterations": 150, "final_iterations": 400, "n_train": 1000, "n_val": 250, "sigma": 0.1},
}
# "default" with proxy trials as long as the final training: a better search (BENCHMARKS.md,
# issue 8, finding 6) at about 2.7x the search's cost
BENCH_PRESETS["long-proxy"] = {**BENCH_PRESETS["default"], "proxy_iterations": 400}
# The procedure that put the searched (shared) loss first on both datasets (BENCHMARKS.md, issue 8,
# findings 16, 18, 19): proxies and finals of 1200 iterations, the search started at square, the loss
# picked by training the 4 best samples again with seeds 1 and 2. About 1 h 20 min per dataset on 2 idle
# CPU cores for the shared search, its selection and two losses' 3 seeds; each further loss adds about 6 min.
BENCH_PRESETS["select-1200"] = {**BENCH_PRESETS["default"], "rounds": 6, "proxy_iterations": 1200,
                                "final_iterations": 1200, "start": "square", "select_top": 4, "select_seeds": (1, 2)}
# select-1200 from strong warm starts (3000 pre-training iterations: the digits backbone then classifies
# 88-91 % of its crops, as the paper's ImageNet backbone knows its classes), the procedure of BENCHMARKS.md,
# issue 8, findings 34-36 on digits: 3 warm starts, every PAP loss with detach_i3, 4 rounds x 8 samples at
# sigma 0.2 on 5 search splits of 1000 search-val images, the selection across the warm starts, each round
# set against square, the searched loss against square over 9 paired seeds. Its search tag is finding 35's,
# so a --work holding that search takes it up. About 2 h 45 min on 2 idle CPU cores, estimated from its
# parts (never run whole): 19 min of warm starts, about 70 of search, 15 of selection, 12 of square
# trainings for the baseline, 45 of finals. --final-iterations 3000 for finding 36's finals.
BENCH_PRESETS["strong-start"] = {
    **BENCH_PRESETS["select-1200"], "datasets": ("digits",), "losses": ("searched", "square"),
    "seeds": tuple(range(9)), "rounds": 4, "samples": 8, "sigma": 0.2, "pretrain_iterations": 3000,
    "warm_starts": 3, "select_warm_starts": True, "detach_i3": True, "search_splits": 5, "n_train": 2000,
    "search_val_fraction": 0.5, "reward_baseline": "square", "search_tag": "s2x8"}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures; the defaults are the ``default`` preset."""

    datasets: tuple[str, ...] = ("shapes", "digits")
    losses: tuple[str, ...] = LOSSES
    seeds: tuple[int, ...] = (0, 1, 2)
    pipeline_preset: str = "quick"  # paploss.steps preset: data sizes, warm start, proxy and final schedules
    rounds: int = 3
    samples: int = 4
    proxy_iterations: int | None = None  # None: the pipeline preset's proxy schedule
    final_iterations: int | None = None  # None: the pipeline preset's final schedule
    # iterations of the warm starts' pre-training (None: the pipeline preset's, 200 for quick, whose
    # digits backbone classifies about 38 % of its training crops); other ones are other warm starts,
    # cached beside the preset's under their own keys
    pretrain_iterations: int | None = None
    n_train: int | None = None  # images of the bundled train split (None: the pipeline preset's)
    n_val: int | None = None  # images of the bundled val split (None: the pipeline preset's)
    sigma: float | None = None  # the policy's starting spread (None: the controller's default, 0.2)
    # proxy trainings per sampled loss, seeds steps.REWARD_SEED_STRIDE apart; its reward is their mean.
    # With select_warm_starts, the j-th trains from warm start j mod warm_starts (as selection seed j does)
    reward_seeds: int = 1
    # search-train/search-val splits drawn from train; search round r trains and scores on split r mod
    # search_splits, the selection on split rounds mod search_splits (steps.prepare_data, init_search)
    search_splits: int = 1
    # the share of train each search split holds out as search-val: the images behind each reward
    search_val_fraction: float = 0.2
    start: str = "linear"  # the searches' starting mean: the identity (SPEC §2) or another form's θ (form_theta)
    select_top: int = 0  # selection after each search: its best samples trained again (0: off, the loss is μ)
    select_seeds: tuple[int, ...] = (1, 2, 3)  # the selection's training seeds
    select_rank: str = "reward"  # how the selection picks its candidates (steps.SELECT_RANKS)
    # the selection's seed s trains from warm start s mod warm_starts (as final seed s does) instead of
    # the search's: the loss picked is the one best across warm starts, not on the search's own
    select_warm_starts: bool = False
    # a handcrafted form (HANDCRAFTED_FORMS) trained as each search round's samples and the selection's
    # candidates were, so that the report and MLflow set their rewards against it (bench.baseline; "" off)
    reward_baseline: str = ""
    # (dataset, mode, LossSpec file): that loss is the searched loss `mode` on `dataset`, and
    # that search is not run (a loss found earlier, elsewhere, or on a GPU, benchmarked here)
    loss_files: tuple[tuple[str, str, str], ...] = ()
    # warm starts (pre-training seeds seed, seed + 1, ...): final seed k trains from warm
    # start k mod warm_starts; the searches from the first. The finals move by several AP
    # with the warm start (BENCHMARKS.md, issue 8, finding 19): more than one measures a
    # loss's lead across them, not on one
    warm_starts: int = 1
    # proxy trials whose positives' mean box quality u stays below this stop early (TrainConfig.box_collapse:
    # a quarter of the separate search's early samples train their boxes worse and find nothing; finding 26)
    box_collapse: float | None = None
    # every PAP-loss training (proxies, selection, the finals of the searched and handcrafted losses) without
    # the gradient into the boxes through I3 (pap_loss's detach_i3; not SPEC §1; finding 26). Its searches
    # carry "-detach-i3" in their names and its finals their own keys, beside the SPEC's in one --work
    detach_i3: bool = False
    # appended to every search's name ("-<tag>"): a search with other rounds, samples or sigma beside an
    # earlier one in the same --work (whose data, warm starts and finals it shares) instead of refused
    search_tag: str = ""
    jobs: int = 2  # trainings run at a time (one CPU thread each)
    # every training's detector (paploss search --detector: a name of paploss.spec_set.detector_names or
    # mmdet:<config>; "" = the pipeline preset's). The command keeps another detector's cache in --work/<detector>
    detector: str = ""
    work: str = "runs/bench"
    out: str = "docs"

    def __post_init__(self) -> None:
        unknown = sorted(loss for loss in set(self.losses) if split_scale(loss)[0] not in KNOWN_LOSSES)
        if unknown:
            raise ValueError(f"losses {unknown} are unknown; known: {list(KNOWN_LOSSES)}")
        bad = sorted(set(self.datasets) - set(DATASETS))
        if bad:
            raise ValueError(f"datasets {bad} are unknown; known: {', '.join(DATASETS)}")
        for name in ("n_train", "n_val", "proxy_iterations", "final_iterations", "pretrain_iterations"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 (or None for the pipeline preset's)")
        if self.box_collapse is not None and not 0.0 < self.box_collapse < 1.0:
            raise ValueError(f"box_collapse={self.box_collapse} must be a box quality in (0, 1)")
        if self.sigma is not None and not 0.0 < self.sigma <= 1.0:
            raise ValueError(f"sigma={self.sigma} must be in (0, 1]")
        if self.detector and not self.detector.startswith("mmdet:") and self.detector not in detector_names():
            raise ValueError(f"detector {self.detector!r} is unknown; known: {', '.join(detector_names())} "
                             "or mmdet:<config file>")
        steps.check_reward_seeds(self.reward_seeds)  # a StepError is a ValueError
        steps.check_search_splits(self.search_splits)
        steps.check_search_val_fraction(self.search_val_fraction)
        steps.check_selection(self.select_top, self.select_seeds, search_seed=0, reward_seeds=self.reward_seeds)
        steps.check_select_rank(self.select_rank)
        self._check_loss_files()
        given = {(d, m) for d, m, _ in self.loss_files}
        for mode in {m for d, modes in self.searches().items() for m in modes if (d, m) not in given}:
            start_theta(self.start, shared=mode == "searched-shared")  # a bad start file is named before any training
        if self.warm_starts < 1:
            raise ValueError(f"warm_starts={self.warm_starts} must be >= 1")
        if self.reward_baseline and self.reward_baseline not in HANDCRAFTED_FORMS:
            raise ValueError(f"reward_baseline={self.reward_baseline!r} is not a handcrafted form; known: "
                             f"{list(HANDCRAFTED_FORMS)}")
        if self.search_tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}", self.search_tag):
            raise ValueError(f"search_tag={self.search_tag!r} must be 1-40 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if self.select_warm_starts and (self.warm_starts < 2 or not self.select_top):
            raise ValueError(f"select_warm_starts needs a selection (select_top={self.select_top}) and more than "
                             f"one warm start (warm_starts={self.warm_starts})")
        if self.rounds < 1 or self.samples < 2 or not self.seeds or self.jobs < 1:
            raise ValueError(
                f"rounds={self.rounds} (>= 1), samples={self.samples} (>= 2), seeds={self.seeds} (non-empty), "
                f"jobs={self.jobs} (>= 1) are out of range"
            )

    def _needed(self) -> dict[str, list[str]]:
        """``{dataset: [modes]}``: the searched losses this run trains, each on its own
        dataset (a searched loss compared, scaled or not) or on the other one (what a
        transfer loss takes from it), in ``SEARCH_MODES`` order. A dataset that is not
        benchmarked appears when a transfer needs its loss: that loss must be a file."""
        own = {split_scale(loss)[0] for loss in self.losses}
        taken = {TRANSFERS[t] for t in TRANSFERS if t in self.losses}
        needed = {d: [m for m in SEARCH_MODES if d in self.datasets and m in own
                      or other_dataset(d) in self.datasets and m in taken] for d in DATASETS}
        return {d: modes for d, modes in needed.items() if d in self.datasets or modes}

    @property
    def selection_warm_starts(self) -> int:
        """How many warm starts the selection trains from: ``warm_starts`` with
        ``select_warm_starts``, else 1 (the search's)."""
        return self.warm_starts if self.select_warm_starts else 1

    def searches(self) -> dict[str, list[str]]:
        """``{dataset: [modes]}`` of each benchmarked dataset: the searches this run needs,
        for its own searched losses and for the other dataset's transfer losses (a loss
        given as a file stands in for its search)."""
        return {d: modes for d, modes in self._needed().items() if d in self.datasets}

    def _check_loss_files(self) -> None:
        needed = self._needed()
        seen = set()
        for dataset, mode, path in self.loss_files:
            where = f"loss file {dataset}:{mode}={path}"
            if dataset not in needed:
                raise ValueError(f"{where}: dataset {dataset!r} is not benchmarked (datasets: {list(self.datasets)})"
                                 " and no transfer loss takes its loss")
            if mode not in SEARCH_MODES:
                raise ValueError(f"{where}: {mode!r} is not a searched loss; one of {list(SEARCH_MODES)}")
            if mode not in needed[dataset]:
                what = "among the losses compared" if dataset in self.datasets else "taken by a transfer loss"
                raise ValueError(f"{where}: loss {mode!r} is not {what} ({list(self.losses)})")
            if (dataset, mode) in seen:
                raise ValueError(f"{where}: {dataset}:{mode} is given twice")
            seen.add((dataset, mode))
        for dataset, mode in [(d, m) for d, modes in needed.items() if d not in self.datasets for m in modes
                              if (d, m) not in seen]:
            transfer = next(t for t, m in TRANSFERS.items() if m == mode)
            raise ValueError(f"loss {transfer!r} trains the {mode} loss found on {dataset}, which this run does not "
                             f"benchmark: add it to --datasets, or give that loss as --loss-file {dataset}:{mode}=FILE")

    def given_specs(self) -> dict[tuple[str, str], str]:
        """``{(dataset, mode): LossSpec JSON}`` of ``loss_files``, each file read and
        checked: valid, and of its mode's form (five functions for ``searched``, one
        for ``searched-shared``). Errors name the file."""
        from paploss.spec import LossSpec

        given = {}
        for dataset, mode, path in self.loss_files:
            try:
                spec = LossSpec.from_json(storage.read_text(path))
            except (FileNotFoundError, ValueError) as exc:
                raise ValueError(f"loss file {path} ({dataset}:{mode}): {exc}") from None
            form = "shared" if mode == "searched-shared" else "searched"
            if spec.form != form:
                raise ValueError(f"loss file {path} ({dataset}:{mode}): its form is {spec.form!r}; "
                                 f"a {mode} loss has form {form!r}")
            given[(dataset, mode)] = spec.to_json()
        return given

    def search_name(self, dataset: str, mode: str) -> str:
        """The search's name in ``work``: ``bench-<dataset>-<mode>``, then ``-detach-i3``
        with ``detach_i3``, ``-rs<n>`` with ``reward_seeds`` n > 1, ``-ss<n>`` with
        ``search_splits`` n > 1, ``-pt<n>`` from warm starts of ``pretrain_iterations`` n,
        and started from a loss
        file ``-start-<first 8 hex digits of the file's sha256>``, then ``-<search_tag>``
        when given, so that such a search lives beside the others in one ``--work`` and
        shares its data, warm starts and the other losses' finals."""
        name = f"bench-{dataset}-{mode}" + ("-detach-i3" if self.detach_i3 else "")
        name += f"-rs{self.reward_seeds}" if self.reward_seeds > 1 else ""
        name += f"-ss{self.search_splits}" if self.search_splits > 1 else ""
        name += f"-pt{self.pretrain_iterations}" if self.pretrain_iterations else ""
        if self.start not in START_FORMS:
            name = f"{name}-start-{hashlib.sha256(storage.read_bytes(self.start)).hexdigest()[:8]}"
        return f"{name}-{self.search_tag}" if self.search_tag else name

    def controller(self, p: presets.Preset, mode: str) -> dict[str, Any]:
        """Controller options of the ``mode`` search (one of ``SEARCH_MODES``) under preset ``p``."""
        shared = mode == "searched-shared"
        options = {**p.controller, **({"shared": True} if shared else {})}
        if self.start != "linear":  # linear: the Controller's own start, the identity
            from paploss.spec_set import head_names

            # one block per PAP-loss head of the detector (two for a Faster R-CNN), each the start's θ
            heads = len(head_names(p.detector)) if p.detector else 0
            options["mu"] = list(start_theta(self.start, shared)) * max(1, heads)
        return options

    def preset(self, dataset: str) -> presets.Preset:
        p = presets.get_preset(self.pipeline_preset).with_overrides(
            dataset=f"bundled:{dataset}", rounds=self.rounds, samples=self.samples, search_splits=self.search_splits,
            search_val_fraction=float(self.search_val_fraction),
        )
        if self.proxy_iterations:
            p = p.with_overrides(proxy={**p.proxy, "iterations": int(self.proxy_iterations), "epochs": None})
        if self.final_iterations:
            p = p.with_overrides(final={**p.final, "iterations": int(self.final_iterations), "epochs": None})
        if self.pretrain_iterations:
            p = p.with_overrides(pretrain={**p.pretrain, "iterations": int(self.pretrain_iterations)})
        if self.box_collapse is not None:
            p = p.with_overrides(proxy={**p.proxy, "box_collapse": float(self.box_collapse)})
        if self.detach_i3:
            p = p.with_overrides(proxy={**p.proxy, "detach_i3": True}, final={**p.final, "detach_i3": True})
        if self.sigma is not None:
            p = p.with_overrides(controller={**p.controller, "sigma": float(self.sigma)})
        sizes = {k: int(v) for k, v in (("n_train", self.n_train), ("n_val", self.n_val)) if v}
        if sizes:
            p = p.with_overrides(bundled={**p.bundled, **sizes})
        if self.detector:  # the search's θ then has 41 numbers per PAP-loss head (steps.init_search)
            p = p.with_overrides(detector=self.detector)
        return p


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def cuda_mps(enabled: bool = True, folder: str = "/tmp/paploss-mps") -> Iterator[bool]:
    """CUDA MPS for the processes started inside (the pool's trainings): with it the
    GPU runs their kernels side by side instead of switching contexts between them
    (16 concurrent 1200-iteration trainings on an H100: 6-7x the throughput of
    time-slicing, finding 16; on an H200, 16 at a time kept it 90-98 % busy, finding 27:
    BENCHMARKS.md, issue 8). Used by ``python -m bench.search --mps`` and ``bench.device_search``.
    Yields whether MPS runs: False without CUDA, without ``nvidia-cuda-mps-control``,
    when disabled, or when ``CUDA_MPS_PIPE_DIRECTORY`` is set already (a daemon someone
    else runs)."""
    import torch

    binary = shutil.which("nvidia-cuda-mps-control")
    if not (enabled and binary and torch.cuda.is_available()) or os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        yield False
        return
    env = {"CUDA_MPS_PIPE_DIRECTORY": f"{folder}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{folder}/log"}
    for path in env.values():
        os.makedirs(path, exist_ok=True)
    started = subprocess.run([binary, "-d"], env={**os.environ, **env}, capture_output=True, text=True)
    if started.returncode != 0:
        _log(f"CUDA MPS did not start ({started.stderr.strip() or started.returncode}); time-slicing instead")
        yield False
        return
    os.environ.update(env)  # children (spawned after this) connect to the daemon
    try:
        yield True
    finally:
        subprocess.run([binary], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True)
        for key in env:
            os.environ.pop(key, None)


def _pool(jobs: int) -> ProcessPoolExecutor:
    # spawn: each worker imports torch afresh (no forked OpenMP state)
    return ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))


# ----------------------------------------------------------------------------------
# The search and the finals: paploss.flow's, trainings `jobs` at a time, each from its warm start
# ----------------------------------------------------------------------------------


class OutOfTime(Exception):
    """A batch of a search's trials did not finish before the :class:`WarmStarts` deadline."""


class NotCached(Exception):
    """A report-only run met a trial that is not cached: its search is read up to there."""


class _Untrained(BaseException):
    # raised in place of a training in a report-only run; a BaseException, so that a proxy
    # trial (which records an Exception as a failed result) lets it through and writes nothing
    pass


def _refuse_training(*args, **kwargs):
    raise _Untrained


@contextlib.contextmanager
def _no_training() -> Iterator[None]:
    """Within: the steps find cached results as usual, and raise :class:`_Untrained`
    where they would train."""
    from paploss.steps import finals, trials

    saved = trials._run_training, finals._run_training
    trials._run_training = finals._run_training = _refuse_training
    try:
        yield
    finally:
        trials._run_training, finals._run_training = saved


def _with_init(fn: Callable, init: str | None) -> Callable:
    """The flow's task ``fn`` (a ``functools.partial``) with its argument ``init``, the
    warm start, set to ``init`` (None: ``fn`` as it is)."""
    if init is None:
        return fn
    bound = inspect.signature(fn.func).bind_partial(*fn.args, **fn.keywords)
    if "init" not in bound.arguments:
        raise TypeError(f"the flow's task {fn.func.__name__} binds no warm start 'init'")
    bound.arguments["init"] = init
    return functools.partial(fn.func, *bound.args, **bound.kwargs)


@dataclasses.dataclass(frozen=True)
class WarmStarts:
    """The :data:`paploss.flow.Map` the benchmark gives :func:`paploss.flow.search` and
    :func:`paploss.flow.finals`: the flow's tasks side by side in ``pool``, each from its
    own warm start (``warm_start``): a round's trial with reward seed ``repeat`` j from
    ``search[j mod n]``, a selection trial of seed s from ``select[s mod n]``, a final of
    seed k from ``finals[k mod n]``; an empty tuple keeps the flow's warm start.

    Without a ``pool`` (report only) the tasks run here and train nothing: a trial not
    cached raises :class:`NotCached`, a final not cached gives None. With a ``deadline``
    (``time.monotonic()``) the tasks unfinished by then are cancelled: trials raise
    :class:`OutOfTime`, finals give None."""

    pool: Executor | None
    search: tuple = ()
    select: tuple = ()
    finals: tuple = ()
    deadline: float | None = None

    def init_of(self, item: Any) -> str | None:
        """The warm start of one of the flow's tasks (None: the flow's own)."""
        if isinstance(item, flow.Final):
            inits, index = self.finals, item.seed or 0
        elif isinstance(item, str) and item.startswith("{"):  # a proxy trial
            t = json.loads(item)
            inits, index = (self.select, t["seed"]) if "candidate" in t else (self.search, t.get("repeat", 0))
        else:
            return None
        return warm_start(inits, int(index)) if inits else None

    def __call__(self, fn: Callable, items: Sequence[Any]) -> list:
        tasks = [(_with_init(fn, self.init_of(item)), item) for item in items]
        if self.pool is None:
            return [self._cached(task, item) for task, item in tasks]
        futures = [self.pool.submit(task, item) for task, item in tasks]
        timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        _, pending = cf.wait(futures, timeout=timeout)
        for f in pending:
            f.cancel()
        if pending and not all(isinstance(item, flow.Final) for item in items):
            raise OutOfTime(f"{len(pending)} of {len(futures)} trials unfinished at the deadline")
        return [None if f in pending else f.result() for f in futures]

    @staticmethod
    def _cached(task: Callable, item: Any) -> Any:
        try:
            with _no_training():
                return task(item)
        except _Untrained:
            if isinstance(item, flow.Final):
                return None
            raise NotCached(f"trial {item[:120]} is not cached") from None


def warm_start(inits: Sequence[str | None], seed: int) -> str | None:
    """The warm start training seed ``seed`` starts from: ``inits[seed mod len(inits)]``
    (the finals' and, across warm starts, the selection's rule)."""
    return inits[seed % len(inits)]


def search_preset(cfg: "BenchConfig", p: presets.Preset, mode: str) -> presets.Preset:
    """The preset of the ``mode`` search under the dataset's preset ``p``: its controller
    (start, shared form), reward seeds and selection; failed trials tolerated as
    before reward seeds (a quarter of rounds x samples)."""
    return p.with_overrides(controller=cfg.controller(p, mode), reward_seeds=cfg.reward_seeds,
                            select_top=cfg.select_top, select_seeds=list(cfg.select_seeds),
                            select_rank=cfg.select_rank, max_failed_trials=p.max_failed_trials)


def run_search(cfg: "BenchConfig", m: WarmStarts, p: presets.Preset, data: str, work: str, name: str, mode: str,
               report_only: bool = False) -> str | None:
    """The ``mode`` search ``name`` in one dataset's folder ``work`` (and its selection)
    through :func:`paploss.flow.search`, from warm start ``m.search[0]``; returns the state URI of its searched loss. Stopped
    early (``m``'s deadline, or a report-only run reaching what is not cached): the last
    finished round's state, or None with a selection (its loss is not chosen yet)."""
    if report_only and not storage.exists(steps.state_uri(work, name, 0)):
        return None
    _search_inputs(p, data, m.search, work, name, write=not report_only)
    s = flow.Search(preset=search_preset(cfg, p, mode), work=work, search_name=name)
    last = [steps.state_uri(work, name, 0)]
    start = [time.monotonic()]

    def on_round(out: Mapping[str, Any]) -> None:
        last[0] = out["state"]
        _log(f"{name} round {out['round']}/{p.rounds}: mean reward {out['mean_reward']:.4f}, "
             f"max {math.nan if out['max_reward'] is None else out['max_reward']:.4f} ({time.monotonic() - start[0]:.0f}s)")
        start[0] = time.monotonic()

    try:
        return flow.search(s, data, m.search[0], map=m, on_round=on_round)
    except steps.SearchExists as exc:  # the name is bench's: say how to give this search its own
        raise steps.StepError(f"{exc} (--search-tag TAG runs this one as {name}-TAG beside it)") from None
    except (NotCached, OutOfTime) as exc:
        _log(f"{name}: {exc}; its loss is the one after round {steps.load_controller(last[0]).round}"
             + (", not selected: left out" if cfg.select_top else ""))
        return None if cfg.select_top else last[0]


def final_name(loss: str) -> str:
    """The name a final of ``loss`` gets from ``steps.final_train`` (its result file): a
    baseline's own, else ``pap.<loss>`` with ``@`` as ``.`` (``square@g1.8`` ->
    ``pap.square.g1.8``; ``searched`` is the flow's name for a search's own loss)."""
    return loss if loss in steps.BASELINES else "pap." + loss.replace("@", ".")


def final_jobs(seeds: Sequence[int], losses: Sequence[str], specs: Mapping[str, str | None],
               inits: Sequence[str | None]) -> dict[tuple[str, int], flow.Final]:
    """``{(loss, seed): flow.Final}`` of every loss with a spec and every seed whose warm
    start (seed k: ``inits[k mod len(inits)]``) there is; the tag keeps seeds and warm
    starts apart."""
    return {(loss, seed): flow.Final(final_name(loss), specs[loss] or "", seed, f"-seed{seed}-w{seed % len(inits)}")
            for seed in seeds for loss in losses if loss in specs and warm_start(inits, seed)}


def run_finals(m: WarmStarts, p: presets.Preset, data: str, work: str, jobs: Mapping[tuple[str, int], flow.Final],
               name: str = "bench-finals") -> dict[tuple[str, int], dict]:
    """``{(loss, seed): result}`` of ``jobs`` (:func:`final_jobs`) through
    :func:`paploss.flow.finals` in ``work``'s search ``name``: trained on ``train`` and
    scored on ``val`` (never search-val) with the preset's final options (a baseline's
    without the PAP loss's own, ``steps.loss_options``) and its learning rate (no lr
    sweep: every loss compared at the same one); a final not cached in a report-only
    run, or past ``m``'s deadline, is left out."""
    s = flow.Search(preset=p, work=work, search_name=name)
    docs = flow.finals(s, data, m.finals[0], "", list(jobs.values()), map=m, lrs={})
    return {key: json.loads(doc) for key, doc in zip(jobs, docs) if doc is not None}


def _search_inputs(p: presets.Preset, data: str, inits: Sequence[str], work: str, name: str, write: bool) -> None:
    """What a cached search was trained on (data, warm start(s), proxy schedule, detector),
    kept beside it in ``bench-inputs.json``: a run with another ``--proxy-iterations``
    (say) in the same ``--work`` is refused, naming what differs, instead of reporting
    the old search as its own. A search cached before this file existed adopts it. The data
    and warm starts are written and compared as places in ``work`` (``storage.location_id``),
    so a ``--work`` spelled another way, or the work folder moved, is not refused (a file
    written before they were, with the paths as given, is still compared so)."""
    uri = storage.join(steps.search_dir(work, name), "bench-inputs.json")

    def ids(doc: Mapping[str, Any]) -> dict:
        return input_places(doc, lambda v: storage.location_id(v, work))

    now = {"data": data, "init": inits[0], "proxy": steps.plain(dict(p.proxy)), "detector": p.detector}
    if len(inits) > 1:  # reward seeds across warm starts (one warm start: the file as before they existed)
        now["inits"] = list(inits)
    now = ids(json.loads(json.dumps(now)))
    if storage.exists(uri):
        had = ids(storage.read_json(uri))
        diff = [f"{field}: {had.get(field)!r} there, {now[field]!r} now" for field in now
                if had.get(field) != now[field]]
        if diff:
            raise steps.StepError(f"search {name!r} in {work} was run on other inputs ({uri}): " + "; ".join(diff)
                                  + ". Use another --work for these settings.")
    elif write:
        storage.write_json(uri, now)


def input_places(inputs: Mapping[str, Any], where: Callable[[Any], Any]) -> dict:
    """A search's ``bench-inputs.json`` (``_search_inputs``) with ``where`` applied to its
    data and warm starts: ``storage.location_id`` to write or compare them as places in
    the work folder, ``storage.at_location`` to read them back as paths (``bench.reeval``)."""
    out = dict(inputs)
    for field in ("data", "init"):
        if field in out:
            out[field] = where(out[field])
    if isinstance(out.get("inits"), list):
        out["inits"] = [where(v) for v in out["inits"]]
    return out


@functools.cache  # a state file is written once under its round's name: read each one once
def _controller(state: str):
    return steps.load_controller(state)


@functools.cache  # likewise (a selection's state is named by its inputs' key)
def _searched_spec(state: str) -> str:
    return steps.searched_spec(state).to_json()


@functools.cache
def _selection(state: str) -> dict | None:
    """The selection a search state holds (``paploss.steps.select_loss``), or None."""
    return storage.read_json(state).get("selected")


def tree_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder's files (each one's relative name and bytes, in
    sorted order). Two machines that built the same data or warm start from the same
    key get the same digest; the report prints it, so a regenerated cache can be
    compared with one that is gone."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() if root.is_dir() else b"")
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def warm_start_info(uri: str) -> tuple[str, tuple[int | None, float | None]]:
    """(:func:`weights_digest`, (pre-training iterations, share of its training crops
    classified right over its last 20 iterations)) of a warm start, its file read once.
    The pair says how much of the classes the backbone knows before any detection
    training (``paploss.engine.pretrain`` records it); (None, None) if the file does not."""
    from paploss import checkpoints

    doc = checkpoints.load(uri, checkpoints.BACKBONE, keys=("state_dict",))
    return _state_digest(doc["state_dict"]), (doc.get("iterations"), doc.get("train_accuracy"))


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a warm start's weights: each tensor of its ``state_dict`` (name,
    dtype, shape, bytes) in sorted order. Unlike :func:`tree_digest` of the file it
    leaves out what the file records beside them (the data's path, the accuracy), so
    the same weights pre-trained under another ``--work`` get the same digest."""
    from paploss import checkpoints

    return _state_digest(checkpoints.load(str(path), checkpoints.BACKBONE, keys=("state_dict",))["state_dict"])


def _state_digest(state: Mapping[str, Any]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(b"\0")
    return h.hexdigest()


def platform_info() -> dict[str, Any]:
    """What a training ran on, beside its result: the same inputs and seed give the same
    AP to the last bit on one machine, but not across CPUs of another instruction set
    (BENCHMARKS.md, issue 8, finding 19)."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"torch": torch.__version__, "cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _found_specs(searched: Mapping[tuple[str, str], str],
                 given: Mapping[tuple[str, str], str] | None = None) -> dict[tuple[str, str], str]:
    """``{(dataset, mode): LossSpec JSON}`` of every searched loss: those of the search
    states in ``searched`` and those given as files (``BenchConfig.given_specs``)."""
    return {**{k: _searched_spec(state) for k, state in searched.items()}, **(given or {})}


def _loss_specs(cfg: BenchConfig, dataset: str, searched: Mapping[tuple[str, str], str],
                losses: Sequence[str] | None = None,
                given: Mapping[tuple[str, str], str] | None = None) -> dict[str, str | None]:
    """loss name -> LossSpec JSON (None for the focal baselines), for ``losses``
    (default: all of ``cfg.losses``); the searched ones from the search states in
    ``searched`` or from ``given`` (loss files)."""
    from paploss.spec import LossSpec

    found = _found_specs(searched, given)
    specs: dict[str, str | None] = {}
    for loss in cfg.losses if losses is None else losses:
        base, g = split_scale(loss)
        if g is not None:
            spec = _loss_specs(cfg, dataset, searched, [base], given).get(base)
            if spec is not None:  # else: its search has not run yet (report_only)
                specs[loss] = dataclasses.replace(LossSpec.from_json(spec), grad_scale=g).to_json()
        elif loss in ("focal+l1", "focal+giou"):
            specs[loss] = None
        elif loss in HANDCRAFTED_FORMS:
            specs[loss] = LossSpec.handcrafted(loss).to_json()
        elif loss in TRANSFERS:
            other = other_dataset(dataset)
            if (other, TRANSFERS[loss]) in found:  # else: not searched yet (report_only)
                specs[loss] = found[(other, TRANSFERS[loss])]
        elif (dataset, loss) in found:
            specs[loss] = found[(dataset, loss)]
    return specs


# ----------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------


def summarize(results: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]) -> str:
    """The Markdown table: AP, AP50, AP75 as mean ± std over seeds, per dataset.

    ``results``: ``{dataset: {loss: {"AP": [...], ...}}}`` with AP in [0, 1];
    the table shows AP points (×100) as the paper does."""
    lines = []
    for dataset, per_loss in results.items():
        lines += [f"### {dataset}", "", "| loss | seeds | AP | AP50 | AP75 |", "|---|---|---|---|---|"]
        for loss, metrics in per_loss.items():
            cells = []
            for m in METRICS:
                vals = [100.0 * v for v in metrics.get(m, [])]
                if not vals:
                    cells.append("–")
                elif len(vals) == 1:
                    cells.append(f"{vals[0]:.1f}")
                else:
                    cells.append(f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}")
            lines.append(f"| {loss} | {len(metrics.get('AP', []))} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def paired_se(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of the mean per-seed difference ``a[k] - b[k]`` (seed k of one
    loss against seed k of the other: same warm start, head initialisation and data
    order); NaN with fewer than 2 pairs."""
    diffs = [x - y for x, y in zip(a, b)]
    return statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan


def goal_check(results: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]], margin: float = 0.02,
               loss: str = "searched") -> dict:
    """The issue's goal, per dataset, from ``{dataset: {loss: {"AP": [per seed]}}}``,
    for the searched loss ``loss`` (``searched`` or ``searched-shared``).

    ``vs_focal``: mean AP of ``loss`` minus that of ``focal+l1``; ``beats_focal``:
    that gap is at least ``margin`` (2 AP points) *and* outside the seeds' spread
    (the worst searched seed above the best focal+l1 seed). ``vs_handcrafted``: the
    mean gap to each handcrafted form; ``beats_handcrafted``: every gap > 0.
    ``se_handcrafted``: the standard error of each gap from the per-seed paired
    differences (seed k of one loss against seed k of the other: same warm start,
    head initialisation and data order), when both have the same number (≥ 2) of
    seeds; ``clearly_beats_handcrafted``: every gap above twice its standard error,
    so that a win is told from a tie. Missing losses give ``None``."""
    out: dict[str, dict] = {}
    for dataset, per_loss in results.items():
        ap = {loss: list(m.get("AP", [])) for loss, m in per_loss.items() if m.get("AP")}
        searched = ap.get(loss)
        row: dict[str, Any] = {"loss": loss, "vs_focal": None, "beats_focal": None, "vs_handcrafted": {},
                               "beats_handcrafted": None, "se_handcrafted": {}, "clearly_beats_handcrafted": None}
        if searched and ap.get("focal+l1"):
            focal = ap["focal+l1"]
            row["vs_focal"] = statistics.mean(searched) - statistics.mean(focal)
            row["beats_focal"] = row["vs_focal"] >= margin and min(searched) > max(focal)
        if searched:
            gaps = {f: statistics.mean(searched) - statistics.mean(ap[f]) for f in HANDCRAFTED_FORMS if f in ap}
            row["vs_handcrafted"] = gaps
            row["beats_handcrafted"] = all(g > 0 for g in gaps.values()) if len(gaps) == len(HANDCRAFTED_FORMS) else None
            se = {f: paired_se(searched, ap[f]) for f in gaps if len(ap[f]) == len(searched) >= 2}
            row["se_handcrafted"] = se
            if row["beats_handcrafted"] is not None and len(se) == len(gaps):
                row["clearly_beats_handcrafted"] = all(gaps[f] > 2 * se[f] for f in gaps)
        out[dataset] = row
    return out


def goal_lines(check: Mapping[str, Mapping[str, Any]]) -> str:
    """``goal_check`` as Markdown lines (AP points)."""
    word = {True: "yes", False: "**no**", None: "not measured"}
    lines = []
    for dataset, row in check.items():
        focal = "–" if row["vs_focal"] is None else f"{100 * row['vs_focal']:+.1f}"
        se, loss = row["se_handcrafted"], row["loss"]
        hand = ", ".join(f"{f} {100 * g:+.1f}" + (f" ± {100 * se[f]:.1f}" if f in se else "")
                         for f, g in row["vs_handcrafted"].items()) or "–"
        clearly = row["clearly_beats_handcrafted"]
        lines.append(f"- {dataset}: {loss} − focal+l1 = {focal} AP (≥ +2.0 and outside the seeds' spread: "
                     f"{word[row['beats_focal']]}); {loss} − handcrafted: {hand} "
                     f"(beats every one: {word[row['beats_handcrafted']]}"
                     + (f"; by more than 2 standard errors of the per-seed gap: {word[clearly]}" if se else "") + ")")
    return "\n".join(lines)


def goal_text(results: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]) -> str:
    """``goal_lines`` for each searched loss that ``results`` holds (separate first, then shared)."""
    modes = [m for m in SEARCH_MODES if any(m in per_loss for per_loss in results.values())]
    return "\n".join(goal_lines(goal_check(results, loss=m)) for m in modes or ["searched"])


COLLAPSED = 1e-3  # a proxy reward (AP) below this: the trial's detector found (almost) nothing


def reward_table(histories: Mapping[str, Sequence[Sequence[float]]],
                 travel: Mapping[str, Sequence[tuple[float, float]]] | None = None,
                 noise: Mapping[str, Sequence[tuple[float, float] | None]] | None = None) -> str:
    """Markdown: per search and round the mean and max reward and how many trials
    collapsed (reward < ``COLLAPSED``), from ``{search name: [[reward per sample] per round]}``.
    With ``travel`` (``{search name: [(moved, to square) per round]}``, see
    :func:`mu_travel`) two more columns say where the policy's mean went; with
    ``noise`` (``{search name: [(spread, noise) or None per round]}``, see
    ``paploss.steps.round_noise``) one more says how far the rewards could rank the
    round's samples ("–" for a round without it)."""
    head = "| search | round | mean reward | max reward | collapsed |"
    if travel is not None:
        head += " ‖μ − μ₀‖ | ‖μ − square‖ |"
    if noise is not None:
        head += " spread / seed noise (sd) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, rounds in histories.items():
        for r, rewards in enumerate(rounds):
            if rewards:
                bad = sum(1 for x in rewards if x < COLLAPSED)
                line = (f"| {name} | {r + 1} | {statistics.mean(rewards):.4f} | {max(rewards):.4f} | "
                        f"{bad}/{len(rewards)} |")
                if travel is not None:
                    moved, to_square = travel[name][r]
                    line += f" {moved:.3f} | {to_square:.3f} |"
                if noise is not None:
                    got = noise[name][r]
                    line += f" {got[0]:.4f} / {got[1]:.4f} |" if got else " – |"
                lines.append(line)
    return "\n".join(lines)


def mu_travel(state: str) -> list[tuple[float, float]]:
    """Per finished round of a search: the Euclidean distance (over all θ numbers)
    of the policy's mean after the round to its starting mean, and to the θ of the
    piecewise-linear ``square`` (:func:`paploss.spec.form_theta`). The start is
    by default the identity, at distance 0.52 from ``square`` for a separate search (0.23 shared)."""
    from paploss.spec import form_theta

    c = _controller(state)
    if not c.history:
        return []
    start = c.history[0].mu
    groups = (c.dim - int(c.config.grad_scale)) // 8
    square = form_theta("square", functions=groups, grad_scale=c.config.grad_scale)
    return [(math.dist(rec.mu_after, start), math.dist(rec.mu_after, square)) for rec in c.history]


def _reward_history(state: str) -> list[list[float]]:
    return [list(rec.rewards) for rec in _controller(state).history]


def _figures(out: str, dataset: str, searched: Mapping[tuple[str, str], str],
             given: Mapping[tuple[str, str], str] | None = None, form: str = "",
             against: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> list[str]:
    """The searched functions of each searched loss of ``dataset`` and, for those
    that were searched here (not given as a file), the reward per round, with the
    reward baseline ``form``'s per round where ``against`` (``_against``) has it."""
    from paploss import plots  # the pipeline's figures, same look
    from paploss.spec import LossSpec

    written = []
    found = _found_specs(searched, given)
    for mode in SEARCH_MODES:
        if (dataset, mode) not in found:
            continue
        state = searched.get((dataset, mode))
        how = (" (given as a file)" if state is None
               else " (selected by re-evaluation)" if _selection(state) else "")
        figure = plots.functions_figure(LossSpec.from_json(found[(dataset, mode)]),
                                        title=f"{mode} loss on {dataset}{how}")
        written.append(storage.write_bytes(storage.join(out, f"bench_{dataset}_{mode}_functions.png"), figure))
        if state is None:
            continue
        path = storage.join(out, f"bench_{dataset}_{mode}_rewards.png")
        rows = (against or {}).get((dataset, mode), {}).get("rounds", [])
        figure = plots.reward_figure(_reward_history(state), steps.round_noise(state),
                                     [row["baseline"] if row else None for row in rows],
                                     f"{form} trained as the round's samples")
        written.append(storage.write_bytes(path, figure))
    return written


def _log_mlflow(tracking_uri: str, dataset: str, cfg: BenchConfig, per_loss: Mapping[str, Mapping[str, list]],
                figures: Sequence[str], searched: Mapping[tuple[str, str], str],
                given: Mapping[tuple[str, str], str] | None = None,
                against: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> None:
    """One run per dataset in the ``paploss-bench`` experiment, through a client of
    its own (no process-wide MLflow state is set: code run after this, a test
    or a pipeline, keeps its own tracking URI and experiment). With ``against``
    (``_against``), per search round ``<mode>.<form>_reward``, ``<mode>.mean_reward_minus_<form>``
    and ``<mode>.max_reward_minus_<form>`` (step: the round), and per selection candidate k
    ``<mode>.selection_minus_<form>`` (step: k)."""
    from mlflow.entities import Param

    from paploss.tracking import make_client

    client = make_client(tracking_uri)
    exp = client.get_experiment_by_name("paploss-bench")
    exp_id = exp.experiment_id if exp is not None else client.create_experiment("paploss-bench")
    run_id = client.create_run(exp_id, run_name=f"bench-{dataset}",
                               tags={"paploss.kind": "bench", "paploss.dataset": dataset}).info.run_id
    status = "FAILED"
    try:
        params = {"datasets": ",".join(cfg.datasets), "seeds": ",".join(map(str, cfg.seeds)),
                  "pipeline_preset": cfg.pipeline_preset, "rounds": cfg.rounds, "samples": cfg.samples,
                  "final_iterations": cfg.final_iterations, "proxy_iterations": cfg.proxy_iterations,
                  "pretrain_iterations": cfg.pretrain_iterations,
                  "n_train": cfg.n_train, "n_val": cfg.n_val, "sigma": cfg.sigma, "select_top": cfg.select_top,
                  "select_seeds": ",".join(map(str, cfg.select_seeds)), "select_rank": cfg.select_rank,
                  "loss_files": ",".join(f"{d}:{m}={f}" for d, m, f in cfg.loss_files) or "none",
                  "warm_starts": cfg.warm_starts, "select_warm_starts": cfg.select_warm_starts,
                  "detach_i3": cfg.detach_i3, "box_collapse": cfg.box_collapse,
                  "reward_baseline": cfg.reward_baseline or "none"}
        client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
        for loss, metrics in per_loss.items():
            for m, vals in metrics.items():
                if vals:
                    client.log_metric(run_id, f"{loss.replace('+', '_').replace('@', '.')}.{m}.mean",
                                      statistics.mean(vals))
        for mode in SEARCH_MODES:
            state = searched.get((dataset, mode))
            if state is not None:
                for r, rewards in enumerate(_reward_history(state)):
                    client.log_metric(run_id, f"{mode}.mean_reward", statistics.mean(rewards), step=r)
                for r, (moved, to_square) in enumerate(mu_travel(state)):
                    client.log_metric(run_id, f"{mode}.mu_moved", moved, step=r)
                    client.log_metric(run_id, f"{mode}.mu_to_square", to_square, step=r)
                g, form = (against or {}).get((dataset, mode)), cfg.reward_baseline
                for r, row in enumerate(g["rounds"] if g else []):
                    if row is not None:
                        client.log_metric(run_id, f"{mode}.{form}_reward", row["baseline"], step=r)
                        client.log_metric(run_id, f"{mode}.mean_reward_minus_{form}", row["mean"], step=r)
                        client.log_metric(run_id, f"{mode}.max_reward_minus_{form}", row["best"], step=r)
                for k, gap in enumerate(g["candidates"] if g else []):
                    if gap is not None:
                        client.log_metric(run_id, f"{mode}.selection_minus_{form}", gap, step=k)
        for (d, mode), spec in _found_specs(searched, given).items():
            if d == dataset:
                client.log_text(run_id, spec, f"{mode}_loss_spec.json")
        for mode in SEARCH_MODES:
            if mode not in per_loss:
                continue
            tag = "shared." if mode == "searched-shared" else ""
            goal = goal_check({dataset: per_loss}, loss=mode)[dataset]
            if goal["vs_focal"] is not None:
                client.log_metric(run_id, f"goal.{tag}searched_minus_focal_l1.AP", goal["vs_focal"])
            for form, gap in goal["vs_handcrafted"].items():
                client.log_metric(run_id, f"goal.{tag}searched_minus_{form}.AP", gap)
            client.set_tag(run_id, f"goal.{tag}beats_focal_l1", str(goal["beats_focal"]))
            client.set_tag(run_id, f"goal.{tag}beats_handcrafted", str(goal["beats_handcrafted"]))
        client.log_dict(run_id, {loss: dict(m) for loss, m in per_loss.items()}, "bench_search.json")
        for f in figures:
            if not storage.is_s3(f):
                client.log_artifact(run_id, f)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)


def run_bench(cfg: BenchConfig, tracking_uri: str | None = None, report_only: bool = False) -> dict:
    """The whole benchmark; returns ``{dataset: {loss: {metric: [per seed]}}}``.

    Order: per dataset the searches and then its final trainings, then the
    transfer trainings (they need both searches). The results files are
    rewritten after each phase, so a stopped run leaves a usable partial table.

    ``report_only``: train nothing; write the results of what ``cfg.work`` already
    holds (each search as far as its trials are cached, the finished final trainings;
    the rest is left out of the tables), for instance while another process runs."""
    if report_only:
        return _run(cfg, None, tracking_uri, report_only=True)
    with _pool(cfg.jobs) as pool:  # one pool for the whole run: a worker imports torch once
        return _run(cfg, pool, tracking_uri)


def _finals(cfg: BenchConfig, m: WarmStarts, dataset: str, p: presets.Preset, data: str,
            specs: Mapping[str, str | None], losses: Sequence[str], per_loss: dict[str, dict[str, list[float]]]) -> None:
    """Every seed of ``losses`` (seed k from warm start k mod ``cfg.warm_starts``) into ``per_loss``."""
    jobs = final_jobs(cfg.seeds, losses, specs, m.finals)
    docs = run_finals(m, p, data, storage.join(cfg.work, dataset), jobs)
    for (loss, seed) in jobs:
        doc = docs.get((loss, seed))
        if doc is None:
            continue
        for metric in METRICS:
            per_loss.setdefault(loss, {k: [] for k in METRICS})[metric].append(float(doc["metrics"].get(metric, math.nan)))
        _log(f"{dataset} {loss} seed {seed}: AP {doc['metrics'].get('AP', math.nan):.4f} ({doc['seconds']:.0f}s)")


def selection_text(searched: Mapping[tuple[str, str], str], warm_starts: int = 1, rank: str = "reward") -> str:
    """The selection stage's candidates per search (mean reward over the new seeds), if
    any; ``warm_starts`` > 1: the selection trained seed s from warm start s mod it;
    ``rank``: how the candidates were picked (``steps.SELECT_RANKS``)."""
    lines = []
    for (d, mode), state in sorted(searched.items()):
        sel = _selection(state)
        if not sel:
            continue
        means = ", ".join(f"{100 * c['mean_reward']:.1f}" for c in sel["candidates"])
        seeds = sorted(sel["candidates"][0]["rewards"], key=int)
        where = f" (seed s from warm start s mod {warm_starts})" if warm_starts > 1 else ""
        order = "best search reward" + (" relative to its round's mean" if rank == "round" else "")
        lines.append(f"- `{mode}` on {d}: candidates ({order} first) re-trained with seeds "
                     f"{', '.join(seeds)}{where}, mean AP x 100 on search-val {means}; selected candidate "
                     f"{sel['candidate']}")
    return "\n\n## Selection by re-evaluation\n\n" + "\n".join(lines) if lines else ""


def parse_loss_file(text: str) -> tuple[str, str, str]:
    """``"shapes:searched-shared=path.json"`` -> ``("shapes", "searched-shared", "path.json")``."""
    head, sep, path = text.partition("=")
    dataset, colon, mode = head.partition(":")
    if not (sep and colon and dataset and mode and path):
        raise ValueError(f"--loss-file {text!r} is not DATASET:MODE=FILE (e.g. shapes:searched-shared=loss.json)")
    return dataset.strip(), mode.strip(), path.strip()


def loss_file(out: str, dataset: str, mode: str) -> str:
    """Where a run writes the loss one of its searches found (``mode`` one of
    ``SEARCH_MODES``): a LossSpec JSON file that ``paploss train --spec`` takes, so the
    loss outlives the ``--work`` cache it came from."""
    return storage.join(out, f"bench_{dataset}_{mode}_loss.json")


def inputs_text(inputs: Mapping[str, Mapping[str, Any]]) -> str:
    """The data and warm start each dataset's trainings shared, with their digests
    (``tree_digest``, ``weights_digest``), and the platform of this run: what tells whether two runs'
    numbers come from the same inputs."""
    lines = [f"- {d}: data `{i['data']}` (sha256 `{i['data_sha256'][:16]}`), "
             + ", ".join(f"warm start {w} `{uri}` (weights sha256 `{sha[:16]}`"
                         + (f", crop accuracy {100 * acc:.0f} % after {n} iterations)" if acc is not None else ")")
                         for w, (uri, sha, (n, acc)) in enumerate(i["inits"]))
             for d, i in sorted(inputs.items())]
    info = platform_info()
    lines.append(f"- platform of this run: torch {info['torch']}, {info['cpu']} ({info['cpu_capability']}), "
                 f"{info['cuda'] or 'no GPU'}")
    return "\n\n## Inputs\n\n" + "\n".join(lines) + "\n"


def _write_results(cfg: BenchConfig, results: Mapping, searched: Mapping[tuple[str, str], str], done: bool,
                   given: Mapping[tuple[str, str], str] | None = None,
                   inputs: Mapping[str, Mapping[str, Any]] | None = None,
                   against: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> None:
    from bench.baseline import gaps_text

    storage.write_json(storage.join(cfg.out, "bench_search.json"), results)
    found = _found_specs(searched, given)
    for (d, mode), spec in found.items():
        storage.write_text(loss_file(cfg.out, d, mode), spec + "\n")
    files = {(d, mode): path for d, mode, path in cfg.loss_files}
    specs_md = "\n".join(
        f"- `{mode}` on {d} (`{os.path.basename(loss_file(cfg.out, d, mode))}`, for `paploss train --spec`"
        + (f"; given as `{files[(d, mode)]}`, not searched in this run" if (d, mode) in files else "")
        + f"): `{spec}`" for (d, mode), spec in sorted(found.items())
    )
    status = "" if done else "**Partial: not every training had finished when this was written.**\n\n"
    storage.write_text(storage.join(cfg.out, "bench_search.md"),
                       "# Search-quality benchmark\n\n" + status
                       + f"Config: `{json.dumps(dataclasses.asdict(cfg))}`\n\n"
                       + summarize(results) + "\n## The goal (issue 8)\n\n" + goal_text(results)
                       + ("\n\n## Searches (reward: COCO AP of the proxy on search-val)\n\n"
                          + reward_table({f"{m} on {d}": _reward_history(s) for (d, m), s in sorted(searched.items())},
                                         {f"{m} on {d}": mu_travel(s) for (d, m), s in sorted(searched.items())},
                                         {f"{m} on {d}": steps.round_noise(s) for (d, m), s in sorted(searched.items())})
                          if searched else "")
                       + selection_text(searched, cfg.selection_warm_starts, cfg.select_rank)
                       + gaps_text(cfg.reward_baseline, {f"{m} on {d}": g for (d, m), g in sorted((against or {}).items())})
                       + "\n\n## Searched losses\n\n" + specs_md + "\n"
                       + (inputs_text(inputs) if inputs else ""))


def _run(cfg: BenchConfig, pool: ProcessPoolExecutor | None, tracking_uri: str | None,
         report_only: bool = False) -> dict:
    searches = cfg.searches()
    searched: dict[tuple[str, str], str] = {}
    given = cfg.given_specs()  # searched losses given as files: their searches are not run
    prepared: dict[str, tuple[presets.Preset, str, WarmStarts]] = {}
    inputs: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    against: dict[tuple[str, str], dict[str, Any]] = {}  # each search against cfg.reward_baseline (bench.baseline)
    for dataset in cfg.datasets:
        p = cfg.preset(dataset)
        work = storage.join(cfg.work, dataset)
        data = steps.prepare_data(p.dataset, work, split_seed=p.split_seed, bundled=p.bundled, only_cached=report_only,
                                  search_splits=p.search_splits, search_val_fraction=p.search_val_fraction)
        inits = tuple(steps.pretrain(data, work, config=p.pretrain, seed=p.seed + w, detector=p.detector,
                                     only_cached=report_only) for w in range(cfg.warm_starts)) if data else (None,)
        if not inits[0]:  # report_only and nothing cached for this dataset yet
            _log(f"{dataset}: no data or warm start in {cfg.work} yet; left out")
            continue
        select_inits = inits[:cfg.selection_warm_starts]  # the selection's seed s: warm_start(select_inits, s)
        # the search's reward seed j: warm_start(search_inits, j) (one warm start: the search's own)
        m = WarmStarts(pool, search=select_inits if cfg.reward_seeds > 1 else inits[:1], select=select_inits,
                       finals=inits)
        prepared[dataset] = (p, data, m)
        inputs[dataset] = {"data": data, "data_sha256": tree_digest(storage.localize(data)),
                           "inits": [(uri, *warm_start_info(uri)) for uri in inits if uri]}
        for mode in searches[dataset]:
            if (dataset, mode) not in given:
                state = run_search(cfg, m, p, data, work, cfg.search_name(dataset, mode), mode, report_only)
                if state is not None:
                    searched[(dataset, mode)] = state
        if cfg.reward_baseline:
            for mode in searches[dataset]:
                if (dataset, mode) in searched:  # searched here (a loss given as a file has no rounds)
                    against[(dataset, mode)] = _against(cfg, pool, p, data, work, searched[(dataset, mode)], m)
        own = [loss for loss in cfg.losses if loss not in TRANSFERS]
        results[dataset] = {}
        _finals(cfg, m, dataset, p, data, _loss_specs(cfg, dataset, searched, own, given), own, results[dataset])
        _write_results(cfg, results, searched, done=False, given=given, inputs=inputs, against=against)
    transfers = [loss for loss in cfg.losses if loss in TRANSFERS]
    for dataset, (p, data, m) in prepared.items() if transfers else ():
        _finals(cfg, m, dataset, p, data, _loss_specs(cfg, dataset, searched, transfers, given), transfers,
                results[dataset])
    for dataset in prepared:
        figures = _figures(cfg.out, dataset, searched, given, cfg.reward_baseline, against)
        if tracking_uri:
            _log_mlflow(tracking_uri, dataset, cfg, results[dataset], figures, searched, given, against)
    complete = len(prepared) == len(cfg.datasets) and all(
        len(results[d].get(loss, {}).get("AP", [])) == len(cfg.seeds) for d in cfg.datasets for loss in cfg.losses)
    _write_results(cfg, results, searched, done=complete, given=given, inputs=inputs, against=against)
    return results


def _against(cfg: BenchConfig, pool: ProcessPoolExecutor | None, p: presets.Preset, data: str, work: str,
             state: str, m: WarmStarts) -> dict[str, Any]:
    """The search (and selection) in ``state`` against ``cfg.reward_baseline`` trained as its
    trials were (``bench.baseline.gaps``); without a ``pool``, from the cached trainings."""
    from bench import baseline

    doc = storage.read_json(state)
    rounds = baseline.round_runs(state, m.search)
    selection = baseline.selection_runs(state, m.select, cfg.select_seeds) if doc.get("selected") else {}
    rewards = baseline.measure(pool, p, data, work, cfg.reward_baseline,
                               [run for runs in rounds for run in runs] + list(selection.values()))
    return baseline.gaps(doc, rounds, selection, rewards)


#: The options that mean what ``paploss search``'s do: the same click options (their help, their checks).
SHARED_OPTIONS = ("detector", "rounds", "samples", "reward_seeds", "search_splits", "search_val_fraction", "select_top",
                  "select_seeds", "select_rank", "tracking_uri")


def shared_options(*names: str) -> Callable:
    """A decorator adding the options of ``paploss search`` (:func:`paploss.search_cli.search_options`)
    whose parameter names are ``names``, in that order: declared once, there."""
    from paploss.search_cli import search_options

    declared = {p.name: p for p in search_options(lambda: None).__click_params__}
    missing = sorted(set(names) - set(declared))
    if missing:
        raise ValueError(f"paploss search has no options {missing}")

    def decorate(fn: Callable) -> Callable:
        fn.__click_params__ = [*getattr(fn, "__click_params__", []), *(declared[n] for n in reversed(names))]
        return fn

    return decorate


@click.command("bench")
@click.option("--preset", type=click.Choice(sorted(BENCH_PRESETS)), default="default", show_default=True,
              help="Sizes: default (about 2 hours on 2 CPU cores), long-proxy (default with 400-iteration "
                   "proxies as long as the final trainings, about 3.5 hours, estimated), "
                   "select-1200 (1200-iteration proxies and finals, the search started at square, 6 rounds, "
                   "--select-top 4 --select-seeds 1,2; about 1 h 20 min per dataset for "
                   "--losses searched-shared,square, 6 min more per further loss), "
                   "strong-start (select-1200 on digits from 3 warm starts of 3000 pre-training iterations, "
                   "--detach-i3, 4 rounds x 8 samples at sigma 0.2 on 5 search splits, each round set against "
                   "square, the searched loss against square over seeds 0-8; about 2 h 45 min, estimated) or "
                   "smoke (the plumbing, minutes). Options given override the preset's "
                   "(docs/research/search-quality.md tells what each one showed).")
@click.option("--datasets", default=None, help="Comma-separated bundled datasets [preset; else shapes,digits].")
@click.option("--losses", default=None,
              help="Comma-separated losses to compare; also transfer-shared (the shared search's loss of the other "
                   "dataset). '<loss>@g<scale>' is a handcrafted form or a searched loss "
                   f"with its gradient scale set to <scale> (an ablation), e.g. square@g1.8 [preset; else "
                   f"{','.join(LOSSES)}].")
@click.option("--seeds", default=None, help="Comma-separated seeds of the final trainings [preset].")
@shared_options("detector", "rounds", "samples")
@click.option("--proxy-iterations", type=int, default=None, help="Iterations of each proxy trial [preset].")
@click.option("--final-iterations", type=int, default=None, help="Iterations of each final training [preset].")
@click.option("--pretrain-iterations", type=int, default=None,
              help="Iterations of the warm starts' pre-training (crop classification). The quick pipeline preset's "
                   "200 leave the digits backbone classifying about 38 % of its training crops; other values are "
                   "other warm starts, cached beside the preset's [pipeline preset's].")
@click.option("--n-train", type=int, default=None, help="Images of each bundled dataset's train split [preset].")
@click.option("--n-val", type=int, default=None, help="Images of each bundled dataset's val split [preset].")
@click.option("--sigma", type=float, default=None, help="Starting spread of the search policy [preset].")
@click.option("--detach-i3/--no-detach-i3", default=None,
              help="Train every PAP loss (proxies, selection, the finals of the searched and handcrafted losses) "
                   "without the gradient into the boxes through I3, so that no sampled loss can train its boxes "
                   "worse (not SPEC §1). Its searches and finals are cached under their own names beside the "
                   "SPEC's [preset; else off].")
@click.option("--search-tag", default=None, metavar="TAG",
              help="Appended to every search's name: a search with other --rounds, --samples or --sigma in the "
                   "same --work, beside the earlier one (same data, warm starts and cached finals) instead of "
                   "refused, e.g. --rounds 6 --search-tag r6 [preset; else none].")
@click.option("--box-collapse", type=float, default=None, metavar="U",
              help="Stop a proxy trial early, evaluating it as it is, when its positives' mean box quality u "
                   "(GIoU-based, about 0.7 at the start) stays below U for more than 50 iterations: a loss that "
                   "trains the boxes worse finds nothing. 0.3 stopped 2 of 4 such trials tried, after 62 and 78 "
                   "iterations; no trial that trained went below it in its first 60. 0.5 stops more of them, but "
                   "also one that trained to 25 AP [off].")
@shared_options("reward_seeds", "search_splits", "search_val_fraction")
@click.option("--start", default=None, metavar="FORM|FILE",
              help=f"Starting mean of the searches: the identity (linear, SPEC §2), the piecewise-linear form of "
                   f"another handcrafted loss ({', '.join(START_FORMS)}), or a searched loss's LossSpec JSON file, "
                   f"to refine it (a shared loss starts the separate search with its function in all five places; "
                   f"such a search is named after the file's digest, beside the others in --work) "
                   f"[preset; else linear].")
@shared_options("select_top", "select_seeds", "select_rank")
@click.option("--loss-file", "loss_files", multiple=True, metavar="DATASET:MODE=FILE",
              help="Benchmark this LossSpec file (a run's bench_<dataset>_<mode>_loss.json, or the loss_spec.json "
                   "artifact of a search pipeline's MLflow run) as the searched loss MODE (searched or searched-shared) on DATASET, instead of "
                   "running that search. DATASET may be one not in --datasets: the loss that the transfer losses "
                   "train on the one benchmarked (--datasets digits --losses transfer,square --loss-file "
                   "shapes:searched=FILE). Repeatable, e.g. "
                   "--loss-file shapes:searched-shared=docs/bench_shapes_select_searched-shared_loss.json.")
@click.option("--warm-starts", type=int, default=None,
              help="Warm starts pre-trained (seeds seed, seed+1, ...); final seed k trains from warm start k mod N, "
                   "the searches from the first. The finals move by several AP with the warm start: N > 1 "
                   "measures the losses across warm starts [preset; else 1].")
@click.option("--select-warm-starts/--no-select-warm-starts", default=None,
              help="The selection's seed s trains from warm start s mod --warm-starts (as final seed s does), and "
                   "with --reward-seeds the search's reward seed j from warm start j mod --warm-starts, not from "
                   "the search's: the loss chosen is the best across warm starts, which the finals measure "
                   "[preset; else off].")
@click.option("--reward-baseline", type=click.Choice([*HANDCRAFTED_FORMS, "none"]), default=None,
              help="Also train this handcrafted form as each search round's samples were trained (the round's "
                   "seeds, search split and warm starts; one training per distinct one) and as the selection's "
                   "candidates were, and give each round's mean and best reward, and each candidate's, minus its "
                   "(report and MLflow): did the search find a better loss than it where it looked? E.g. square; "
                   "none: no baseline [preset; else none].")
@click.option("--jobs", type=int, default=None, help="Trainings at a time (one CPU thread each) [preset; else 2].")
@click.option("--mps/--no-mps", default=True, show_default=True,
              help="On a machine with CUDA, run the --jobs trainings under CUDA MPS (started for the run, stopped "
                   "after it), so that the GPU runs their kernels side by side: sixteen 1200-iteration trainings at "
                   "once took about 3 minutes on one H100 or H200. Nothing happens without CUDA or when an MPS "
                   "daemon is already set up (CUDA_MPS_PIPE_DIRECTORY).")
@click.option("--work", default="runs/bench", show_default=True, help="Cache folder (or s3:// prefix); resumes.")
@click.option("--out", default="docs", show_default=True, help="Where bench_search.json/.md and figures go.")
@click.option("--report-only", is_flag=True,
              help="Train nothing: write the tables and figures from what --work already holds.")
@shared_options("tracking_uri")
def bench(preset, datasets, losses, seeds, detector, rounds, samples, proxy_iterations, final_iterations, pretrain_iterations,
          n_train, n_val, sigma,
          detach_i3, search_tag, box_collapse, reward_seeds, search_splits, search_val_fraction, start,
          select_top, select_seeds, select_rank, loss_files, warm_starts, select_warm_starts, reward_baseline, jobs, mps,
          work, out,
          report_only, tracking_uri) -> None:
    """The search-quality benchmark: search on the bundled datasets, then train with
    every loss and seed and compare AP on the held-out val split."""
    base = BENCH_PRESETS[preset]
    fallback = {f.name: f.default for f in dataclasses.fields(BenchConfig)}

    def pick(name: str, given: Any) -> Any:  # the option as given, else the preset's, else BenchConfig's default
        return given if given is not None else base.get(name, fallback[name])

    def names(text: str | None) -> tuple[str, ...] | None:
        return None if text is None else tuple(x for x in text.split(",") if x)

    def numbers(text: str | None, option: str) -> tuple[int, ...] | None:
        return None if text is None else tuple(int_list(text, option))

    given = dict(datasets=names(datasets), losses=names(losses), seeds=numbers(seeds, "--seeds"), rounds=rounds,
                 samples=samples, proxy_iterations=proxy_iterations, final_iterations=final_iterations,
                 pretrain_iterations=pretrain_iterations, n_train=n_train, n_val=n_val, sigma=sigma,
                 box_collapse=box_collapse, detach_i3=detach_i3, search_tag=search_tag,
                 reward_seeds=reward_seeds, search_splits=search_splits, search_val_fraction=search_val_fraction,
                 start=start, select_top=select_top, select_seeds=numbers(select_seeds, "--select-seeds"),
                 select_rank=select_rank, warm_starts=warm_starts, select_warm_starts=select_warm_starts,
                 reward_baseline="" if reward_baseline == "none" else reward_baseline, jobs=jobs, detector=detector)
    if detector:  # another detector's data, warm starts, searches and finals: a cache of its own
        work = storage.join(work, detector.replace("mmdet:", "mmdet-").replace("/", "_"))
    try:
        cfg = BenchConfig(pipeline_preset=base["pipeline_preset"], **{k: pick(k, v) for k, v in given.items()},
                          loss_files=tuple(parse_loss_file(f) for f in loss_files), work=work, out=out)
        cfg.given_specs()  # each file read and checked before anything is trained
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    start = time.monotonic()
    try:
        with cuda_mps(mps and not report_only) as on:
            if on:
                _log(f"CUDA MPS started for {cfg.jobs} trainings at a time")
            results = run_bench(cfg, tracking_uri or None, report_only=report_only)
    except steps.StepError as exc:  # a cache made with other settings, options a search refuses: no traceback
        raise click.ClickException(str(exc)) from None
    click.echo(summarize(results))
    click.echo(goal_text(results))
    click.echo(f"wall time {time.monotonic() - start:.0f}s; results in {out}/bench_search.json and .md")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    bench()
