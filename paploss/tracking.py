"""MLflow tracking of a loss search: one parent run per search, nested trial and
final runs, per-round metrics and figures, the model registry and its champion.

Layout in MLflow (one experiment, default ``paploss``, of kind "custom model
development" so the UI opens its model-training view):

- parent run, named after the search, tags ``paploss.kind=search``,
  ``paploss.search_name=<name>``; holds the pipeline parameters; per round (step =
  round): ``mean_reward``, ``max_reward``, ``failed_trials`` and the mean θ
  (``mu.<function>.<k>``, ``mu.grad_scale``); the figures ``functions.png`` (the
  searched loss's five functions, as the paper's Figure 1) and ``rewards.png``,
  replaced each round, plus ``functions/round-NNN.png``; at the end ``AP.<loss>``
  and ``AP50.<loss>`` of every final, and a description (the run's note) with the
  AP table, the promotion decision and the searched loss's figure;
- nested trial runs named ``r01-s03`` (round 1, sample 3, counted from 1 as the
  console counts them; tags ``paploss.round``/``paploss.sample`` count from 0 as
  the work folder's files do): θ as params, ``loss_spec.json``, the training
  ``loss`` and ``box_quality`` per iteration, ``reward``, ``AP``, ``AP50``, …;
- nested final runs named ``final searched``, ``final focal+l1``, …: ``AP``,
  ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` and the detector as an MLflow
  pyfunc model in ``model/`` (:mod:`paploss.serving`; with ``loss_spec.json`` and
  ``metrics.json`` beside ``MLmodel``); the searched one registers a model version.

**One unit for AP**: every AP this module records (metrics, tags, the reward, the
report) is COCO AP × 100, as the paper and the console report it. Model versions
say so with the tag ``paploss.ap_unit = "AP x 100"``; a version registered before
that tag existed holds a fraction in its ``AP`` tag, and :func:`version_ap` reads
it × 100, so champions of either age compare in one unit.

**One run per key**: every run carries a fixed key tag ``paploss.key``
(:func:`run_key`: ``s1/search``, ``s1/trial/r000/s01``, ``s1/final/searched``). A
step opens its run when its work starts (status RUNNING, so the run's duration is
the work's) and ends it when the work ends. A retried or resumed step finds the run
with its key and reuses it: a finished one (FINISHED or FAILED) is not logged again,
one left RUNNING or KILLED by a killed task is taken over and finished; any other
run found with the same key is ended KILLED and loses the key
(``paploss.superseded_by`` names the one kept). A model version is looked up by
its run before one is registered, so a retry registers none twice.

Registry contract (``paploss retrain`` relies on it): a version of ``model_name``
whose source is the searched final run's ``model/`` folder, with tags
``paploss.search_name``, ``AP``, ``paploss.ap_unit``, ``paploss.baselines`` (JSON:
the AP of each baseline trained in the same search, set by the report) and lineage
(``paploss.git_commit``, ``paploss.image``, ``paploss.data_digest``,
``paploss.loss_spec``, ``paploss.kfp_run_id``); alias ``champion`` moved by
:func:`decide_promotion`'s rule.

Two layers: the steps call one function each with their small ``tracking`` dict
(``{"uri", "experiment"}``): :func:`open_search`, :func:`start_trial` /
:func:`record_trial`, :func:`record_round`, :func:`record_selection`,
:func:`start_final` / :func:`record_final`, :func:`record_report`. Below them,
functions on an explicit ``MlflowClient``: no global MLflow state (no
``mlflow.start_run``), so parallel trials in one process cannot tangle.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from paploss.mlflow_pages import (  # noqa: F401 - re-exported: what people see in MLflow
    FINALS_VIEW, KIND_TAG, RUNS_VIEW, RUNS_VIEW_COLUMNS, ap100, lineage, report_markdown, runs_url, save_runs_views)

__all__ = [
    "TrackingError", "NoSearchRun", "KIND", "SEARCH_NAME", "KEY", "CHAMPION", "AP_UNIT", "AP_UNIT_TAG",
    "BASELINES_TAG", "EXPERIMENT_KIND_TAG", "EXPERIMENT_KIND", "PROMOTE_RULES",
    "make_client", "client_of", "check_tracking", "experiment_id", "run_key", "claim_run", "runs_with_key",
    "find_search_run", "start_search", "finish_search", "log_trial", "log_round", "log_final",
    "register_detector", "version_of_run", "champion_version", "version_ap", "set_champion", "promote_if_better",
    "decide_promotion", "offline_decision", "ap100", "save_runs_views", "runs_url", "ui_lines", "RUNS_VIEW", "FINALS_VIEW", "ui_command", "report_markdown", "lineage",
    "open_search", "start_trial", "record_trial", "record_round", "record_selection", "start_final",
    "record_final", "record_report",
]

KIND = KIND_TAG
SEARCH_NAME = "paploss.search_name"
KEY = "paploss.key"
CHAMPION = "champion"
AP_TAG = "AP"
#: The unit of every AP recorded here, as the version tag ``paploss.ap_unit`` says it.
AP_UNIT = "AP x 100"
AP_UNIT_TAG = "paploss.ap_unit"
BASELINES_TAG = "paploss.baselines"
#: MLflow 3's experiment tag choosing the UI's view; "custom_model_development" is model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: How the searched detector earns the ``champion`` alias (:func:`decide_promotion`).
PROMOTE_RULES = ("beat-baselines", "champion")
_AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_MAX_PARAM = 6000  # MLflow's limit on a param value
_MAX_TAG = 5000  # and on a model version tag's
_DONE = ("FINISHED", "FAILED")


class TrackingError(RuntimeError):
    """The MLflow tracking server or store cannot be used; the message names the URI."""


class NoSearchRun(TrackingError):
    """A step found no parent run of its search (init-search never ran against this store)."""


def _uri(tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def make_client(tracking_uri: str | None = None):
    """An ``MlflowClient`` for ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``,
    else ``sqlite:///mlflow.db`` in the working folder)."""
    from mlflow import MlflowClient

    uri = _uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client_of(tracking: Mapping[str, str]):
    """The client of a step's ``tracking`` dict (``{"uri", "experiment"}``; ``uri`` "" = the environment's)."""
    return make_client(tracking.get("uri") or None)


def check_tracking(tracking_uri: str | None = None, timeout: float = 5.0) -> str:
    """Fail fast, before any training, if the tracking store cannot be used.

    HTTP(S) servers must answer ``/health``; a ``sqlite:///`` file must be in a
    folder that exists. Returns the URI checked; raises ``TrackingError`` naming it.
    """
    uri = _uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered /health with HTTP {resp.status}")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(f"cannot reach the MLflow server MLFLOW_TRACKING_URI={uri}: {exc}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist")
    elif uri.startswith(("file:", "/", ".")):
        pass
    elif "://" not in uri:
        raise TrackingError(f"MLflow tracking URI {uri!r} is not a URI (expected http(s)://, sqlite:///, file:)")
    return uri


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on ``tracking_uri``, runnable as printed
    from a fresh shell: the ``mlflow`` beside this Python, by its absolute path."""
    exe = Path(sys.executable).parent / "mlflow"
    prog = str(exe.absolute()) if exe.exists() else "mlflow"
    return f"{prog} ui --backend-store-uri {tracking_uri} --port 5000"


def ui_lines(tracking_uri: str, experiment: str) -> list[str]:
    """How to look at a search in the MLflow UI: the command (:func:`ui_command`) and
    the address of the experiment's finals and trials (:func:`runs_url`), when it exists."""
    lines = [f"look at it with: make ui   (or: {ui_command(tracking_uri)})"]
    try:
        check_tracking(tracking_uri, timeout=2.0)  # a server gone away: no address, and no minutes of retries
        exp = make_client(tracking_uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - a hint, never a failure
        exp = None
    if exp is not None:
        lines.append(f"  then open {runs_url(exp.experiment_id, view=FINALS_VIEW)}")
    return lines


def experiment_id(client, name: str) -> str:
    """Id of experiment ``name``, created if missing, of kind "custom model
    development" (the UI's model-training view). With a ``sqlite:///`` store the
    artifacts go to ``mlartifacts/`` beside the database file."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) is None:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    try:
        exp_id = client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # noqa: BLE001 - created concurrently by a parallel step
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
    return exp_id


# ----------------------------------------------------------------------------- run keys

def run_key(search_name: str, stage: str, *, round: int | None = None, sample: int | None = None,
            loss: str | None = None) -> str:
    """The fixed key of one run: ``<search>/search``, ``<search>/trial/rNNN/sMM``
    (round and sample from 0, as the trial files), ``<search>/final/<loss>``."""
    if stage == "search":
        return f"{search_name}/search"
    if stage == "trial":
        return f"{search_name}/trial/r{int(round):03d}/s{int(sample):02d}"
    if stage == "final":
        return f"{search_name}/final/{loss}"
    raise ValueError(f"run_key: stage {stage!r} is not one of 'search', 'trial', 'final'")


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def runs_with_key(client, experiment: str, key: str) -> list:
    """The active runs of experiment id ``experiment`` tagged ``paploss.key=key``, oldest first."""
    return list(client.search_runs([experiment], filter_string=f"tags.`{KEY}` = '{_quote(key)}'",
                                   order_by=["attributes.start_time ASC"], max_results=1000))


def _supersede(client, run, keep: str) -> None:
    """End a second run of one key KILLED and take the key off it (naming the one kept)."""
    from mlflow.entities import RunTag

    if run.info.status == "RUNNING":
        client.set_terminated(run.info.run_id, status="KILLED")
    client.log_batch(run.info.run_id, tags=[RunTag("paploss.superseded_by", keep)])
    client.delete_tag(run.info.run_id, KEY)


def claim_run(client, experiment: str, key: str, *, name: str, tags: Mapping[str, str],
              start_time: int | None = None) -> tuple[str, bool]:
    """The run of ``key`` in experiment id ``experiment``: ``(run_id, done)``.

    ``done``: it finished (FINISHED or FAILED) before; log nothing more to it.
    Otherwise it is RUNNING now: created (at ``start_time``, ms, default now, with
    ``name`` and ``tags``) when there was none, or taken over when a killed task left
    it RUNNING or KILLED. Other runs with the same key are superseded (:func:`_supersede`)."""
    runs = runs_with_key(client, experiment, key)
    if not runs:
        run = client.create_run(experiment, start_time=start_time, run_name=name, tags={KEY: key, **tags})
        return run.info.run_id, False
    done = [r for r in runs if r.info.status in _DONE]
    keep = (done or runs)[0]
    for other in runs:
        if other.info.run_id != keep.info.run_id:
            _supersede(client, other, keep.info.run_id)
    if keep in done:
        return keep.info.run_id, True
    if keep.info.status != "RUNNING":
        client.update_run(keep.info.run_id, status="RUNNING")
    return keep.info.run_id, False


# ----------------------------------------------------------------------------- the parent run

def find_search_run(client, experiment: str, search_name: str):
    """The parent run of search ``search_name`` in experiment ``experiment`` (by
    name), or None. Found by its key; a parent run logged before keys existed by its tags."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = runs_with_key(client, exp.experiment_id, run_key(search_name, "search"))
    if runs:
        return runs[0]
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{KIND}` = 'search' and tags.`{SEARCH_NAME}` = '{_quote(search_name)}'",
        max_results=1, order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= _MAX_PARAM else s[: _MAX_PARAM - 3] + "..."


def start_search(client, experiment: str, search_name: str, params: Mapping[str, Any]) -> str:
    """Get or create the parent run of a search and mark it RUNNING (a resumed search
    reuses its run). Returns the run id."""
    from mlflow.entities import Param, RunTag

    exp_id = experiment_id(client, experiment)
    legacy = find_search_run(client, experiment, search_name)
    if legacy is not None and KEY not in legacy.data.tags:
        client.set_tag(legacy.info.run_id, KEY, run_key(search_name, "search"))
    run_id, _ = claim_run(client, exp_id, run_key(search_name, "search"), name=search_name,
                          tags={KIND: "search", SEARCH_NAME: search_name})
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    have = run.data.params
    params = [Param(k, _param_value(v)) for k, v in sorted(params.items()) if k not in have]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i: i + 100])
    if "mlflow.note.content" not in run.data.tags:
        client.log_batch(run_id, tags=[RunTag("mlflow.note.content", f"paploss loss search {search_name}")])
    return run_id


def finish_search(client, run_id: str, failed: bool = False) -> None:
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _metrics(items: Iterable[tuple[str, float, int]]):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for key, value, step in items:
        v = float(value)
        if math.isnan(v) or math.isinf(v):
            continue  # MLflow rejects non-finite values; the trial records why elsewhere
        out.append(Metric(key, v, now, int(step)))
    return out


def _log_metrics(client, run_id: str, items: Iterable[tuple[str, float, int]]) -> None:
    metrics = _metrics(items)
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i: i + 1000])


def _ap_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """Evaluation metrics as recorded: the AP family × 100, the rest as they are."""
    return {k: ap100(v) if k in _AP_METRICS and float(v) >= 0 else float(v) for k, v in (metrics or {}).items()}


def _child(client, parent_run_id: str, key: str, name: str, tags: Mapping[str, str],
           start_time: int | None = None) -> tuple[str, bool]:
    parent = client.get_run(parent_run_id)
    return claim_run(client, parent.info.experiment_id, key, name=name, start_time=start_time,
                     tags={"mlflow.parentRunId": parent_run_id, **tags})


def _trial_name(round: int, sample: int) -> str:
    return f"r{int(round) + 1:02d}-s{int(sample) + 1:02d}"


def _trial_tags(search_name: str, round: int, sample: int) -> dict:
    return {KIND: "trial", SEARCH_NAME: search_name, "paploss.round": str(round), "paploss.sample": str(sample)}


def log_trial(
    client,
    parent_run_id: str,
    *,
    search_name: str,
    round: int,
    sample: int,
    theta: Sequence[float],
    names: Sequence[str] = (),
    spec_json: str | None,
    losses: Sequence[float],
    reward: float | None,
    failed: bool,
    box_quality: Sequence[float] = (),
    diverged: bool = False,
    error: str = "",
    metrics: Mapping[str, float] | None = None,
    seconds: float | None = None,
    box_collapsed: bool = False,
) -> str:
    """The trial's nested run under the search's parent run, logged and ended; its id.

    ``reward`` and ``metrics`` are fractions (as evaluation gives them): the run
    records them as AP × 100. Its curves: the training ``loss`` and, with the PAP
    loss, ``box_quality`` (the positives' mean u) per iteration. Tags say whether it
    failed, diverged, or was stopped early because its boxes collapsed. The run of
    the trial's key is reused (:func:`claim_run`): one opened when training started
    is finished; one finished before is left as it is; with none, one is created
    that starts ``seconds`` ago, so its duration is the training's."""
    from mlflow.entities import Param, RunTag

    start = int(time.time() * 1000 - 1000 * float(seconds)) if seconds else None
    run_id, done = _child(client, parent_run_id, run_key(search_name, "trial", round=round, sample=sample),
                          _trial_name(round, sample), _trial_tags(search_name, round, sample), start_time=start)
    if done:
        return run_id
    names = list(names) if len(names) == len(theta) else [f"theta.{i}" for i in range(len(theta))]
    have = client.get_run(run_id).data.params
    params = [Param(n, f"{float(v):.6f}") for n, v in zip(names, theta) if n not in have]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i: i + 100])
    items = [("loss", v, i) for i, v in enumerate(losses)] + [("box_quality", v, i) for i, v in enumerate(box_quality)]
    if reward is not None:
        items.append(("reward", ap100(reward), round))
    items += [(k, v, round) for k, v in _ap_metrics(metrics).items()]
    if seconds is not None:
        items.append(("seconds", seconds, round))
    _log_metrics(client, run_id, items)
    if spec_json is not None:
        client.log_text(run_id, spec_json, "loss_spec.json")
    client.log_dict(run_id, {"theta": list(map(float, theta)), "names": names}, "theta.json")
    if error:
        client.log_text(run_id, error, "error.txt")
    client.log_batch(run_id, tags=[RunTag(k, str(bool(v)).lower()) for k, v in
                                   (("paploss.failed", failed), ("paploss.diverged", diverged),
                                    ("paploss.box_collapsed", box_collapsed))])
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
    return run_id


def log_round(
    client,
    parent_run_id: str,
    *,
    round: int,
    rewards: Sequence[float | None],
    failed: int,
    mu: Sequence[float],
    names: Sequence[str],
    spec,
    history: Sequence[Sequence[float | None]],
    noise: Sequence[tuple[float, float] | None] = (),
) -> None:
    """Per-round metrics (step = ``round``) and figures on the parent run. Rewards
    (fractions, None for a failed trial) are recorded as AP × 100. ``noise``: per
    round so far, ``paploss.steps.reward_noise`` (the rewards' spread and the seeds'
    noise in one reward, both as standard deviations) or None; this round's, when
    there is one, is logged as ``reward_spread_sd`` and ``reward_noise_sd``, and all
    of them as the band of ``rewards.png``."""
    from paploss import plots

    finite = [ap100(r) for r in rewards if r is not None and math.isfinite(r)]
    items = [("failed_trials", failed, round)]
    if finite:
        items += [("mean_reward", sum(finite) / len(finite), round), ("max_reward", max(finite), round)]
    now = noise[round] if round < len(noise) else None
    if now is not None:
        items += [("reward_spread_sd", ap100(now[0]), round), ("reward_noise_sd", ap100(now[1]), round)]
    items += [(f"mu.{n}", v, round) for n, v in zip(names, mu)]
    _log_metrics(client, parent_run_id, items)
    history100 = [[None if v is None else ap100(v) for v in rs] for rs in history]
    noise100 = [None if n is None else (ap100(n[0]), ap100(n[1])) for n in noise]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "rewards.png").write_bytes(plots.reward_figure(history100, noise100))
        client.log_artifact(parent_run_id, str(tmp / "rewards.png"))
        if spec is not None:
            (tmp / "functions.png").write_bytes(plots.functions_figure(spec))
            client.log_artifact(parent_run_id, str(tmp / "functions.png"))
            hist = tmp / f"round-{round:03d}.png"
            os.replace(tmp / "functions.png", hist)
            client.log_artifact(parent_run_id, str(hist), "functions")
            client.log_text(parent_run_id, spec.to_json(), "loss_spec.json")


# ----------------------------------------------------------------------------- finals and the registry

def _final_tags(search_name: str, loss: str) -> dict:
    return {KIND: "final", SEARCH_NAME: search_name, "paploss.loss": loss}


def log_final(
    client,
    parent_run_id: str,
    *,
    search_name: str,
    loss: str,
    metrics: Mapping[str, float],
    losses: Sequence[float] = (),
    checkpoint: str | None = None,
    spec_json: str | None = None,
    params: Mapping[str, Any] | None = None,
    lineage: Mapping[str, str] | None = None,
    seconds: float | None = None,
) -> str:
    """The final's nested run (key ``<search>/final/<loss>``, named ``final <loss>``),
    logged and ended; returns its id. ``metrics`` are fractions, recorded as AP × 100.
    With a ``checkpoint`` its ``model/`` folder is an MLflow pyfunc model
    (:func:`paploss.serving.save_detector`) with ``loss_spec.json`` and
    ``metrics.json`` beside ``MLmodel``; ``lineage`` becomes tags. A run of that key
    finished before is returned as it is (a retried step logs nothing twice)."""
    from mlflow.entities import Param, RunTag

    start = int(time.time() * 1000 - 1000 * float(seconds)) if seconds else None
    run_id, done = _child(client, parent_run_id, run_key(search_name, "final", loss=loss), f"final {loss}",
                          _final_tags(search_name, loss), start_time=start)
    if done:
        return run_id
    have = client.get_run(run_id).data.params
    if params:
        client.log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items()) if k not in have])
    recorded = _ap_metrics(metrics)
    _log_metrics(client, run_id, [("loss", v, i) for i, v in enumerate(losses)] + [(k, v, 0) for k, v in recorded.items()])
    if lineage:
        client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MAX_TAG]) for k, v in lineage.items()])
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp, "model")
        if checkpoint is not None:
            from paploss import serving, storage

            ckpt = Path(tmp, "checkpoint.pt")
            ckpt.write_bytes(storage.read_bytes(checkpoint))
            serving.save_detector(model, ckpt, metadata={"ap_unit": AP_UNIT, **dict(lineage or {})})
        else:
            model.mkdir()
        if spec_json is not None:
            (model / "loss_spec.json").write_text(spec_json)
        (model / "metrics.json").write_text(json.dumps({"ap_unit": AP_UNIT, **recorded}, indent=2))
        client.log_artifacts(run_id, str(model), "model")
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def version_of_run(client, model_name: str, run_id: str):
    """The version of ``model_name`` registered from run ``run_id``, or None."""
    for mv in client.search_model_versions(f"name = '{_quote(model_name)}' and run_id = '{run_id}'"):
        return mv
    return None


def champion_version(client, model_name: str):
    """The ``ModelVersion`` holding alias ``champion``, or None (also when the
    model is not registered yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def version_ap(version) -> float:
    """The ``AP`` tag of a model version in AP × 100: as it is where the version says
    ``paploss.ap_unit = "AP x 100"``, × 100 for a version registered before (a
    fraction). Raises naming the version if absent or not a finite number."""
    tags = version.tags or {}
    try:
        ap = float(tags[AP_TAG])
    except (KeyError, ValueError):
        raise TrackingError(
            f"model version {version.name} v{version.version} has no numeric AP tag (tags: {tags})"
        ) from None
    if not math.isfinite(ap):
        raise TrackingError(f"model version {version.name} v{version.version} has AP={tags[AP_TAG]}")
    return ap if tags.get(AP_UNIT_TAG) == AP_UNIT else ap100(ap)


def set_champion(client, model_name: str, version: str | int) -> None:
    client.set_registered_model_alias(model_name, CHAMPION, str(version))


def promote_if_better(client, model_name: str, version: str | int, ap: float) -> bool:
    """Give ``version`` the ``champion`` alias if there is none or ``ap`` (AP × 100)
    is at least the champion's. Returns whether it was promoted. (The champion rule
    alone; :func:`record_report` applies :func:`decide_promotion`.)"""
    current = champion_version(client, model_name)
    if current is not None and str(current.version) != str(version) and ap < version_ap(current):
        return False
    set_champion(client, model_name, version)
    return True


def register_detector(
    client,
    model_name: str,
    run_id: str,
    *,
    search_name: str,
    ap: float,
    promote: bool = False,
    artifact_path: str = "model",
    tags: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """Register the final run's ``model/`` folder as a version of ``model_name``
    with tags ``paploss.search_name``, ``AP`` (``ap``: AP × 100), ``paploss.ap_unit``
    and ``tags`` (lineage); with ``promote``, make it ``champion`` by the champion
    rule alone (:func:`promote_if_better`).

    Idempotent per run: the version registered from ``run_id`` before is found and
    returned. Returns ``(version, promoted)``."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name, description="RetinaNet trained with a searched Parameterized AP Loss")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    mv = version_of_run(client, model_name, run_id)
    if mv is None:
        mv = client.create_model_version(
            model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
            tags={SEARCH_NAME: search_name, AP_TAG: repr(float(ap)), AP_UNIT_TAG: AP_UNIT,
                  **{k: str(v)[:_MAX_TAG] for k, v in (tags or {}).items()}},
            description=f"searched loss of {search_name}",
        )
    version = str(mv.version)
    promoted = promote_if_better(client, model_name, version, float(ap)) if promote else False
    return version, promoted


# ----------------------------------------------------------------------------- promotion

def decide_promotion(ap: float, baselines: Mapping[str, float], champion: tuple[str, float] | None,
                     rule: str = "beat-baselines") -> dict:
    """Whether the searched detector becomes ``champion``, and why, in one sentence.

    ``ap``: its AP × 100 on val; ``baselines``: the AP × 100 of each baseline trained
    in the same search; ``champion``: ``(version, AP × 100)`` of the current champion
    (another version), or None. Rule ``champion``: at least the champion's AP (or no
    champion yet). Rule ``beat-baselines`` (the default): that, and not behind any
    baseline. Returns ``{"promote", "rule", "reason", "behind"}``, ``behind`` mapping
    each baseline ahead of it to the gap."""
    if rule not in PROMOTE_RULES:
        raise ValueError(f"promote rule {rule!r}: expected one of {list(PROMOTE_RULES)}")
    ap = float(ap)
    behind = {k: round(float(v) - ap, 4) for k, v in baselines.items() if float(v) > ap}
    reasons = []
    if champion is not None and ap < float(champion[1]):
        reasons.append(f"it is behind champion version {champion[0]} by {float(champion[1]) - ap:.2f} AP "
                       f"({ap:.2f} < {float(champion[1]):.2f})")
    if rule == "beat-baselines":
        for loss, gap in sorted(behind.items(), key=lambda kv: -kv[1]):
            reasons.append(f"{loss} beat it by {gap:.2f} AP ({float(baselines[loss]):.2f} > {ap:.2f})")
    if reasons:
        return {"promote": False, "rule": rule, "behind": behind,
                "reason": f"not promoted: {'; '.join(reasons)} (AP x 100 on val, rule {rule})"}
    held = "no champion before" if champion is None else \
        f"champion version {champion[0]} had {float(champion[1]):.2f}"
    ahead = "" if rule != "beat-baselines" or not baselines else \
        "; not behind " + ", ".join(f"{k} ({float(v):.2f})" for k, v in baselines.items())
    note = "" if rule == "beat-baselines" or not behind else \
        "; behind " + ", ".join(f"{k} by {g:.2f}" for k, g in behind.items()) + " (rule champion ignores baselines)"
    return {"promote": True, "rule": rule, "behind": behind,
            "reason": f"promoted: AP {ap:.2f}, {held}{ahead}{note} (AP x 100 on val, rule {rule})"}


#: The finals that are no baseline of the promotion rule: the search's starting loss is a row of the
#: table (the report states searched - start), but the rule weighs the searched loss against the baselines
START_FINAL = "start"


def _finals_ap(table: Mapping[str, Any], searched: str) -> tuple[float, dict[str, float]]:
    finals = table["final"]
    return ap100(finals[searched].get("AP", 0.0)), {k: ap100(m.get("AP", 0.0)) for k, m in finals.items()
                                                    if k not in (searched, START_FINAL)}


def offline_decision(table: Mapping[str, Any], rule: str = "beat-baselines", searched: str = "searched") -> dict:
    """The decision of a search without MLflow: nothing registered, so nothing
    promoted; the reason still says where the searched loss stands against the baselines."""
    if searched not in table["final"]:
        return {"promote": False, "rule": rule, "behind": {}, "reason": "not promoted: no searched final"}
    d = decide_promotion(*_finals_ap(table, searched), None, rule)
    where = "; ".join(f"{k} beat it by {g:.2f} AP" for k, g in d["behind"].items()) or "not behind a baseline"
    return {**d, "promote": False, "reason": f"not promoted: no MLflow tracking, nothing registered ({where})"}


# ----------------------------------------------------------------------------- what the steps call

def _parent(client, tracking: Mapping[str, str], search_name: str):
    parent = find_search_run(client, tracking["experiment"], search_name)
    if parent is None:
        raise NoSearchRun(f"MLflow {client.tracking_uri}: no parent run of search {search_name!r} in experiment "
                          f"{tracking['experiment']!r} (init-search opens it)")
    return parent


def open_search(tracking: Mapping[str, str], search_name: str, params: Mapping[str, Any]) -> str:
    """init-search: the search's parent run, opened (or reopened on resume)."""
    return start_search(client_of(tracking), tracking["experiment"], search_name, params)


def start_trial(tracking: Mapping[str, str], search_name: str, round: int, sample: int) -> str:
    """proxy-trial, as its training starts: open (or take over) the trial's run, RUNNING."""
    client = client_of(tracking)
    parent = _parent(client, tracking, search_name)
    return _child(client, parent.info.run_id, run_key(search_name, "trial", round=round, sample=sample),
                  _trial_name(round, sample), _trial_tags(search_name, round, sample))[0]


def record_trial(tracking: Mapping[str, str], search_name: str, result: Mapping[str, Any],
                 names: Sequence[str] = ()) -> str:
    """proxy-trial, when its result is known (or found stored): log it on the trial's
    run and end it; a run finished before is left as it is. Returns the run id."""
    client = client_of(tracking)
    parent = _parent(client, tracking, search_name)
    return log_trial(
        client, parent.info.run_id, search_name=search_name, round=int(result["round"]),
        sample=int(result["sample"]), theta=result["theta"], names=names, spec_json=result.get("spec"),
        losses=result.get("losses", ()), box_quality=result.get("box_quality", ()), reward=result["reward"],
        failed=bool(result["failed"]), diverged=bool(result["diverged"]), error=result.get("error", ""),
        metrics=result.get("metrics"), seconds=result.get("seconds"), box_collapsed=bool(result.get("box_collapsed")),
    )


def record_round(tracking: Mapping[str, str], search_name: str, **round_data: Any) -> None:
    """controller-update: the round's metrics and figures on the parent run (:func:`log_round`)."""
    client = client_of(tracking)
    log_round(client, _parent(client, tracking, search_name).info.run_id, **round_data)


def record_selection(tracking: Mapping[str, str], search_name: str, candidates: Sequence[Mapping[str, Any]],
                     selected: Mapping[str, Any]) -> None:
    """select-loss: each candidate's mean reward (AP × 100, step = candidate) and ``selection.json``."""
    client = client_of(tracking)
    run_id = _parent(client, tracking, search_name).info.run_id
    _log_metrics(client, run_id, [("selection.mean_reward", ap100(c["mean_reward"]), k) for k, c in enumerate(candidates)]
                 + [("selection.best_mean_reward", ap100(selected["mean_reward"]), 0)])
    client.log_dict(run_id, dict(selected), "selection.json")


def start_final(tracking: Mapping[str, str], search_name: str, loss: str) -> str:
    """final-train, as its training starts: open (or take over) the final's run, RUNNING."""
    client = client_of(tracking)
    parent = _parent(client, tracking, search_name)
    return _child(client, parent.info.run_id, run_key(search_name, "final", loss=loss), f"final {loss}",
                  _final_tags(search_name, loss))[0]


def record_final(tracking: Mapping[str, str], search_name: str, result: Mapping[str, Any], *,
                 losses: Sequence[float] = (), params: Mapping[str, Any] | None = None, data: str | None = None,
                 model_name: str = "paploss-retinanet", register: bool = False) -> dict:
    """final-train, when trained: log the final's run (the detector as a pyfunc model,
    lineage tags) and end it; with ``register``, register the model as a version of
    ``model_name`` without moving ``champion`` (the report decides). A retry reuses the
    run and the version. Returns ``{"run_id", "model_version"}``."""
    client = client_of(tracking)
    parent = _parent(client, tracking, search_name)
    tags = lineage(data=data, spec_json=result.get("spec"), image=parent.data.params.get("image"))
    run_id = log_final(client, parent.info.run_id, search_name=search_name, loss=result["loss"],
                       metrics=result["metrics"], losses=losses, checkpoint=result.get("checkpoint") or None,
                       spec_json=result.get("spec"), params=params, lineage=tags, seconds=result.get("seconds"))
    version = None
    if register:
        version, _ = register_detector(client, model_name, run_id, search_name=search_name,
                                       ap=ap100(result["metrics"].get("AP", 0.0)), tags=tags)
    return {"run_id": run_id, "model_version": version}


def record_report(tracking: Mapping[str, str], search_name: str, table: Mapping[str, Any], *,
                  model_name: str = "paploss-retinanet", promote: bool = False,
                  rule: str = "beat-baselines", searched: str = "searched") -> dict:
    """report: decide and apply the promotion, describe and end the parent run.

    The searched version (``table["model_version"]``) gets the tag
    ``paploss.baselines`` and the decision (:func:`decide_promotion`, against the
    current champion and ``table``'s baselines); with ``promote`` and a yes, the
    ``champion`` alias. The parent run gets ``AP.<loss>``/``AP50.<loss>`` metrics,
    ``report.json`` and its description (:func:`report_markdown`); then it is
    FINISHED. Returns the decision (``promote`` is False whenever nothing moved)."""
    from mlflow.entities import RunTag

    client = client_of(tracking)
    parent = _parent(client, tracking, search_name)
    run_id = parent.info.run_id
    finals = table["final"]
    decision = {"promote": False, "rule": rule, "behind": {}, "reason": "not promoted: no searched model version"}
    version = table.get("model_version")
    if version is not None and searched in finals:
        ap, baselines = _finals_ap(table, searched)
        held = champion_version(client, model_name)
        champ = (str(held.version), version_ap(held)) if held is not None and str(held.version) != str(version) else None
        decision = decide_promotion(ap, baselines, champ, rule)
        if decision["promote"] and not promote:
            decision = {**decision, "promote": False,
                        "reason": decision["reason"].replace("promoted:", "would be promoted, but promotion is off:", 1)}
        client.set_model_version_tag(model_name, str(version), BASELINES_TAG, json.dumps(baselines))
        client.set_model_version_tag(model_name, str(version), "paploss.promotion", decision["reason"][:_MAX_TAG])
        if decision["promote"]:
            set_champion(client, model_name, version)
    client.log_dict(run_id, {**dict(table), "promotion": decision}, "report.json")
    items = []
    for loss, metrics in finals.items():
        for k in ("AP", "AP50"):
            if k in metrics:
                items.append((f"{k}.{loss.replace('+', '_')}", ap100(metrics[k]), 0))
    _log_metrics(client, run_id, items)
    client.log_batch(run_id, tags=[RunTag("mlflow.note.content", report_markdown(table, decision, run_id))])
    save_runs_views(client, parent.info.experiment_id)
    finish_search(client, run_id)
    return decision
