"""The search flow, written once.

::

    prepare-data ─► pretrain ─► init-search ─► round 1 … R ─► [selection] ─► lr sweep ─► final-train × losses ─► report
                                               round r: proxy-trial × S (side by side) ─► controller-update
                                               selection: selection-trials ─► proxy-trial × (top × seeds) ─► select-loss
                                               lr sweep: lr-trial × (losses × lrs) (side by side) ─► lr-pick

:data:`STAGES` names every task of a search, in order; each is one function of
:mod:`paploss.steps`. Three runners walk the same flow:

- the KFP pipeline (``pipelines/search_pipeline.py``) mirrors it task for task, each
  a component (a test holds the compiled pipeline's tasks to :data:`STAGES`);
- :func:`run` walks it in this process (``paploss search``), trials one after
  another or side by side through the ``map`` it is given;
- the benchmark (``bench/``) calls :func:`search` and :func:`finals` with its
  own ``map`` (a process pool) and its own losses and seeds.

Nothing here trains, logs or stores by itself: the steps do, and they find a
finished output instead of redoing it, so any runner resumes any other's search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Sequence

from paploss import steps
from paploss.presets import Preset

__all__ = ["STAGES", "Search", "Final", "Map", "in_order", "processes", "prepare", "search", "lr_sweep", "finals",
           "final_losses", "run"]

#: The tasks of a search, in the order they first run (the KFP pipeline's component names).
STAGES = ("prepare-data", "pretrain", "init-search", "proxy-trial", "controller-update", "selection-trials",
          "select-loss", "lr-trial", "lr-pick", "final-train", "report")

#: How a runner trains a batch of independent tasks (a round's trials, the finals):
#: ``map(fn, items)`` returns ``[fn(item) for item in items]`` in that order, computed
#: one after another or side by side.
Map = Callable[[Callable[[Any], Any], Sequence[Any]], list]


def in_order(fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
    """The plain :data:`Map`: one task after another in this process."""
    return [fn(item) for item in items]


def processes(workers: int) -> Map:
    """A :data:`Map` that runs up to ``workers`` tasks side by side, each in its own
    process (``spawn``: a fresh interpreter, so torch's threads are its own); one
    worker is :func:`in_order`. The trainings' ``num_threads`` should be the cores
    divided by ``workers`` (the presets set it). What the tasks print comes back to
    this process's ``sys.stdout`` line by line (a progress display sees it)."""
    if workers <= 1:
        return in_order

    def run_side_by_side(fn: Callable[[Any], Any], items: Sequence[Any]) -> list:
        import multiprocessing
        import sys
        import threading
        from concurrent.futures import ProcessPoolExecutor

        items = list(items)
        if len(items) <= 1:
            return in_order(fn, items)
        ctx = multiprocessing.get_context("spawn")
        lines = ctx.Queue()

        def drain() -> None:
            for line in iter(lines.get, None):
                sys.stdout.write(line)
                sys.stdout.flush()

        echo = threading.Thread(target=drain, daemon=True)
        echo.start()
        try:
            with ProcessPoolExecutor(min(workers, len(items)), mp_context=ctx, initializer=_print_to,
                                     initargs=(lines,)) as pool:
                return list(pool.map(fn, items))
        finally:
            lines.put(None)
            echo.join()

    return run_side_by_side


class _QueueLines:
    """A worker's ``sys.stdout``: whole lines into the parent's queue."""

    def __init__(self, queue) -> None:
        self.queue, self.buf = queue, ""

    def write(self, text: str) -> int:
        self.buf += text
        *done, self.buf = self.buf.split("\n")
        for line in done:
            self.queue.put(line + "\n")
        return len(text)

    def flush(self) -> None:
        pass


def _print_to(queue) -> None:
    import sys

    sys.stdout = _QueueLines(queue)


@dataclass(frozen=True)
class Search:
    """One search: its sizes (``preset``), where it keeps things and what it is called.

    ``tracking``: ``{"uri", "experiment"}`` of MLflow, or None to log nothing.
    ``params``: extra parameters recorded on the search's MLflow run.
    ``proxy_epochs`` / ``final_epochs``: 0 keeps the preset's schedule."""

    preset: Preset
    work: str
    search_name: str
    tracking: Mapping[str, str] | None = None
    model_name: str = "paploss-retinanet"
    promote: bool = True
    promote_rule: str = "beat-baselines"
    proxy_epochs: float = 0.0
    final_epochs: float = 0.0
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def proxy(self) -> dict:
        """The proxy trials' training options (preset expanded, detector and epochs folded in)."""
        return steps.train_options(self.preset.proxy, self.preset.detector, self.proxy_epochs)

    @property
    def final(self) -> dict:
        """The final trainings' options."""
        return steps.train_options(self.preset.final, self.preset.detector, self.final_epochs)


def prepare(s: Search) -> tuple[str, str]:
    """Stages prepare-data and pretrain: ``(data URI, warm start URI)``."""
    p = s.preset
    data = steps.prepare_data(p.dataset, s.work, split_seed=p.split_seed, bundled=p.bundled,
                              search_splits=p.search_splits, search_val_fraction=p.search_val_fraction)
    init = steps.pretrain(data, s.work, config=p.pretrain, seed=p.seed, detector=p.detector, proxy=p.proxy)
    return data, init


def _trials(s: Search, data: str, init: str, state: str, trials: Sequence[str], map: Map) -> list[str]:
    """One batch of proxy-trial tasks (a round's samples, or the selection's candidates)."""
    trial = partial(_proxy_trial, data, init, s.proxy, s.work, s.search_name, state, s.tracking, s.preset.attempts)
    return map(trial, list(trials))


def _proxy_trial(data, init, proxy, work, search_name, state, tracking, attempts, trial: str) -> str:
    # a module-level function of the trial alone, so that a process pool can send it
    return steps.proxy_trial(data, init, trial, proxy, work, search_name, state=state, tracking=tracking,
                             attempts=attempts)


def search(s: Search, data: str, init: str, *, map: Map = in_order,
           on_round: Callable[[dict], None] | None = None) -> str:
    """Stages init-search, R × (proxy-trial × S, controller-update) and, with the
    preset's ``select_top`` > 0, selection-trials, proxy-trial × candidates,
    select-loss. Returns the URI of the final search state (the one holding the
    selection's choice when there is one). ``on_round`` gets each update's output."""
    p = s.preset
    params = {**p.to_dict(), "work": s.work, "search_name": s.search_name, "proxy_epochs": s.proxy_epochs,
              "final_epochs": s.final_epochs, **dict(s.params)}
    out = steps.init_search(s.work, s.search_name, p.rounds, p.samples, seed=p.seed, controller=p.controller,
                            tracking=s.tracking, params=params, reward_seeds=p.reward_seeds,
                            search_splits=p.search_splits)
    for _ in range(p.rounds):
        results = _trials(s, data, init, out["state"], out["trials"], map)
        out = steps.controller_update(out["state"], results, s.work, s.search_name,
                                      max_failed_trials=p.max_failed_trials, tracking=s.tracking)
        if on_round is not None:
            on_round(out)
    if not p.select_top:
        return out["state"]
    candidates = steps.selection_trials(out["state"], p.select_top, p.select_seeds, p.select_rank)
    results = _trials(s, data, init, out["state"], candidates, map)
    return steps.select_loss(out["state"], results, s.work, s.search_name, tracking=s.tracking, rank=p.select_rank)


@dataclass(frozen=True)
class Final:
    """One final training: ``loss`` (``searched``, ``start``, a baseline, or a name for
    the PAP loss of ``spec``, a LossSpec JSON), its ``seed`` (None: the preset's) and the
    ``tag`` that keeps its result apart from the same loss's other finals."""

    loss: str
    spec: str = ""
    seed: int | None = None
    tag: str = ""


def final_losses(s: Search) -> tuple[str, ...]:
    """The losses of a search's table: the searched loss, the search's start (the
    controller's starting mean μ) and the baselines."""
    return (steps.SEARCHED, steps.START, *steps.BASELINES)


def _jobs(losses: Iterable[str | Final] | None, s: Search) -> list[Final]:
    return [x if isinstance(x, Final) else Final(x) for x in (losses or final_losses(s))]


def lr_sweep(s: Search, data: str, init: str, state: str, losses: Iterable[str | Final] | None = None, *,
             map: Map = in_order) -> dict[str, float]:
    """Stages lr-trial × (losses × the preset's ``lr_sweep`` lrs), side by side through
    ``map``, and lr-pick: the best learning rate of each loss (``{loss: lr}``). Losses
    that share a name share a sweep (the first one's spec)."""
    specs: dict[str, str] = {}
    for job in _jobs(losses, s):
        specs.setdefault(job.loss, job.spec)
    items = steps.sweep_items(list(specs), s.preset.lr_sweep, s.final)
    trial = partial(_lr_trial, data, init, s.final, dict(s.preset.lr_sweep), s.work, s.search_name, state,
                    s.preset.seed, specs)
    results = map(trial, items)
    return json.loads(steps.lr_pick(results, s.work, s.search_name, tracking=s.tracking))


def _lr_trial(data, init, final, sweep, work, search_name, state, seed, specs, item: str) -> str:
    loss = item.rpartition("@")[0]
    return steps.lr_trial(data, init, item, final, sweep, work, search_name,
                          state=state if loss == steps.SEARCHED else "", spec=specs.get(loss, ""), seed=seed)


def finals(s: Search, data: str, init: str, state: str, losses: Iterable[str | Final] | None = None, *,
           map: Map = in_order, lrs: Mapping[str, float] | None = None) -> list[str]:
    """Stage final-train for each of ``losses`` (names or :class:`Final`; default
    :func:`final_losses`), side by side through ``map``, each at its learning rate of
    ``lrs`` (None: :func:`lr_sweep` first, which keeps the finals' lr when the preset
    sweeps no lrs); returns their result JSONs in order."""
    jobs = _jobs(losses, s)
    if lrs is None:
        sweeps = len(steps.sweep_lrs(s.preset.lr_sweep)) >= 2
        lrs = lr_sweep(s, data, init, state, jobs, map=map) if sweeps else {}
    jobs = [replace(j, spec=steps.start_spec(s.work, s.search_name)) if j.loss == steps.START and not j.spec else j
            for j in jobs]
    train = partial(_final_train, data, init, s.final, s.work, s.search_name, state, s.preset.seed, s.tracking,
                    s.model_name, s.promote, dict(lrs))
    return map(train, jobs)


def _final_train(data, init, final, work, search_name, state, seed, tracking, model_name, promote, lrs,
                 job: Final) -> str:
    return steps.final_train(data, init, job.loss, steps.loss_options(final, job.loss, lrs.get(job.loss)), work,
                             search_name, state=state if job.loss == steps.SEARCHED else "",
                             seed=seed if job.seed is None else job.seed, tracking=tracking, model_name=model_name,
                             promote=promote, spec=job.spec, tag=job.tag)


def run(s: Search, *, map: Map = in_order, on_round: Callable[[dict], None] | None = None) -> dict:
    """The whole flow in this process; returns the report (the AP table)."""
    data, init = prepare(s)
    state = search(s, data, init, map=map, on_round=on_round)
    results = finals(s, data, init, state, map=map)
    return json.loads(steps.report(results, state, s.work, s.search_name, tracking=s.tracking,
                                   model_name=s.model_name, promote=s.promote, promote_rule=s.promote_rule))
