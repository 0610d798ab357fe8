"""The compiled pipeline on a cluster past one GPU: finals as Kubeflow Trainer TrainJobs,
a cap on the GPUs the finals hold, proxy trials packed several per GPU."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from click.testing import CliRunner

from paploss import presets, steps
from paploss.cli import main
from tests._servers import s3_server  # noqa: F401 - fixture

models = pytest.importorskip("kubeflow_trainer_api.models")


def _compile(tmp_path, *args: str) -> tuple[dict, dict]:
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(main, ["compile", "--out", str(out), "--preset", "smoke", "--image", "reg/paploss:1",
                                       *args])
    assert result.exit_code == 0, result.output
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform


def _executor(spec: dict, name: str) -> dict:
    (ex,) = [e for k, e in spec["deploymentSpec"]["executors"].items() if k.startswith(f"exec-{name}")]
    return ex["container"]


def _final_task(spec: dict) -> dict:
    (task,) = [t for c in spec["components"].values() for k, t in c.get("dag", {}).get("tasks", {}).items()
               if k == "final-train"]
    return task


def test_finals_on_2_nodes_x_8_gpus_wait_for_trainjobs_under_the_gpu_cap(tmp_path):
    spec, _ = _compile(tmp_path, "--final-nodes", "2", "--final-gpus-per-node", "8", "--max-gpus", "16",
                       "--trials-per-gpu", "4", "--trial-accelerator", "nvidia.com/gpu.shared", "--cpu", "8",
                       "--memory", "32G")
    final = _executor(spec, "final-train")
    assert "accelerator" not in final["resources"]  # the task waits; the TrainJob holds the GPUs
    placement = _final_task(spec)["inputs"]["parameters"]["placement"]["runtimeValue"]["constant"]
    assert placement == {"nodes": 2, "gpus_per_node": 8, "image": "reg/paploss:1", "runtime": "torch-distributed",
                         "service_account": ""}
    comps = spec["components"]
    final_loops = {n for n, c in comps.items() if "final-train" in c.get("dag", {}).get("tasks", {})}
    (loop,) = [t for c in comps.values() for t in c.get("dag", {}).get("tasks", {}).values()
               if t["componentRef"]["name"] in final_loops]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 1  # a 16-GPU cap, 16 GPUs a final: one at a time
    trial = _executor(spec, "proxy-trial")
    assert {"name": "PAPLOSS_TRIALS_PER_GPU", "value": "4"} in trial["env"]
    trial = trial["resources"]
    assert trial["accelerator"]["resourceType"] == "nvidia.com/gpu.shared" and trial["accelerator"]["resourceCount"] == "1"
    assert trial["resourceCpuRequest"] == "2000m" and trial["resourceMemoryRequest"] == "7629Mi"  # 8 CPUs, 32G / 4


def test_one_gpu_finals_train_in_their_task_and_bad_sizes_are_refused(tmp_path):
    spec, _ = _compile(tmp_path)
    assert _executor(spec, "final-train")["resources"]["accelerator"]["resourceCount"] == "1"
    for args, message in ((["--max-gpus", "4", "--final-gpus-per-node", "8"], "max_gpus=4 is below"),
                          (["--trials-per-gpu", "32"], "at most 7 trials per GPU")):
        result = CliRunner().invoke(main, ["compile", "--out", str(tmp_path / "x.yaml"), *args])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.fixture()
def bucket(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    name = f"paploss-{uuid.uuid4().hex[:8]}"
    s3_server.make_bucket(name)
    return name


def test_each_final_of_the_compiled_pipeline_creates_a_valid_trainjob(tmp_path, bucket):
    """The final-train task's own code path (steps.final_train with the trainer the task
    builds from its compiled placement), dry-run: one valid TrainJob per final loss."""
    from pipelines.search_pipeline import FINAL_LOSSES
    from pipelines.trainjob import final_trainer

    spec, _ = _compile(tmp_path, "--final-nodes", "2", "--final-gpus-per-node", "8")
    placement = _final_task(spec)["inputs"]["parameters"]["placement"]["runtimeValue"]["constant"]
    work, data, init = f"s3://{bucket}/work", f"s3://{bucket}/data", f"s3://{bucket}/warm/backbone.pt"
    state = steps.init_search(work, "coco", rounds=1, samples=2, seed=0)["state"]
    final = steps.train_options(presets.get_preset("paper").final)
    jobs = {}
    for loss in FINAL_LOSSES:
        trainer = final_trainer(placement, search_name="coco", task=loss, run_id="run-1", s3_secret="s3-keys",
                                mlflow_secret="mlflow-auth", dry_run=True, echo=None)
        seen = []
        spec = steps.start_spec(work, "coco") if loss == steps.START else ""  # as the final-train task does
        result = json.loads(steps.final_train(data, init, loss, steps.loss_options(final, loss), work, "coco",
                                              state=state if loss == "searched" else "", spec=spec,
                                              trainer=lambda o, t=trainer: seen.append(t(o)) or seen[-1]))
        assert result["loss"] == loss and result["checkpoint"] == ""
        jobs[loss] = seen[0]["trainjob"]
    assert len({j["metadata"]["name"] for j in jobs.values()}) == len(FINAL_LOSSES)
    for loss, manifest in jobs.items():
        job = models.TrainerV1alpha1TrainJob.from_dict(manifest)
        assert job.to_dict() == manifest  # nothing the Trainer's models do not know
        trainer = manifest["spec"]["trainer"]
        assert trainer["numNodes"] == 2 and trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
        args = trainer["args"]
        assert args[args.index("--data") + 1] == data and args[args.index("--init") + 1] == init
        assert args[args.index("--out") + 1] == f"{work}/searches/coco/final/{loss}"
        assert ("--spec" in args) == (loss in ("searched", steps.START))
        env = {e["name"]: e for e in trainer["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-keys"
