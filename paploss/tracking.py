"""MLflow tracking of a loss search: one parent run per search, nested trial and
final runs, per-round metrics and figures, and the model registry.

Layout in MLflow (one experiment, default ``paploss``):

- parent run, tags ``paploss.kind=search`` and ``paploss.search_name=<name>``, holds
  the pipeline parameters; per round (step = round): ``mean_reward``, ``max_reward``,
  ``failed_trials`` and the mean θ (``mu.<function>.<k>``, ``mu.grad_scale``); the
  figures ``functions.png`` (the five searched functions with their control
  points, as the paper's Figure 1) and ``rewards.png`` (reward per round), replaced
  each round, plus ``functions/round-NNN.png`` for the history;
- nested trial runs (``paploss.kind=trial``, ``paploss.round``, ``paploss.sample``):
  θ as params (named as ``Controller.parameter_names``), ``loss_spec.json`` (control points and gradient scale), the training
  loss per step (``loss``) and ``reward``;
- nested final runs (``paploss.kind=final``, ``paploss.loss``): ``AP``, ``AP50``,
  ``AP75``, ``APs``, ``APm``, ``APl``; the searched one registers a model version.

Registry contract (``paploss retrain`` relies on it): a version of ``model_name``
whose source is the final run's ``model/`` folder (checkpoint and
``loss_spec.json``), with version tags ``paploss.search_name`` and ``AP``; alias
``champion`` on the best version by the ``AP`` tag.

Every function takes an explicit ``MlflowClient``: no global MLflow state (no
``mlflow.start_run``), so parallel trials in one process cannot tangle.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from paploss import plots

__all__ = [
    "TrackingError",
    "KIND",
    "SEARCH_NAME",
    "CHAMPION",
    "make_client",
    "check_tracking",
    "experiment_id",
    "find_search_run",
    "start_search",
    "finish_search",
    "log_trial",
    "log_round",
    "log_final",
    "register_detector",
    "champion_version",
    "version_ap",
    "set_champion",
    "promote_if_better",
]

KIND = "paploss.kind"
SEARCH_NAME = "paploss.search_name"
CHAMPION = "champion"
_MAX_PARAM = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """The MLflow tracking server or store cannot be used; the message names the URI."""


def _uri(tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def make_client(tracking_uri: str | None = None):
    """An ``MlflowClient`` for ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``,
    else ``sqlite:///mlflow.db`` in the working folder)."""
    from mlflow import MlflowClient

    uri = _uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


def experiment_id(client, name: str) -> str:
    """Id of experiment ``name``, created if missing. With a ``sqlite:///`` store
    the artifacts go to ``mlartifacts/`` beside the database file."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created concurrently by a parallel step
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_search_run(client, experiment: str, search_name: str):
    """The parent run of search ``search_name`` in ``experiment``, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{KIND}` = 'search' and tags.`{SEARCH_NAME}` = '{search_name}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= _MAX_PARAM else s[: _MAX_PARAM - 3] + "..."


def start_search(client, experiment: str, search_name: str, params: Mapping[str, Any]) -> str:
    """Get or create the parent run of a search (idempotent: a resumed search
    reuses its run and marks it running again). Returns the run id."""
    from mlflow.entities import Param, RunTag

    run = find_search_run(client, experiment, search_name)
    if run is not None:
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    exp_id = experiment_id(client, experiment)
    run = client.create_run(
        exp_id,
        run_name=search_name,
        tags={KIND: "search", SEARCH_NAME: search_name},
    )
    params = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i: i + 100])
    client.log_batch(run.info.run_id, tags=[RunTag("mlflow.note.content", f"paploss loss search {search_name}")])
    return run.info.run_id


def finish_search(client, run_id: str, failed: bool = False) -> None:
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _metrics(items: Iterable[tuple[str, float, int]]):
    import time

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


def _child_run(client, parent_run_id: str, name: str, tags: Mapping[str, str]) -> str:
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id,
        run_name=name,
        tags={"mlflow.parentRunId": parent_run_id, **tags},
    )
    return run.info.run_id


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
    """A nested trial run under the search's parent run; returns its id. Its curves: the
    training ``loss`` and, with the PAP loss, ``box_quality`` (the positives' mean u) per
    iteration. Tags say whether it failed, diverged, or was stopped early because its
    boxes collapsed."""
    from mlflow.entities import Param

    run_id = _child_run(
        client, parent_run_id, f"r{round:03d}-s{sample:02d}",
        {KIND: "trial", SEARCH_NAME: search_name, "paploss.round": str(round),
         "paploss.sample": str(sample), "paploss.failed": str(bool(failed)).lower(),
         "paploss.diverged": str(bool(diverged)).lower(), "paploss.box_collapsed": str(bool(box_collapsed)).lower()},
    )
    names = list(names) if len(names) == len(theta) else [f"theta.{i}" for i in range(len(theta))]
    params = [Param(n, f"{float(v):.6f}") for n, v in zip(names, theta)]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i: i + 100])
    items = [("loss", v, i) for i, v in enumerate(losses)] + [("box_quality", v, i) for i, v in enumerate(box_quality)]
    if reward is not None:
        items.append(("reward", reward, round))
    for k, v in (metrics or {}).items():
        items.append((k, v, round))
    if seconds is not None:
        items.append(("seconds", seconds, round))
    _log_metrics(client, run_id, items)
    if spec_json is not None:
        client.log_text(run_id, spec_json, "loss_spec.json")
    client.log_dict(run_id, {"theta": list(map(float, theta)), "names": names}, "theta.json")
    if error:
        client.log_text(run_id, error, "error.txt")
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
    return run_id


def log_round(
    client,
    parent_run_id: str,
    *,
    round: int,
    rewards: Sequence[float],
    failed: int,
    mu: Sequence[float],
    names: Sequence[str],
    spec,
    history: Sequence[Sequence[float | None]],
    noise: Sequence[tuple[float, float] | None] = (),
) -> None:
    """Per-round metrics (step = ``round``) and figures on the parent run. ``noise``:
    per round so far, ``paploss.steps.reward_noise`` (the rewards' spread and the
    seeds' noise in one reward, both as standard deviations) or None; this round's,
    when there is one, is logged as ``reward_spread_sd`` and ``reward_noise_sd``, and
    all of them as the band of ``rewards.png``."""
    finite = [r for r in rewards if r is not None and math.isfinite(r)]
    items = [("failed_trials", failed, round)]
    if finite:
        items += [("mean_reward", sum(finite) / len(finite), round), ("max_reward", max(finite), round)]
    now = noise[round] if round < len(noise) else None
    if now is not None:
        items += [("reward_spread_sd", now[0], round), ("reward_noise_sd", now[1], round)]
    items += [(f"mu.{n}", v, round) for n, v in zip(names, mu)]
    _log_metrics(client, parent_run_id, items)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "rewards.png").write_bytes(plots.reward_figure(history, noise))
        client.log_artifact(parent_run_id, str(tmp / "rewards.png"))
        if spec is not None:
            (tmp / "functions.png").write_bytes(plots.functions_figure(spec))
            client.log_artifact(parent_run_id, str(tmp / "functions.png"))
            hist = tmp / f"round-{round:03d}.png"
            os.replace(tmp / "functions.png", hist)
            client.log_artifact(parent_run_id, str(hist), "functions")
            client.log_text(parent_run_id, spec.to_json(), "loss_spec.json")


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
) -> str:
    """A nested ``paploss.kind=final`` run with the AP metrics; the checkpoint and
    ``loss_spec.json`` go to its ``model/`` folder. Returns the run id."""
    from mlflow.entities import Param

    run_id = _child_run(client, parent_run_id, f"final-{loss}", {KIND: "final", SEARCH_NAME: search_name, "paploss.loss": loss})
    if params:
        client.log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())])
    _log_metrics(client, run_id, [("loss", v, i) for i, v in enumerate(losses)] + [(k, v, 0) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp, "model")
        model.mkdir()
        if checkpoint is not None:
            from paploss import storage

            (model / "checkpoint.pt").write_bytes(storage.read_bytes(checkpoint))
        if spec_json is not None:
            (model / "loss_spec.json").write_text(spec_json)
        (model / "metrics.json").write_text(json.dumps(dict(metrics), indent=2))
        client.log_artifacts(run_id, str(model), "model")
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def champion_version(client, model_name: str):
    """The ``ModelVersion`` holding alias ``champion``, or None (also when the
    model is not registered yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def version_ap(version) -> float:
    """The ``AP`` tag of a model version as a float; raises naming the version if absent."""
    try:
        return float(version.tags["AP"])
    except (KeyError, ValueError):
        raise TrackingError(
            f"model version {version.name} v{version.version} has no numeric AP tag (tags: {version.tags})"
        ) from None


def set_champion(client, model_name: str, version: str | int) -> None:
    client.set_registered_model_alias(model_name, CHAMPION, str(version))


def promote_if_better(client, model_name: str, version: str | int, ap: float) -> bool:
    """Give ``version`` the ``champion`` alias if there is none or ``ap`` is at
    least the champion's ``AP`` tag. Returns whether it was promoted."""
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
    promote: bool = True,
    artifact_path: str = "model",
) -> tuple[str, bool]:
    """Register the final run's ``model/`` folder (checkpoint + ``loss_spec.json``)
    as a new version of ``model_name`` with tags ``paploss.search_name`` and ``AP``;
    with ``promote``, make it ``champion`` when it is at least as good.

    Idempotent per (search_name, run): a second call returns the existing version.
    Returns ``(version, promoted)``."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name, description="RetinaNet trained with a searched Parameterized AP Loss")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    for mv in client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'"):
        version = str(mv.version)
        break
    else:
        mv = client.create_model_version(
            model_name,
            source=f"runs:/{run_id}/{artifact_path}",
            run_id=run_id,
            tags={SEARCH_NAME: search_name, "AP": repr(float(ap))},
            description=f"searched loss of {search_name}",
        )
        version = str(mv.version)
    promoted = promote_if_better(client, model_name, version, float(ap)) if promote else False
    return version, promoted
