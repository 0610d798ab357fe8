"""``paploss retrain``: submit the search pipeline, wait, and gate the result on the champion.

The retraining gate CI runs (``.github/workflows/retrain.yml``), usable by hand too:

1. check the inputs: a Kubeflow host, an MLflow tracking URI, a dataset URI;
2. connect to Kubeflow (reachable? credentials accepted?) and to the MLflow
   registry, before anything is compiled or submitted;
3. compile the pipeline (or take ``--package``), submit it with ``promote=False``
   and a unique ``search_name``, and wait for the run;
4. find the model version the run registered: the version of ``model_name``
   tagged ``paploss.search_name=<search_name>`` (the pipeline's contract, with its
   ``AP=<float>`` tag and its ``loss_spec.json`` artifact);
5. decide as the search's report does (:func:`paploss.tracking.decide_promotion`):
   with ``--promote-rule beat-baselines`` (the default) the new version gets the
   gate alias (``champion``) when its AP is at least the champion's (or there is
   no champion yet) and it is not behind a baseline trained in the same run (the
   version's ``paploss.baselines`` tag); ``--promote-rule champion`` compares with
   the champion alone. Every AP is COCO AP x 100 on val (a version registered before
   the ``paploss.ap_unit`` tag holds a fraction, read x 100).

Output for CI: one line ``promoted=true`` or ``promoted=false``, then the reason
(which baseline or champion beat it, and by how much).

Exit status: 0 a decision was made, promoted or not (read the ``promoted=`` line;
with ``--require-promotion``, 1 when not promoted); 2 bad usage or input (missing
host, tracking URI, dataset); 3 the infrastructure failed (host unreachable,
credentials refused, run failed or timed out, no new model version, a version
without an AP). Nothing is promoted unless the line says ``promoted=true``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from paploss import tracking
from pipelines import kfp_remote

__all__ = [
    "RetrainConfig",
    "RetrainResult",
    "RetrainError",
    "GateFailed",
    "SEARCH_NAME_TAG",
    "AP_TAG",
    "LOSS_SPEC_ARTIFACT",
    "unique_search_name",
    "find_version",
    "version_ap",
    "champion",
    "run_retrain",
    "retrain",
]

SEARCH_NAME_TAG = tracking.SEARCH_NAME  # "paploss.search_name", set by tracking.register_detector
AP_TAG = "AP"
LOSS_SPEC_ARTIFACT = "loss_spec.json"
#: Root parameters the package must take so that this gate, not the pipeline, decides promotion.
REQUIRED_PARAMETERS = ("search_name", "model_name", "promote")
#: Names the dataset parameter may have in the compiled pipeline, in order of preference.
DATASET_PARAMETERS = ("dataset_uri", "dataset")

EXIT_PROMOTED, EXIT_NOT_PROMOTED, EXIT_USAGE, EXIT_FAILURE = 0, 1, 2, 3
#: A decision was made (promoted or not): exit 0 unless --require-promotion.
EXIT_DECIDED = 0
EXIT_WORSE = EXIT_NOT_PROMOTED  # the name before --promote-rule


class RetrainError(click.ClickException):
    """A failure before a decision could be made; nothing was promoted."""

    exit_code = EXIT_FAILURE

    def __init__(self, what: str, message: str):
        super().__init__(f"{what}: {message}")
        self.what = what


class UsageError(RetrainError):
    exit_code = EXIT_USAGE


class GateFailed(click.ClickException):
    """Not promoted while ``--require-promotion`` asks for a promotion; the alias stays where it was."""

    exit_code = EXIT_NOT_PROMOTED


@dataclass(frozen=True)
class RetrainConfig:
    """Everything one retrain needs (the CLI options, validated)."""

    host: str
    dataset: str
    tracking_uri: str
    gate: str = "champion"
    promote_rule: str = "beat-baselines"
    model_name: str = "paploss-retinanet"
    package: str | None = None
    image: str | None = None
    experiment: str = "paploss-retrain"
    namespace: str | None = None
    token: str | None = None
    search_name: str | None = None
    timeout_s: float = 24 * 3600.0
    poll_s: float = 30.0
    extra_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrainResult:
    """What happened; ``promoted`` is the gate's decision."""

    search_name: str
    run_id: str
    run_url: str
    state: str
    model_name: str
    new_version: str
    new_ap: float
    champion_version: str | None
    champion_ap: float | None
    promoted: bool
    baselines: dict = field(default_factory=dict)
    rule: str = "beat-baselines"
    reason: str = ""
    ap_unit: str = tracking.AP_UNIT

    def to_json(self) -> dict:
        return asdict(self)


def unique_search_name(now: _dt.datetime | None = None) -> str:
    """``retrain-YYYYmmdd-HHMMSS-<8 hex>``: unique per call, sortable by time."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"retrain-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- MLflow registry


def _mlflow_client(tracking_uri: str):
    return tracking.make_client(tracking_uri)


def _is_missing(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def check_registry(client, tracking_uri: str) -> None:
    """One cheap registry call, so that an unreachable or locked MLflow fails now, not after the run."""
    try:
        tracking.check_tracking(tracking_uri)
    except tracking.TrackingError as exc:
        raise RetrainError("MLflow unreachable", str(exc)) from None
    try:
        client.search_registered_models(max_results=1)
    except Exception as exc:  # noqa: BLE001 - classified
        text = str(exc)
        if any(s in text for s in ("401", "403", "Unauthorized", "Forbidden", "PERMISSION_DENIED", "UNAUTHENTICATED")):
            raise RetrainError(
                "MLflow credentials refused",
                f"{tracking_uri} refused the request; set MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) ({text[:200]})",
            ) from None
        raise RetrainError("MLflow unreachable", f"cannot use the registry at {tracking_uri}: {text[:300]}") from None


def version_ap(version) -> float:
    """The ``AP`` tag of a model version in AP x 100 (:func:`paploss.tracking.version_ap`'s
    units: a version without ``paploss.ap_unit`` holds a fraction); a clear error if absent or not a number."""
    raw = (version.tags or {}).get(AP_TAG)
    if raw is None:
        raise RetrainError(
            "model version has no AP", f"{version.name} version {version.version} has no tag {AP_TAG!r}"
        )
    try:
        ap = float(raw)
    except ValueError:
        raise RetrainError(
            "model version has a bad AP",
            f"{version.name} version {version.version} has tag {AP_TAG}={raw!r}, not a number",
        ) from None
    if not math.isfinite(ap):
        raise RetrainError("model version has a bad AP", f"{version.name} version {version.version} has {AP_TAG}={raw}")
    return ap if (version.tags or {}).get(tracking.AP_UNIT_TAG) == tracking.AP_UNIT else tracking.ap100(ap)


def version_baselines(version) -> dict[str, float]:
    """The AP x 100 of each baseline trained beside the version (its ``paploss.baselines``
    tag, written by the search's report); {} for a version without it (then the rule
    can only compare with the champion, and the reason says so)."""
    raw = (version.tags or {}).get(tracking.BASELINES_TAG)
    if raw is None:
        return {}
    try:
        out = {str(k): float(v) for k, v in json.loads(raw).items()}
    except (ValueError, AttributeError, TypeError):
        raise RetrainError("model version has bad baselines",
                           f"{version.name} version {version.version} has {tracking.BASELINES_TAG}={raw!r}") from None
    return out


def find_version(client, model_name: str, search_name: str):
    """The version of ``model_name`` tagged ``paploss.search_name=search_name`` (the newest if several), or None."""
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except Exception as exc:  # noqa: BLE001
        if _is_missing(exc):
            return None
        raise
    matches = [v for v in versions if (v.tags or {}).get(SEARCH_NAME_TAG) == search_name]
    return max(matches, key=lambda v: int(v.version)) if matches else None


def champion(client, model_name: str, alias: str):
    """The version holding ``alias`` (with its tags), or None when the model or the alias does not exist."""
    try:
        registered = client.get_registered_model(model_name)
    except Exception as exc:  # noqa: BLE001
        if _is_missing(exc):
            return None
        raise
    version = (registered.aliases or {}).get(alias)
    if version is None:
        return None
    return client.get_model_version(model_name, str(version))


def check_loss_spec(tracking_uri: str, version) -> dict:
    """The version's ``loss_spec.json`` artifact, parsed; a RetrainError if missing or not JSON."""
    from mlflow.artifacts import download_artifacts

    uri = f"models:/{version.name}/{version.version}/{LOSS_SPEC_ARTIFACT}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri)
        except Exception as exc:  # noqa: BLE001
            raise RetrainError(
                "model version has no loss spec",
                f"{version.name} version {version.version} has no artifact {LOSS_SPEC_ARTIFACT} ({str(exc)[:200]})",
            ) from None
        try:
            return json.loads(Path(path).read_text())
        except ValueError as exc:
            raise RetrainError(
                "model version has a bad loss spec", f"{uri} is not valid JSON: {exc}"
            ) from None


# ---------------------------------------------------------------- the pipeline package


def _package(cfg: RetrainConfig, workdir: Path) -> Path:
    if cfg.package:
        path = Path(cfg.package)
        if not path.is_file():
            raise UsageError("missing package", f"--package {cfg.package} does not exist")
        return path
    try:
        from pipelines.compile import compile_pipeline
    except ImportError as exc:
        raise RetrainError("cannot compile", f"pipelines.compile is not available ({exc}); pass --package") from None
    out = workdir / "search_pipeline.yaml"
    return Path(compile_pipeline(str(out), image=cfg.image))


def _coerce(name: str, value: Any, spec: dict) -> Any:
    """A CLI string turned into the type the pipeline parameter declares."""
    kind = spec.get("parameterType", "STRING")
    if not isinstance(value, str):
        return value
    try:
        if kind == "NUMBER_INTEGER":
            return int(value)
        if kind == "NUMBER_DOUBLE":
            return float(value)
        if kind == "BOOLEAN":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if kind in ("STRUCT", "LIST"):
            return json.loads(value)
    except ValueError:
        raise UsageError("bad --param", f"{name}={value!r} is not a valid {kind}") from None
    return value


def build_params(cfg: RetrainConfig, package: Path, search_name: str) -> dict[str, Any]:
    """The run's arguments: dataset, search_name, model_name, promote=False, plus --param extras.

    When the pipeline takes ``tracking_uri`` and ``--param tracking_uri=...`` is not
    given, the run logs to the same MLflow the gate reads (``cfg.tracking_uri``);
    pass the param when the cluster reaches MLflow under another address."""
    accepted = kfp_remote.pipeline_parameters(package)
    missing = [p for p in REQUIRED_PARAMETERS if p not in accepted]
    if missing:
        raise UsageError(
            "package lacks gate parameters",
            f"{package} takes no {missing}; the retrain gate needs {list(REQUIRED_PARAMETERS)} "
            f"(it takes {sorted(accepted)})",
        )
    dataset_param = next((p for p in DATASET_PARAMETERS if p in accepted), None)
    if dataset_param is None:
        raise UsageError("package lacks a dataset parameter", f"{package} takes none of {list(DATASET_PARAMETERS)}")
    params: dict[str, Any] = {
        dataset_param: cfg.dataset,
        "search_name": search_name,
        "model_name": cfg.model_name,
        "promote": False,
    }
    for name, value in cfg.extra_params.items():
        if name in REQUIRED_PARAMETERS or name == dataset_param:
            raise UsageError("bad --param", f"{name} is set by retrain itself; use the dedicated option")
        if name not in accepted:
            raise UsageError("bad --param", f"{package} takes no parameter {name!r}; it takes {sorted(accepted)}")
        params[name] = _coerce(name, value, accepted[name])
    if "tracking_uri" in accepted and "tracking_uri" not in params:
        params["tracking_uri"] = cfg.tracking_uri
    return params


# ---------------------------------------------------------------- the gate


def run_retrain(
    cfg: RetrainConfig,
    *,
    client_factory: Callable[..., Any] | None = None,
    echo: Callable[[str], None] = click.echo,
) -> RetrainResult:
    """Submit, wait, decide, promote. Raises RetrainError / GateFailed (see the module doc)."""
    if not cfg.host or not cfg.host.strip():
        raise UsageError("missing host", "no Kubeflow host: pass --host URL or set KFP_HOST")
    if not cfg.tracking_uri or not cfg.tracking_uri.strip():
        raise UsageError(
            "missing MLflow tracking URI",
            "set MLFLOW_TRACKING_URI (or --tracking-uri) to the registry the pipeline writes to",
        )
    if not cfg.dataset or not cfg.dataset.strip():
        raise UsageError("missing dataset", "pass --dataset URI (a local path or s3:// URI the cluster can read)")
    if not cfg.gate:
        raise UsageError("missing gate", "--gate must name a model alias, e.g. champion")

    try:
        client = kfp_remote.connect(
            cfg.host, namespace=cfg.namespace, existing_token=cfg.token, client_factory=client_factory
        )
    except kfp_remote.KfpHostError as exc:
        raise UsageError("bad host", str(exc)) from None
    except kfp_remote.KfpUnreachableError as exc:
        raise RetrainError("Kubeflow host unreachable", str(exc)) from None
    except kfp_remote.KfpAuthError as exc:
        raise RetrainError("Kubeflow credentials refused", str(exc)) from None
    except kfp_remote.KfpError as exc:
        raise RetrainError("Kubeflow error", str(exc)) from None

    registry = _mlflow_client(cfg.tracking_uri)
    check_registry(registry, cfg.tracking_uri)

    search_name = cfg.search_name or unique_search_name()
    if find_version(registry, cfg.model_name, search_name) is not None:
        raise UsageError(
            "search name already used",
            f"{cfg.model_name} already has a version tagged {SEARCH_NAME_TAG}={search_name}: "
            "choose another --search-name (or leave it out)",
        )
    with tempfile.TemporaryDirectory(prefix="paploss-retrain-") as tmp:
        package = _package(cfg, Path(tmp))
        params = build_params(cfg, package, search_name)
        try:
            run_id = kfp_remote.submit_package(
                client, package, params, experiment=cfg.experiment, run_name=search_name
            )
        except kfp_remote.KfpAuthError as exc:
            raise RetrainError("Kubeflow credentials refused", str(exc)) from None
        except (kfp_remote.KfpError, ValueError, FileNotFoundError) as exc:
            raise RetrainError("submission failed", str(exc)) from None
    url = kfp_remote.run_url(cfg.host, run_id)
    echo(f"submitted {search_name}: run {run_id}\n  {url}")

    try:
        state = kfp_remote.wait_for_run(client, run_id, timeout_s=cfg.timeout_s, poll_s=cfg.poll_s)
    except TimeoutError as exc:
        raise RetrainError("run timed out", f"{exc}; see {url}") from None
    except kfp_remote.KfpError as exc:
        raise RetrainError("lost the run", f"{exc}; see {url}") from None
    if state != "SUCCEEDED":
        raise RetrainError("run failed", f"run {run_id} ended in state {state}; see {url}")
    echo(f"run {run_id} succeeded")
    try:
        return _decide(cfg, registry, search_name, run_id, url, state, echo)
    except click.ClickException:
        raise
    except Exception as exc:  # noqa: BLE001 - an MLflow failure after the run is not a verdict
        raise RetrainError(
            "MLflow registry error", f"{type(exc).__name__}: {str(exc)[:300]} (nothing promoted; run {url})"
        ) from None


def _decide(cfg: RetrainConfig, registry, search_name: str, run_id: str, url: str, state: str,
            echo: Callable[[str], None]) -> RetrainResult:
    """Find the run's model version, compare it with the gate alias, move the alias if it is at least as good."""
    new = find_version(registry, cfg.model_name, search_name)
    if new is None:
        raise RetrainError(
            "no new model version",
            f"run {run_id} succeeded but {cfg.tracking_uri} has no version of {cfg.model_name!r} "
            f"tagged {SEARCH_NAME_TAG}={search_name}",
        )
    new_ap = version_ap(new)
    baselines = version_baselines(new)
    check_loss_spec(cfg.tracking_uri, new)

    held = champion(registry, cfg.model_name, cfg.gate)
    if held is not None and str(held.version) == str(new.version):
        held = None
    champ_ap = version_ap(held) if held is not None else None
    decision = tracking.decide_promotion(new_ap, baselines, (str(held.version), champ_ap) if held is not None else None,
                                         cfg.promote_rule)
    promoted = bool(decision["promote"])
    reason = decision["reason"]
    if not baselines and cfg.promote_rule == "beat-baselines":
        reason += f" (version {new.version} records no baselines: compared with the champion only)"
    result = RetrainResult(
        search_name=search_name,
        run_id=run_id,
        run_url=url,
        state=state,
        model_name=cfg.model_name,
        new_version=str(new.version),
        new_ap=new_ap,
        champion_version=str(held.version) if held is not None else None,
        champion_ap=champ_ap,
        promoted=promoted,
        baselines=baselines,
        rule=cfg.promote_rule,
        reason=reason,
    )
    if promoted:
        registry.set_registered_model_alias(cfg.model_name, cfg.gate, str(new.version))
        before = (
            f"no {cfg.gate} before"
            if held is None
            else f"{cfg.gate} was version {held.version} with AP {champ_ap:.2f}"
        )
        echo(f"promoted {cfg.model_name} version {new.version} (AP {new_ap:.2f}) to {cfg.gate}; {before}")
    else:
        echo(f"{cfg.model_name} version {new.version} (AP {new_ap:.2f}) stays registered without {cfg.gate}")
    registry.set_model_version_tag(cfg.model_name, str(new.version), "paploss.promotion", reason[:5000])
    echo(f"promoted={'true' if promoted else 'false'}")
    echo(reason)
    return result


def _parse_params(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        out[name] = value
    return out


@click.command("retrain", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", envvar="KFP_HOST", default=None, metavar="URL",
              help="Kubeflow Pipelines API endpoint [env KFP_HOST].")
@click.option("--dataset", envvar="PAPLOSS_DATASET", default=None, metavar="URI",
              help="Dataset URI the cluster reads (s3://... or a path it mounts) [env PAPLOSS_DATASET].")
@click.option("--gate", default="champion", show_default=True,
              help="Model alias the new version must match or beat, and receives when it does.")
@click.option("--promote-rule", type=click.Choice(list(tracking.PROMOTE_RULES)), default="beat-baselines",
              show_default=True,
              help="beat-baselines: promote when AP is at least the champion's and not behind a baseline of the same "
                   "run; champion: at least the champion's alone.")
@click.option("--require-promotion", is_flag=True, default=False,
              help="Exit 1 when the new version is not promoted (default: exit 0 either way; read promoted=).")
@click.option("--model-name", default="paploss-retinanet", show_default=True,
              help="Registered model the pipeline writes to.")
@click.option("--package", type=click.Path(dir_okay=False), default=None,
              help="A compiled pipeline YAML; compiled afresh when omitted.")
@click.option("--image", default=None, help="Container image baked into the pipeline when compiling.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking/registry URI [env MLFLOW_TRACKING_URI].")
@click.option("--experiment", default="paploss-retrain", show_default=True, help="Kubeflow experiment.")
@click.option("--namespace", envvar="KFP_NAMESPACE", default=None,
              help="Kubeflow profile namespace [env KFP_NAMESPACE].")
@click.option("--token", envvar=["KF_PIPELINES_TOKEN", "KFP_TOKEN"], default=None,
              help="Bearer token for Kubeflow [env KF_PIPELINES_TOKEN or KFP_TOKEN].")
@click.option("--search-name", default=None, help="Tag of this search (default: retrain-<UTC time>-<random>).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=24 * 3600.0, show_default=True,
              help="Seconds to wait for the run.")
@click.option("--poll", "poll_s", type=click.FloatRange(min=0.01), default=30.0, show_default=True,
              help="Seconds between status checks.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Extra pipeline parameter (repeatable), typed as the pipeline declares it.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write the decision as JSON here (also written when the gate fails).")
def retrain(host, dataset, gate, promote_rule, require_promotion, model_name, package, image, tracking_uri, experiment, namespace, token,
            search_name, timeout_s, poll_s, params, report) -> None:
    """Submit the search pipeline, wait for it, and promote the new model to the
    GATE alias (champion) when it wins: its AP (x 100, on val) at least the
    champion's and, by --promote-rule beat-baselines, not behind a baseline
    trained in the same run.

    Prints promoted=true or promoted=false and the reason. Exit status: 0 decided
    (promoted or not; 1 when not promoted with --require-promotion), 2 bad input,
    3 infrastructure failure (unreachable host, refused credentials, failed or
    timed-out run, no new model version).
    """
    cfg = RetrainConfig(
        host=host or "",
        dataset=dataset or "",
        tracking_uri=tracking_uri or "",
        gate=gate,
        promote_rule=promote_rule,
        model_name=model_name,
        package=package,
        image=image,
        experiment=experiment,
        namespace=namespace or None,
        token=token or None,
        search_name=search_name,
        timeout_s=timeout_s,
        poll_s=poll_s,
        extra_params=_parse_params(params),
    )
    try:
        result = run_retrain(cfg)
    except click.ClickException:
        raise
    except Exception as exc:  # noqa: BLE001 - never let a crash read as exit 1 ("worse")
        raise RetrainError("unexpected error", f"{type(exc).__name__}: {exc}") from exc
    if report:
        from paploss import storage

        storage.write_json(report, result.to_json())
    if not result.promoted and require_promotion:
        raise GateFailed(f"--require-promotion: {result.reason}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(retrain())
