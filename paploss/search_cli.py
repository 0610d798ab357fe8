"""``paploss search``: the search pipeline run in-process, without Kubeflow.

The search flow of :mod:`paploss.flow` walked in this process, the same tasks as
the KFP pipeline: prepare the data, pre-train the warm start, then for each round
the proxy trials (one after another) and the controller update, then the final
trainings of the searched loss and the baselines and the AP table. Useful for
debugging a step with a debugger.

It shares its options, presets, input checks and result table with ``paploss
run`` (:mod:`pipelines.run_local`), which runs the same search through
``kfp.local``; a search started by one can be resumed by the other (same work
folder and ``--search-name``): every step finds its finished outputs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import click

from paploss import presets, steps, storage
from paploss.errors import InputError, mask
from paploss.spec_set import detector_names

__all__ = ["RunSettings", "search", "search_options", "settings_from_options", "preflight", "begin", "end", "run_inprocess",
           "format_table", "absolute_tracking_uri", "wait_lease_option", "ensure_tracking_store"]


@dataclass(frozen=True)
class RunSettings:
    """Everything a search needs beyond its preset."""

    preset: presets.Preset
    preset_name: str
    work: str
    search_name: str
    tracking_uri: str
    experiment: str = "paploss"
    model_name: str = "paploss-retinanet"
    promote: bool = True
    promote_rule: str = "beat-baselines"
    proxy_epochs: float = 0.0
    final_epochs: float = 0.0

    @property
    def tracking(self) -> dict:
        return steps.tracking_config(self.tracking_uri, self.experiment)

    def search(self, runner: str = "in-process"):
        """The :class:`paploss.flow.Search` these settings describe."""
        from paploss.flow import Search

        return Search(preset=self.preset, work=self.work, search_name=self.search_name, tracking=self.tracking,
                      model_name=self.model_name, promote=self.promote, promote_rule=self.promote_rule, proxy_epochs=self.proxy_epochs,
                      final_epochs=self.final_epochs, params={"runner": runner})


def absolute_tracking_uri(uri: str | None) -> str:
    """``sqlite:///relative.db`` made absolute, so that every task (whatever its
    working folder) writes to the same store; other URIs unchanged."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _json_option(value: str | None, name: str) -> dict | None:
    if value is None:
        return None
    try:
        out = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InputError(name, f"{value!r} is not JSON: {exc.msg}") from None
    if not isinstance(out, dict):
        raise InputError(name, f"{value!r} must be a JSON object")
    return out


def _lr_sweep_option(value: str | None, preset: Mapping[str, Any]) -> dict | None:
    """``--lr-sweep JSON`` merged over the ``preset``'s sweep (None: not given, the
    preset's); ``lrs`` must be a list of distinct numbers > 0. The training options
    in it are checked by :func:`preflight` with the finals'."""
    given = _json_option(value, "--lr-sweep")
    if given is None:
        return None
    if "lrs" in given and not isinstance(given["lrs"], list):
        raise InputError("--lr-sweep", f'"lrs": {given["lrs"]!r} must be a list of learning rates '
                         '(e.g. [0.01, 0.02]; [] for no sweep)')
    sweep = {**preset, **given}
    try:
        steps.sweep_lrs(sweep)
    except steps.StepError as exc:
        raise InputError("--lr-sweep", str(exc)) from None
    return sweep


def search_options(fn: Callable) -> Callable:
    """The options shared by ``paploss search`` and ``paploss run``."""
    opts = [
        click.option("--preset", type=click.Choice(sorted(presets.PRESETS)), default="demo", show_default=True,
                     help="Sizes of the search: demo (make run: the method against the baselines in minutes on "
                          "2 CPU cores), smoke (plumbing), quick (the benchmark's small search), paper (40 rounds x "
                          "8 samples, a GPU cluster)."),
        click.option("--dataset", default=None,
                     help="bundled:shapes | bundled:digits | a COCO folder or s3:// prefix with images/ and "
                          "annotations/{train,val}.json [preset: bundled:shapes]."),
        click.option("--work", default="runs/work", show_default=True,
                     help="Folder or s3:// prefix for prepared data, states, trial results, checkpoints."),
        click.option("--search-name", default=None,
                     help="Names this search everywhere (MLflow tags, work folder). Default: <preset>-<time>. "
                          "Give the name of a stopped search to resume it."),
        click.option("--rounds", type=int, default=None, help="PPO rounds [preset]."),
        click.option("--samples", type=int, default=None, help="Losses sampled per round (>= 2) [preset]."),
        click.option("--parallelism", type=int, default=None, help="Trials run at a time [preset]."),
        click.option("--max-failed-trials", type=int, default=None,
                     help="Failed trials tolerated per search before it stops [a quarter of all trials]."),
        click.option("--attempts", type=int, default=None, help="Tries of a trial before it counts as failed [2]."),
        click.option("--seed", type=int, default=None, help="Seed of the controller and of every training [0]."),
        click.option("--detector", default=None, metavar="NAME",
                     help="Detector of every training: " + ", ".join(detector_names()) + " or mmdet:<config file>; "
                          "the search's θ has 41 numbers per PAP-loss head (82 for a Faster R-CNN: RPN and RoI "
                          "head) [preset]."),
        click.option("--select-top", type=int, default=None,
                     help="After the last round, train the N best sampled losses again with each --select-seeds "
                          "seed and take the best mean as the searched loss (0: off, the searched loss is the "
                          "policy's final mean, as SPEC §3) [preset: 0]."),
        click.option("--select-seeds", default=None, metavar="S1,S2,...",
                     help="Training seeds of the selection's trials; not the search's own seed [1,2,3]."),
        click.option("--select-rank", type=click.Choice(steps.SELECT_RANKS), default=None,
                     help="How the selection picks its candidates: 'reward', the best rewards of the whole search; "
                          "'round', the best rewards relative to their round's mean (with --search-splits each "
                          "round is scored on its own images, some easier than others) [reward]."),
        click.option("--reward-seeds", type=int, default=None, metavar="N",
                     help="Proxy trainings per sampled loss, with seeds 1000 apart; its reward is their mean: less "
                          "of one training's luck in the reward, at N times the trials [1]."),
        click.option("--search-splits", type=int, default=None, metavar="N",
                     help="Search-train/search-val splits drawn from train (split seeds split_seed + k); round r "
                          "trains and scores on split r mod N, the selection on split rounds mod N: the search "
                          "cannot fit one set of search-val images [1]."),
        click.option("--search-val-fraction", type=float, default=None, metavar="F",
                     help="Share of train held out as search-val in each search split: more images behind each "
                          "reward, fewer for the proxies to train on [0.2]."),
        click.option("--proxy-epochs", type=float, default=0.0, show_default=True,
                     help="Epochs of a proxy trial (0: the preset's schedule)."),
        click.option("--final-epochs", type=float, default=0.0, show_default=True,
                     help="Epochs of the final trainings (0: the preset's schedule)."),
        click.option("--proxy", "proxy_json", default=None, metavar="JSON",
                     help='Extra TrainConfig fields of proxy trials, e.g. \'{"batch_size": 4}\'.'),
        click.option("--final", "final_json", default=None, metavar="JSON",
                     help="Extra TrainConfig fields of the final trainings."),
        click.option("--controller", "controller_json", default=None, metavar="JSON",
                     help='Controller options, e.g. \'{"sigma": 0.2, "shared": true}\'.'),
        click.option("--lr-sweep", "lr_sweep_json", default=None, metavar="JSON",
                     help='The learning-rate sweep before the final trainings, merged over the preset\'s: '
                          '"lrs" (a list; each final loss trains at its best on search-val) and training options '
                          'of the sweep\'s short trainings, e.g. \'{"lrs": [0.01, 0.02], "iterations": 60}\'; '
                          '\'{"lrs": []}\' skips the sweep (every final at the final options\' lr) [preset].'),
        click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default="sqlite:///mlflow.db",
                     show_default=True, help="MLflow tracking URI [env MLFLOW_TRACKING_URI]."),
        click.option("--experiment", default="paploss", show_default=True, help="MLflow experiment."),
        click.option("--model-name", default="paploss-retinanet", show_default=True,
                     help="Registered model that gets the searched detector."),
        click.option("--promote/--no-promote", default=True, show_default=True,
                     help="Give the new version the 'champion' alias when it wins (see --promote-rule)."),
        click.option("--promote-rule", type=click.Choice(["beat-baselines", "champion"]), default="beat-baselines",
                     show_default=True,
                     help="When the searched detector wins: 'beat-baselines', its val AP is at least the champion's "
                          "and not behind a baseline of this search; 'champion', at least the champion's alone."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def int_list(text: str, option: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; anything else is a usage error naming ``option``."""
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InputError(option, f"{text!r} is not a comma-separated list of integers") from None


def _detector(name: str | None) -> str | None:
    """``--detector``: a known name (an MMDetection one included: the machine that trains finds
    its config, :func:`paploss.spec_set.mmdet_config`), or ``mmdet:<config file>``."""
    if name is None or name.startswith("mmdet:"):
        return name
    if name not in detector_names():
        raise InputError("--detector", f"{name!r} is not a detector; known: {', '.join(detector_names())} "
                         "or mmdet:<config file>")
    return name


def settings_from_options(
    preset: str, dataset, work, search_name, rounds, samples, parallelism, max_failed_trials, attempts, seed,
    detector, proxy_epochs, final_epochs, proxy_json, final_json, controller_json, tracking_uri, experiment,
    model_name, promote, promote_rule: str = "beat-baselines", select_top: int | None = None, select_seeds: str | None = None, select_rank: str | None = None,
    reward_seeds: int | None = None, search_splits: int | None = None, search_val_fraction: float | None = None,
    lr_sweep_json: str | None = None, now: _dt.datetime | None = None,
) -> RunSettings:
    """Preset + command-line overrides -> :class:`RunSettings` (no checks that touch the network)."""
    base = presets.get_preset(preset)
    extra_proxy = _json_option(proxy_json, "--proxy")
    extra_final = _json_option(final_json, "--final")
    controller = _json_option(controller_json, "--controller")
    lr_sweep = _lr_sweep_option(lr_sweep_json, base.lr_sweep)
    p = base.with_overrides(
        select_top=select_top, select_seeds=None if select_seeds is None else int_list(select_seeds, "--select-seeds"),
        select_rank=select_rank,
        dataset=dataset, rounds=rounds, samples=samples, parallelism=parallelism, reward_seeds=reward_seeds,
        search_splits=search_splits, search_val_fraction=search_val_fraction, max_failed_trials=max_failed_trials,
        attempts=attempts, seed=seed, detector=_detector(detector),
        proxy={**base.proxy, **extra_proxy} if extra_proxy else None,
        final={**base.final, **extra_final} if extra_final else None,
        controller={**base.controller, **controller} if controller else None, lr_sweep=lr_sweep,
    )
    if search_name is None:
        search_name = f"{preset}-{(now or _dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}"
    if not storage.is_s3(work):
        work = str(Path(work).resolve())
    return RunSettings(
        preset=p, preset_name=preset, work=work, search_name=search_name,
        tracking_uri=absolute_tracking_uri(tracking_uri), experiment=experiment, model_name=model_name,
        promote=promote, promote_rule=promote_rule, proxy_epochs=float(proxy_epochs or 0.0), final_epochs=float(final_epochs or 0.0),
    )


def preflight(s: RunSettings) -> None:
    """Every check that can fail before any work, so that a bad option costs a second
    and leaves nothing behind: parameter ranges; the proxy, final and pretrain options
    (names and ranges); the tracking URI (its scheme and database driver); the work
    folder (writable; its S3 endpoint answers); the controller options (a controller
    is built from them) and a search of that name in the work folder with other
    settings (controller options, seed, reward seeds, splits); the dataset (exists; its
    S3 endpoint answers); the MLflow server or folder (answers). Raises an
    :class:`~paploss.errors.InputError` (exit 2) naming the option; writes nothing."""
    from paploss.steps.options import check_pretrain_options, check_tracking_uri
    from paploss.steps.update import check_search, trials_detector
    from paploss.tracking import TrackingError, check_tracking

    p = s.preset
    steps.validate_search_params(
        rounds=p.rounds, samples=p.samples, parallelism=p.parallelism, max_failed_trials=p.max_failed_trials,
        search_name=s.search_name, model_name=s.model_name, attempts=p.attempts,
    )
    steps.check_reward_seeds(p.reward_seeds)
    steps.check_search_splits(p.search_splits)
    steps.check_search_val_fraction(p.search_val_fraction)
    steps.check_selection(p.select_top, p.select_seeds, search_seed=p.seed, reward_seeds=p.reward_seeds)
    steps.check_select_rank(p.select_rank)
    for name, value in (("--proxy-epochs", s.proxy_epochs), ("--final-epochs", s.final_epochs)):
        if value < 0:
            raise steps.StepError(f"{name}={value} must be >= 0 (0: the preset's schedule)")
    steps.check_train_options(steps.train_options(p.proxy, p.detector, s.proxy_epochs), "proxy options",
                              loss="paploss")
    final = steps.train_options(p.final, p.detector, s.final_epochs)
    steps.check_train_options(final, "final options", loss="paploss")
    steps.check_train_options(steps.loss_options(final, steps.BASELINES[0]), "final options")
    lrs = steps.sweep_lrs(p.lr_sweep)
    steps.check_train_options({**final, **{k: v for k, v in p.lr_sweep.items() if k != "lrs"},
                               **({"lr": lrs[0]} if lrs else {})}, "lr sweep options (--lr-sweep)", loss="paploss")
    check_pretrain_options(p.pretrain, p.proxy, p.detector)
    steps.check_detectors(p.proxy, p.final, p.pretrain, p.detector)
    check_tracking_uri(s.tracking_uri)
    steps.check_work(s.work)
    check_search(s.work, s.search_name, p.rounds, p.samples, seed=p.seed, controller=p.controller,
                 reward_seeds=p.reward_seeds, search_splits=p.search_splits,
                 detector=trials_detector({"detector": p.detector, "proxy": p.proxy}))
    steps.check_dataset(p.dataset)
    try:
        check_tracking(s.tracking_uri)
    except TrackingError as exc:
        raise InputError("--tracking-uri", mask(str(exc))) from None


def wait_lease_option(fn: Callable) -> Callable:
    """``--wait-lease SECONDS`` of ``paploss search`` and ``paploss run``."""
    return click.option(
        "--wait-lease", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
        help="When another run holds this search (same --work and --search-name), wait up to this long for it "
             "instead of stopping at once.")(fn)


def begin(s: RunSettings, wait_lease: float = 0.0):
    """After :func:`preflight`: take the search's lease (:mod:`paploss.lease`; another
    live run of it -> :class:`~paploss.lease.LeaseHeld`), sweep what killed runs left
    in the work folder and the temp dir (:func:`paploss.storage.sweep_temp`), and
    create the MLflow store and experiment once, before any task runs (tasks that
    start side by side never race a sqlite store's schema creation). Returns the
    :class:`~paploss.lease.Lease`; release it at the end."""
    from paploss import lease

    held = lease.acquire(s.work, s.search_name, wait=wait_lease)
    held.env_before = os.environ.get(lease.OWNER_ENV)
    os.environ[lease.OWNER_ENV] = held.owner  # the tasks it starts (kfp.local's subprocesses) are the same owner
    try:
        storage.sweep_temp(s.work)
        ensure_tracking_store(s.tracking_uri, s.experiment)
    except BaseException:
        end(held)
        raise
    return held


def end(held) -> None:
    """Release the lease of :func:`begin` (also after a failure) and forget its owner."""
    from paploss import lease

    try:
        held.release()
    finally:
        if getattr(held, "env_before", None) is None:
            os.environ.pop(lease.OWNER_ENV, None)
        else:
            os.environ[lease.OWNER_ENV] = held.env_before


def ensure_tracking_store(uri: str, experiment: str) -> str:
    """The MLflow store at ``uri`` with ``experiment`` in it, created now if missing (a
    ``sqlite:///`` store under a file lock beside it, so two processes never both
    create its schema). Returns the experiment id."""
    import contextlib

    from paploss import lease, tracking

    guard = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        guard = lease.file_lock(uri[len("sqlite:///"):] + ".lock")
    with guard:
        try:
            return tracking.experiment_id(tracking.make_client(uri), experiment)
        except tracking.TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store does not answer or cannot be created
            raise tracking.TrackingError(
                f"MLflow store {mask(uri)}: {mask(' '.join(str(exc).split()))[:300]}") from exc


def run_inprocess(s: RunSettings, *, progress: bool = True) -> dict:
    """The whole search in this process (:func:`paploss.flow.run`), ``parallelism``
    trainings side by side in worker processes (:func:`paploss.flow.processes`), shown
    by the progress display (:mod:`paploss.progress`); returns the report (the AP table)."""
    import sys

    from paploss import flow
    from paploss.progress import Plan, Progress

    search = s.search()
    run_map = flow.processes(s.preset.parallelism)
    if not progress:
        return flow.run(search, map=run_map)
    console = sys.stdout
    show = Progress(Plan.of(s.preset, finals=len(flow.final_losses(search))), console)
    with show:
        sys.stdout = _Lines(show, console)
        try:
            return flow.run(search, map=run_map)
        finally:
            sys.stdout = console


class _Lines:
    """``sys.stdout`` during an in-process search: ``paploss>`` lines to the progress
    display, any other text on to ``console``."""

    def __init__(self, show, console) -> None:
        self.show, self.console, self.buf = show, console, ""

    def write(self, text: str) -> int:
        self.buf += text
        *done, self.buf = self.buf.split("\n")
        for line in done:
            if line.strip().startswith("paploss>"):
                self.show.feed(line)
            else:
                self.console.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.console.flush()

    def isatty(self) -> bool:
        return False


def format_table(report: Mapping[str, Any], s: RunSettings | None = None) -> str:
    """The final AP table (searched vs baselines) and where to look."""
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    lines = [f"{'loss':<12}" + "".join(f"{k:>8}" for k in keys)]
    for loss, metrics in report["final"].items():
        lines.append(f"{loss:<12}" + "".join(
            f"{metrics[k] * 100:>8.2f}" if isinstance(metrics.get(k), (int, float)) and metrics[k] >= 0 else f"{'-':>8}"
            for k in keys))  # COCO gives -1 where a size class has no objects
    lines.append(f"(COCO AP x 100 on the real val split; {report['rounds']} rounds, "
                 f"{report['failed_trials']} failed trials)")
    if isinstance(report.get("searched_minus_start"), (int, float)):
        lines.append(f"searched - start: {report['searched_minus_start']:+.2f} AP (what the search changed "
                     "from its starting loss)")
    if report.get("lrs"):
        lines.append("learning rates (each loss's best of the sweep on search-val): "
                     + ", ".join(f"{loss} {lr:g}" for loss, lr in report["lrs"].items()))
    sel = report.get("selection")
    if sel:
        pick = sel["candidate"]
        seeds = ", ".join(sorted(sel["candidates"][pick]["rewards"], key=int))
        lines.append(f"searched loss: selection candidate {pick} of {len(sel['candidates'])}, mean reward "
                     f"{100 * sel['mean_reward']:.2f} over seeds {seeds} (the policy's mean was not used)")
    if report.get("model_version"):
        lines.append(f"registered model version {report['model_version']}"
                     + (" (now champion)" if report.get("promoted") else ""))
    if report.get("promotion"):
        lines.append(report["promotion"]["reason"])
    if s is not None:
        lines.append(f"MLflow: experiment {s.experiment!r}, parent run {s.search_name!r} at {mask(s.tracking_uri)}")
        from paploss.tracking import ui_lines

        lines += [mask(line) for line in ui_lines(s.tracking_uri, s.experiment)]
        lines.append(f"outputs: {steps.search_dir(s.work, s.search_name)}")
    return "\n".join(lines)


@click.command("search")
@search_options
@wait_lease_option
def search(wait_lease: float, **options: Any) -> None:
    """Run the PPO loss search in this process (no Kubeflow): the same steps as
    `paploss run`; --parallelism trainings side by side in worker processes."""
    s = settings_from_options(**options)
    preflight(s)
    held = begin(s, wait_lease)
    try:
        click.echo(f"search {s.search_name} (preset {s.preset_name}): {s.preset.rounds} rounds x "
                   f"{s.preset.samples} samples, in-process")
        report = run_inprocess(s)
    finally:
        end(held)
    click.echo(format_table(report, s))

