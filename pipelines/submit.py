"""``paploss submit``: send the compiled search pipeline to a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import click

__all__ = ["submit"]


def _params(pairs: tuple[str, ...]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--param")
        try:
            out[key] = json.loads(value)  # numbers, booleans, JSON objects
        except json.JSONDecodeError:
            out[key] = value  # plain strings
    return out


@click.command("submit")
@click.option("--host", envvar="KFP_HOST", required=True, help="Kubeflow Pipelines endpoint [env KFP_HOST].")
@click.option("--package", default="build/search_pipeline.yaml", show_default=True,
              help="Compiled pipeline (make compile).")
@click.option("--experiment", default="paploss", show_default=True, help="Kubeflow experiment.")
@click.option("--run-name", default=None, help="Run name; also the search_name parameter [paploss-<time>].")
@click.option("--dataset", default=None, help="dataset parameter: bundled:<name> or s3:// prefix.")
@click.option("--work", default=None, help="work parameter: s3:// prefix for outputs.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="tracking_uri parameter: the MLflow server the tasks log to [env MLFLOW_TRACKING_URI].")
@click.option("--param", "pairs", multiple=True, metavar="NAME=VALUE",
              help="Any other pipeline parameter (JSON values allowed); repeatable.")
@click.option("--namespace", default=None, help="Kubeflow profile namespace.")
@click.option("--token", envvar="KFP_TOKEN", default=None, help="Bearer token [env KFP_TOKEN].")
@click.option("--wait/--no-wait", default=False, show_default=True, help="Follow the run to its end.")
@click.option("--timeout", "timeout_s", type=float, default=24 * 3600, show_default=True,
              help="Seconds --wait waits.")
def submit(host, package, experiment, run_name, dataset, work, tracking_uri, pairs, namespace, token, wait,
           timeout_s):
    """Submit the compiled search pipeline; prints the run's URL (and with --wait
    its final state; exit 1 unless it succeeded)."""
    from pipelines import kfp_remote

    if not Path(package).is_file():
        raise click.UsageError(f"--package {package} does not exist: run `make compile` first")
    run_name = run_name or f"paploss-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    params = {"search_name": run_name, **_params(pairs)}
    for key, value in (("dataset", dataset), ("work", work), ("tracking_uri", tracking_uri)):
        if value is not None:
            params[key] = value
    try:
        client = kfp_remote.connect(host, namespace=namespace, existing_token=token)
        run_id = kfp_remote.submit_package(client, package, params, experiment=experiment, run_name=run_name)
    except (kfp_remote.KfpError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    url = kfp_remote.run_url(host, run_id)
    click.echo(f"submitted {run_name}: run {run_id}\n  {url}")
    if wait:
        try:
            state = kfp_remote.wait_for_run(client, run_id, timeout_s=timeout_s)
        except (TimeoutError, kfp_remote.KfpError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"run {run_id}: {state}")
        if state != "SUCCEEDED":
            raise SystemExit(1)
