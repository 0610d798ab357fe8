"""``paploss run``: the search pipeline on this machine through ``kfp.local``.

The same compiled pipeline as on a cluster, run by ``kfp.local`` with
``SubprocessRunner(use_venv=False)`` (each task a Python subprocess of this
interpreter; no containers, no per-task ``pip install``), KFP's local cache on
(``{root}/kfp/.kfp_cache``), and MLflow on ``MLFLOW_TRACKING_URI`` (default
``sqlite:///mlflow.db`` in the working folder).

Resume: run again with the same ``--search-name`` (and the same options): the
finished tasks come from KFP's cache and the search goes on from the first
round that did not finish.

Workarounds for ``kfp.local`` 2.17 (DESIGN.md):
(1) inside ``ParallelFor`` a task output from before the loop is replaced by the
loop item: each round is a sub-pipeline whose inputs carry those values
(:mod:`pipelines.search_pipeline`); (2) its indented ``print`` replaces
``builtins.print`` from parallel threads without a lock, so the indentation grows
without bound: while the pipeline runs, :func:`_plain_print` makes it a no-op.
KFP's own log (every task's output) goes to ``{root}/logs/<search>.log``; the
console shows the progress display (:mod:`paploss.progress`: stage, round, trial, ETA) and the
final table.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, TextIO

import click

from paploss.errors import RunError, mask
from paploss.search_cli import (RunSettings, begin, end, format_table, preflight, search_options,
                                settings_from_options, wait_lease_option)

__all__ = ["run", "run_pipeline", "pipeline_arguments"]


def pipeline_arguments(s: RunSettings) -> dict[str, Any]:
    """The run-time parameters of the pipeline for these settings."""
    p = s.preset
    return {
        "dataset": p.dataset, "work": s.work, "search_name": s.search_name, "samples": p.samples,
        "seed": p.seed, "split_seed": p.split_seed, "bundled": p.bundled, "detector": p.detector,
        "proxy_epochs": s.proxy_epochs, "final_epochs": s.final_epochs, "proxy": p.proxy, "final": p.final,
        "pretrain_options": p.pretrain, "controller": p.controller, "max_failed_trials": p.max_failed_trials,
        "attempts": p.attempts, "select_seeds": list(p.select_seeds),
        "select_rank": p.select_rank, "reward_seeds": p.reward_seeds,
        "search_splits": p.search_splits, "search_val_fraction": p.search_val_fraction, "tracking_uri": s.tracking_uri,
        "experiment": s.experiment,
        "model_name": s.model_name, "promote": s.promote, "promote_rule": s.promote_rule,
    }


class _Tee(io.TextIOBase):
    """Everything to the log file; lines starting with ``paploss>`` (wherever kfp
    indents them) also to ``show`` (the progress display,
    :class:`paploss.progress.Progress`) or, without one, to the console; credentials
    in URIs masked in both (:func:`paploss.errors.mask`). Keeps the last lines for
    error messages."""

    def __init__(self, log: TextIO, console: TextIO | None, keep: int = 400, show: Any = None) -> None:
        self.log, self.console, self.show = log, console, show
        self.tail: deque[str] = deque(maxlen=keep)
        self._buf = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        n = len(text)
        text = mask(text)  # kfp.local echoes the task inputs, the tracking URI among them
        with self._lock:
            self.log.write(text)
            self._buf += text
            *lines, self._buf = self._buf.split("\n")
            for line in lines:
                self.tail.append(line)
                stripped = line.strip()
                if self.show is not None:
                    self.show.feed(stripped)
                elif self.console is not None and stripped.startswith("paploss>"):
                    self.console.write(stripped[len("paploss>"):].strip() + "\n")
                    self.console.flush()
        return n

    def flush(self) -> None:
        self.log.flush()


@contextlib.contextmanager
def _plain_print() -> Iterator[None]:
    """kfp.local fault (2): its ``indented_print`` is not thread-safe; make it a no-op."""
    from kfp.local import logging_utils

    original = logging_utils.indented_print
    logging_utils.indented_print = lambda num_spaces=4: contextlib.nullcontext()
    try:
        yield
    finally:
        logging_utils.indented_print = original


def _cause(tail: deque[str]) -> str:
    """The most telling error line of a failed run's log."""
    wanted = ("SearchFailed:", "StepError:", "StorageError:", "TrackingError:", "Error:", "Exception:")
    for marker in wanted:
        for line in reversed(tail):
            if marker in line and "Traceback" not in line:
                return line.strip()
    return "see the log"


def run_pipeline(s: RunSettings, root: str | Path = "runs", cache: bool = True, console: TextIO | None | str = "stdout",
                 image: str | None = None) -> dict:
    """Compile-free local run of the search pipeline; returns the report (the AP table).

    ``root``: local folder for kfp.local's outputs, cache and logs. ``console``: where
    the progress lines go (``"stdout"``: the ``sys.stdout`` of the call; None: nowhere). Raises
    :class:`~paploss.errors.RunError` (one line: the failed step's error, the log, how to
    resume) when the pipeline fails.
    """
    import json

    from kfp import local

    from pipelines.search_pipeline import ClusterOptions, build_pipeline

    if console == "stdout":  # looked up now, not at import: click and pytest swap sys.stdout
        console = sys.stdout
    root = Path(root).resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    log_path = root / "logs" / f"{s.search_name}.log"
    # no KFP-level retries here: a trial retries itself (--attempts) and kfp.local
    # would wait out the cluster's back-off between tries
    pipeline = build_pipeline(rounds=s.preset.rounds, parallelism=s.preset.parallelism, image=image,
                              preset=s.preset, cluster=ClusterOptions(retries=0), select_top=s.preset.select_top)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root / "kfp"),
        enable_caching=cache,
        raise_on_error=True,
    )
    from paploss.flow import final_losses
    from paploss.progress import Plan, Progress

    show = Progress(Plan.of(s.preset, finals=len(final_losses(s.search("kfp.local")))), console) \
        if console is not None else None
    with open(log_path, "a", encoding="utf-8") as log, (show or contextlib.nullcontext()):
        tee = _Tee(log, console, show=show)
        old_out, old_err = sys.stdout, sys.stderr
        # kfp.local logs some events (cache hits) through the root logger outside its
        # own logging context: send them to the log too, and leave no handler behind
        # that would write to this (soon closed) log after the run
        root_logger = logging.getLogger()
        saved = root_logger.level, root_logger.handlers[:]
        root_logger.handlers = [logging.StreamHandler(tee)]
        root_logger.setLevel(logging.INFO)
        sys.stdout = sys.stderr = tee
        try:
            with _plain_print():
                result = pipeline(**pipeline_arguments(s))
            return json.loads(result.output)
        except Exception as exc:  # noqa: BLE001 - reported with the step's own error
            raise RunError(
                f"search {s.search_name} failed: {mask(_cause(tee.tail))} (full log: {log_path}; "
                f"resume: run again with --search-name {s.search_name})"
            ) from exc
        finally:
            sys.stdout, sys.stderr = old_out, old_err
            root_logger.setLevel(saved[0])
            root_logger.handlers = saved[1]


@click.command("run")
@search_options
@click.option("--root", default="runs", show_default=True,
              help="Local folder for kfp.local's task outputs, its cache and the logs.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="KFP's local cache: a re-run with the same --search-name replays finished tasks.")
@click.option("--image", default=None, help="Component image recorded in the pipeline (unused locally).")
@wait_lease_option
def run(root: str, cache: bool, image: str | None, wait_lease: float, **options: Any) -> None:
    """Run the loss search locally through kfp.local: data, warm start, PPO rounds
    with parallel proxy trials, final trainings of the searched loss and the
    baselines, all tracked in MLflow. Prints progress per round and the AP table."""
    s = settings_from_options(**options)
    preflight(s)
    held = begin(s, wait_lease)
    try:
        _run(s, root, cache, image)
    finally:
        end(held)


def _run(s: RunSettings, root: str, cache: bool, image: str | None) -> None:
    p = s.preset
    click.echo(f"search {s.search_name} (preset {s.preset_name}): {p.rounds} rounds x {p.samples} samples, "
               f"{p.parallelism} at a time, through kfp.local")
    click.echo(f"  dataset {p.dataset}; work {s.work}; MLflow {mask(s.tracking_uri)} (experiment {s.experiment!r})")
    click.echo(f"  log: {Path(root).resolve() / 'logs' / (s.search_name + '.log')}")
    start = time.monotonic()
    report = run_pipeline(s, root=root, cache=cache, image=image)
    click.echo(f"done in {time.monotonic() - start:.0f} s\n")
    click.echo(format_table(report, s))
