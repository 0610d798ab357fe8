"""Pipeline benchmarks for BENCHMARKS.md: kfp.local's overhead per task, and how
the time of one search round grows with the number of samples.

    python -m bench.pipeline_overhead overhead --tasks 6
    python -m bench.pipeline_overhead round --samples 2 4 8 --parallelism 2

``overhead``: a chain of ``--tasks`` tasks through ``kfp.local``
(``SubprocessRunner(use_venv=False)``, as ``paploss run``) whose component does
nothing (``bare``), or only imports what every real step imports
(``paploss.steps``, torch, mlflow: ``imports``); prints seconds per task.

``round``: one round of the real search pipeline (smoke-sized proxy trials on the
bundled shapes, sqlite MLflow) per sample count, in fresh work folders but with
the data and warm start prepared once; the round's time is read from kfp.local's
log, from the first trial starting to the controller update finishing.
"""


import contextlib
import io
import json
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import click
from kfp import dsl, local


@dsl.component(install_kfp_package=False, base_image="paploss:latest")
def _bare(x: int) -> int:
    return x + 1


@dsl.component(install_kfp_package=False, base_image="paploss:latest")
def _imports(x: int) -> int:
    import mlflow  # noqa: F401
    import torch  # noqa: F401

    from paploss import steps  # noqa: F401

    return x + 1


def _chain(component, n: int):
    @dsl.pipeline(name="overhead")
    def chain(x: int = 0) -> int:
        t = component(x=x)
        for _ in range(n - 1):
            t = component(x=t.output)
        return t.output

    return chain


@contextlib.contextmanager
def _quiet():
    from pipelines.run_local import _plain_print

    old = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()
    try:
        with _plain_print():
            yield sys.stdout
    finally:
        sys.stdout, sys.stderr = old


@click.group()
def cli() -> None:
    """Pipeline benchmarks (see BENCHMARKS.md, section Pipeline)."""


@cli.command()
@click.option("--tasks", default=6, show_default=True, help="Tasks in the chain.")
@click.option("--repeat", default=2, show_default=True, help="Chains per kind, alternating kinds.")
def overhead(tasks: int, repeat: int) -> None:
    """Seconds per kfp.local task: bare, and with a real step's imports."""
    with tempfile.TemporaryDirectory() as tmp:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=tmp, enable_caching=False)
        results: dict[str, list[float]] = {"bare": [], "imports": []}
        for _ in range(repeat):
            for kind, comp in (("bare", _bare), ("imports", _imports)):
                pipe = _chain(comp, tasks)
                with _quiet():
                    t0 = time.monotonic()
                    assert pipe(x=0).output == tasks
                    results[kind].append((time.monotonic() - t0) / tasks)
    for kind, values in results.items():
        click.echo(f"{kind:8s} s/task: " + ", ".join(f"{v:.2f}" for v in values) + f"  (min {min(values):.2f})")


def _stamp(line: str) -> float:
    return datetime.strptime(line[:12], "%H:%M:%S.%f").timestamp()


@cli.command("round")
@click.option("--samples", "samples_list", type=int, multiple=True, default=(2, 4, 8), show_default=True)
@click.option("--parallelism", default=2, show_default=True)
def round_(samples_list: tuple[int, ...], parallelism: int) -> None:
    """Wall time of one round (smoke-sized trials) against samples per round."""
    from paploss.search_cli import settings_from_options
    from pipelines.run_local import run_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s_ in samples_list:
            name = f"bench-s{s_}"
            s = settings_from_options(
                preset="smoke", dataset=None, work=f"{tmp}/work", search_name=name, rounds=1, samples=s_,
                parallelism=parallelism, max_failed_trials=s_, attempts=None, seed=None, detector=None,
                proxy_epochs=0.0, final_epochs=0.0, proxy_json=None, final_json=None, controller_json=None,
                tracking_uri=f"sqlite:///{tmp}/mlflow.db", experiment="bench", model_name="bench-model",
                promote=False,
            )
            t0 = time.monotonic()
            run_pipeline(s, root=f"{tmp}/runs", cache=False, console=None)
            total = time.monotonic() - t0
            text = re.sub(r"\x1b\[[0-9;]*m", "", (Path(tmp) / "runs" / "logs" / f"{name}.log").read_text())
            lines = text.splitlines()
            start = next(_stamp(ln) for ln in lines if "Executing task 'proxy-trial" in ln)
            end = next(_stamp(ln) for ln in lines if "Task 'controller-update' finished" in ln)
            trials = [json.loads(p.read_text()) for p in (Path(tmp) / "work" / "searches" / name / "trials").glob("*.json")]
            train = sum(t["seconds"] for t in trials)
            rows.append((s_, end - start, train, total))
            click.echo(f"samples {s_}: round {end - start:.1f} s (trials' own training {train:.1f} s summed), "
                       f"whole run {total:.1f} s", err=True)
    click.echo(f"| samples | parallelism | round wall (s) | per sample (s) | trials' training, summed (s) |")
    click.echo("|---|---|---|---|---|")
    for s_, rnd, train, _ in rows:
        click.echo(f"| {s_} | {parallelism} | {rnd:.1f} | {rnd / s_:.1f} | {train:.1f} |")


if __name__ == "__main__":
    cli()
