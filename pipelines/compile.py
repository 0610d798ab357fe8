"""``paploss compile``: the search pipeline as Kubeflow Pipelines YAML.

``compile_pipeline(package_path, image=None)`` writes the YAML atomically (a
temporary file in the same folder, then renamed) and returns its path; the
containers engineer's ``paploss retrain`` and ``make compile`` use it.

The compiled spec is then compacted (:mod:`pipelines.compact`): kfp copies a
component definition at each use, so every round would carry its own copy; one copy
of each distinct definition is kept (the paper preset: ~600 KB -> ~110 KB), which
keeps the workflow object a Kubeflow backend makes of it well under the API
server's size limit. ``compact=False`` (``--no-compact``) writes kfp's output as is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from paploss.errors import check_writable
from paploss.presets import PRESETS, get_preset

__all__ = ["compile_pipeline", "compile_cmd"]


def compile_pipeline(
    package_path: str,
    image: str | None = None,
    preset: str = "quick",
    rounds: int | None = None,
    parallelism: int | None = None,
    cluster=None,
    select_top: int | None = None,
    compact: bool = True,
) -> str:
    """Compile the search pipeline (``rounds``, ``parallelism`` and ``select_top``:
    compile-time, default the preset's) with its components in ``image``; with ``compact``,
    merge identical component definitions (:func:`pipelines.compact.compact`); write it
    atomically to ``package_path``; return the path."""
    from kfp import compiler

    from pipelines.search_pipeline import build_pipeline

    pipeline = build_pipeline(rounds=rounds, parallelism=parallelism, image=image, preset=get_preset(preset),
                              cluster=cluster, select_top=select_top)
    path = Path(package_path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"package_path={package_path!r} must end in .yaml, .yml or .json")
    check_writable(path, "--out", folder=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline, package_path=tmp)
        if compact:
            from pipelines.compact import compact_file

            compact_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(path)


@click.command("compile")
@click.option("--out", "out", default="build/search_pipeline.yaml", show_default=True, help="The YAML to write.")
@click.option("--image", default=None, help="Container image of the components [env PAPLOSS_IMAGE or paploss:latest].")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="quick", show_default=True,
              help="Default parameter values, rounds and parallelism.")
@click.option("--rounds", type=int, default=None, help="PPO rounds (compile-time) [preset].")
@click.option("--parallelism", type=int, default=None, help="Trials at a time (compile-time) [preset].")
@click.option("--select-top", type=int, default=None,
              help="Selection stage after the last round: the N best sampled losses trained again with the run-time "
                   "parameter select_seeds, the best mean becomes the searched loss (compile-time; 0: off) [preset: 0].")
@click.option("--accelerator", default="nvidia.com/gpu", show_default=True,
              help="Accelerator type of trials and final trainings.")
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs per training task (0: none).")
@click.option("--cpu", default="4", show_default=True, help="CPU request per training task.")
@click.option("--memory", default="16G", show_default=True, help="Memory request per training task.")
@click.option("--retries", type=int, default=2, show_default=True, help="KFP retries of a training task.")
@click.option("--s3-endpoint", default="", help="AWS_ENDPOINT_URL of every task (MinIO etc.).")
@click.option("--pvc", default="", help="A PersistentVolumeClaim mounted at /data as the dataset cache.")
@click.option("--trials-per-gpu", type=int, default=1, show_default=True,
              help="Proxy trials sharing one GPU under CUDA MPS (each requests one of the GPU's shares, cpu/k, "
                   "memory/k; the cluster's device plugin must advertise each GPU k times: docs/deployment.md).")
@click.option("--trial-accelerator", default="",
              help="The resource a packed proxy trial requests, e.g. nvidia.com/gpu.shared where the device plugin "
                   "advertises MPS shares under their own name [--accelerator].")
@click.option("--final-nodes", type=int, default=1, show_default=True,
              help="Nodes of each final training; with more than one GPU in all, a final is a Kubeflow Trainer "
                   "TrainJob (torchrun, DDP) that its task waits for.")
@click.option("--final-gpus-per-node", type=int, default=1, show_default=True, help="GPUs per node of a final.")
@click.option("--max-gpus", type=int, default=0, show_default=True,
              help="Cap on the GPUs the final trainings hold at once (finals beside each other x GPUs per final; "
                   "0: no cap).")
@click.option("--trainjob-runtime", default="torch-distributed", show_default=True,
              help="The ClusterTrainingRuntime of the finals' TrainJobs.")
@click.option("--service-account", default="", help="Service account of the TrainJobs' pods [namespace default].")
@click.option("--compact/--no-compact", default=True, show_default=True,
              help="Keep one copy of each distinct component definition (kfp writes one per use, e.g. per round).")
def compile_cmd(out, image, preset, rounds, parallelism, select_top, accelerator, gpus, cpu, memory, retries,
                s3_endpoint, pvc, trials_per_gpu, trial_accelerator, final_nodes, final_gpus_per_node, max_gpus, trainjob_runtime,
                service_account, compact):
    """Compile the search pipeline to Kubeflow Pipelines YAML (submit it with
    `paploss submit`). Rounds and parallelism are fixed here; everything else is a
    run-time parameter."""
    from pipelines.search_pipeline import ClusterOptions

    try:
        cluster = ClusterOptions(accelerator=accelerator, gpus=gpus, cpu=cpu, memory=memory, retries=retries,
                                 s3_endpoint=s3_endpoint, pvc=pvc, trials_per_gpu=trials_per_gpu, trial_accelerator=trial_accelerator,
                                 final_nodes=final_nodes, final_gpus_per_node=final_gpus_per_node, max_gpus=max_gpus,
                                 trainjob_runtime=trainjob_runtime, service_account=service_account)
        path = compile_pipeline(out, image=image, preset=preset, rounds=rounds, parallelism=parallelism,
                                cluster=cluster, select_top=select_top, compact=compact)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"wrote {path}")
