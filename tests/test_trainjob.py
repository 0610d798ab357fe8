"""Final trainings as Kubeflow Trainer TrainJobs (pipelines/trainjob.py, `paploss train --trainjob`).

- the manifest is a valid ``trainer.kubeflow.org/v1alpha1`` TrainJob: it survives a
  round trip through the kubeflow-trainer-api models unchanged (a field the models do
  not know would be dropped), with the runtime, torchrun command, resources, S3 and
  MLflow secret references, service account and labels where the API reads them;
- ``--dry-run`` prints it as YAML and contacts nothing;
- against a loopback fake of the Kubernetes API (tests/_k8s.py): submit and wait
  succeeds; a failed job, a missing Trainer, refused credentials and an unreachable
  API each end in one line and a non-zero exit; a retry attaches to the job of the same
  name instead of creating a second, and replaces one that failed.
"""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from paploss.cli import main
from paploss.engine_cli import train as train_command
from pipelines.trainjob import (
    FinalResources, KubeClient, TrainJobError, TrainJobOptions, build_trainjob, check_remote_args, forward_args,
    job_state, run_final_trainjob, submit_and_wait, train_args_from_options, trainjob_name,
)
from tests._k8s import FakeKube, status_for
from tests._servers import s3_server  # noqa: F401 - fixture

models = pytest.importorskip("kubeflow_trainer_api.models", reason="kubeflow-trainer-api is in the dev extra")

ARGS = ["--data", "s3://datasets/coco", "--out", "s3://paploss/work/s/final/searched", "--preset", "paper",
        "--loss", "paploss", "--spec", "s3://paploss/work/s/spec.json", "--epochs", "12", "--quiet"]
FULL = dict(name="paploss-coco-0123456789", image="registry.example.org/paploss-cuda:abc", nodes=2, gpus_per_node=8,
            namespace="team-a", s3_secret="paploss-s3", s3_endpoint="http://minio.minio.svc:9000",
            mlflow_secret="mlflow-auth", tracking_uri="http://mlflow.mlflow.svc:5000", service_account="paploss-runner",
            search_name="coco-paper", run_id="5b1c3f4e-0d6a-4d1e-9a55-7b0a1f2e3c4d",
            node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


def load(manifest: dict):
    """The manifest as the kubeflow-trainer-api model; fails if any field is unknown to it."""
    job = models.TrainerV1alpha1TrainJob.from_dict(manifest)
    assert job.to_dict() == manifest, "a field the TrainJob models do not know was dropped"
    return job


# ------------------------------------------------------------------ the manifest


def test_manifest_is_a_valid_trainjob_with_secrets_service_account_and_runtime():
    manifest = build_trainjob(ARGS, TrainJobOptions(**FULL))
    job = load(manifest)
    assert job.api_version == "trainer.kubeflow.org/v1alpha1" and job.kind == "TrainJob"
    assert job.metadata.name == FULL["name"] and job.metadata.namespace == "team-a"
    assert job.metadata.labels["paploss/search-name"] == "coco-paper"
    assert job.metadata.labels["paploss/kfp-run-id"] == FULL["run_id"]
    ref = job.spec.runtime_ref
    assert (ref.api_group, ref.kind, ref.name) == ("trainer.kubeflow.org", "ClusterTrainingRuntime",
                                                   "torch-distributed")
    t = job.spec.trainer
    assert t.image == FULL["image"] and t.num_nodes == 2 and t.num_proc_per_node == 8
    assert t.command == ["torchrun", "--no-python", "paploss", "train"] and t.args == ARGS
    assert t.resources_per_node.to_dict()["limits"] == {"nvidia.com/gpu": "8"}
    assert t.resources_per_node.to_dict()["requests"] == {"cpu": "32", "memory": "128Gi"}
    env = {e.name: e for e in t.env}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[key].value_from.secret_key_ref
        assert (ref.name, ref.key, ref.optional) == ("paploss-s3", key, True)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        ref = env[key].value_from.secret_key_ref
        assert (ref.name, ref.key, ref.optional) == ("mlflow-auth", key, True)
    assert env["AWS_ENDPOINT_URL"].value == FULL["s3_endpoint"]
    assert env["MLFLOW_TRACKING_URI"].value == FULL["tracking_uri"]
    (patch,) = job.spec.runtime_patches
    (node,) = patch.training_runtime_spec.template.spec.replicated_jobs
    pod = node.template.spec.template.spec
    assert node.name == "node" and pod.service_account_name == "paploss-runner"
    assert pod.node_selector == FULL["node_selector"] and pod.tolerations[0].key == "nvidia.com/gpu"
    assert pod.volumes[0].empty_dir.medium == "Memory"
    assert pod.containers[0].name == "node" and pod.containers[0].volume_mounts[0].mount_path == "/dev/shm"


def test_the_job_command_is_a_valid_paploss_train_command_line():
    t = build_trainjob(ARGS, TrainJobOptions(**FULL))["spec"]["trainer"]
    assert t["command"][:3] == ["torchrun", "--no-python", "paploss"]
    ctx = train_command.make_context("train", t["command"][4:] + t["args"])
    assert ctx.params["data"] == "s3://datasets/coco" and ctx.params["epochs"] == 12.0 and ctx.params["quiet"]
    assert not ctx.params["trainjob"]  # the job trains; it does not submit another job


def test_the_round_trip_check_is_strict():
    manifest = build_trainjob(ARGS, TrainJobOptions(**FULL))
    manifest["spec"]["trainer"]["numNode"] = 2  # misspelt
    with pytest.raises(AssertionError, match="do not know"):
        load(manifest)


def test_cpu_nodes_and_minimal_options():
    manifest = build_trainjob(ARGS, TrainJobOptions(name="p-1", image="i", nodes=2, gpus_per_node=0, shm="",
                                                    s3_secret=""))
    load(manifest)
    t = manifest["spec"]["trainer"]
    assert t["numProcPerNode"] == 1 and "limits" not in t["resourcesPerNode"]
    assert [e["name"] for e in t["env"]] == ["PYTHONUNBUFFERED"]
    assert "runtimePatches" not in manifest["spec"] and "namespace" not in manifest["metadata"]


@pytest.mark.parametrize("change, message", [
    ({"name": "Final_Train"}, "must be a DNS label"),
    ({"name": "x" * 64}, "must be a DNS label"),
    ({"nodes": 0}, "nodes=0 is out of range"),
    ({"gpus_per_node": -1}, "gpus_per_node=-1 is out of range"),
    ({"image": ""}, "no image"),
])
def test_bad_options_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        TrainJobOptions(**{**FULL, **change})


@pytest.mark.parametrize("args, message", [
    (["--out", "s3://o"], "needs --data"),
    (["--data", "s3://d"], "needs --out"),
    (["--data", "/home/me/coco", "--out", "s3://o"], "--data '/home/me/coco' is not an s3:// URI"),
    (["--data", "s3://d", "--out=runs/x"], "--out 'runs/x' is not an s3:// URI"),
    (["--data", "s3://d", "--out", "s3://o", "--init", "backbone.pt"], "--init 'backbone.pt'"),
])
def test_every_node_must_reach_data_and_outputs(args, message):
    with pytest.raises(ValueError, match=message):
        check_remote_args(args)


def test_names_are_stable_distinct_and_valid():
    a = trainjob_name("paploss-coco-paper-searched", "run-1", ARGS)
    assert a == trainjob_name("paploss-coco-paper-searched", "run-1", ARGS)
    assert a != trainjob_name("paploss-coco-paper-searched", "run-2", ARGS)
    for prefix in ("paploss-" + "Very_Long Search Name" * 5, "7up", "--"):
        name = trainjob_name(prefix, 1)
        TrainJobOptions(name=name, image="i")  # a DNS label
        assert len(name) <= 40


def test_forwarded_options_parse_back_to_the_same_values():
    argv = ["--data", "s3://d", "--out", "s3://o", "--form", "square", "--detach-i3", "--iterations", "300",
            "--lr", "0.02", "--no-resume", "--nodes", "2", "--trainjob", "--image", "i"]
    ctx = train_command.make_context("train", list(argv))
    from click.core import ParameterSource

    given = {n for n in ctx.params if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}
    args = forward_args(train_command, ctx.params, given, exclude=("nodes", "trainjob", "image"))
    assert "--nodes" not in args and "--trainjob" not in args and "--image" not in args
    back = train_command.make_context("train", list(args)).params
    for name in given - {"nodes", "trainjob", "image"}:
        assert back[name] == ctx.params[name], name


def test_train_args_from_training_options():
    args = train_args_from_options({"data": "s3://d", "out_dir": "s3://o", "preset": "paper", "iterations": 90000,
                                    "num_threads": 4, "resume": False, "detach_i3": True})
    params = train_command.make_context("train", args).params
    assert params["out_dir"] == "s3://o" and params["threads"] == 4 and params["no_resume"] and params["detach_i3"]
    unset = train_args_from_options({"data": "s3://d", "epochs": None, "iterations": 5, "detach_i3": False})
    assert unset == ["--data", "s3://d", "--iterations", "5"]  # None and False flags are left out
    # fields without a flag of their own travel in --config, so every option reaches the job
    extra = train_args_from_options({"data": "s3://d", "fpn_channels": 32, "lr_steps": [0.5, 0.9]})
    assert extra == ["--data", "s3://d", "--config", '{"fpn_channels": 32, "lr_steps": [0.5, 0.9]}']
    assert train_command.make_context("train", extra).params["config_json"] == '{"fpn_channels": 32, "lr_steps": [0.5, 0.9]}'


def test_final_resources():
    r = FinalResources(nodes=2, gpus_per_node=8, max_gpus=32)
    assert r.gpus == 16 and r.distributed and r.at_once(3) == 2
    assert FinalResources().at_once(3) == 3 and not FinalResources().distributed
    assert FinalResources(nodes=1, gpus_per_node=4, max_gpus=4).at_once(3) == 1
    assert FinalResources(nodes=2, gpus_per_node=0).distributed  # two CPU nodes still need a TrainJob
    with pytest.raises(ValueError, match="below the GPUs of one final"):
        FinalResources(nodes=2, gpus_per_node=8, max_gpus=8)


@pytest.mark.parametrize("step, state", [("created", "Created"), ("running", "Running"), ("suspended", "Suspended"),
                                         ("complete", "Complete"), ("failed", "Failed")])
def test_fake_statuses_are_trainer_statuses(step, state):
    status = status_for(step)
    parsed = models.TrainerV1alpha1TrainJobStatus.from_dict(status)
    assert parsed.model_dump(mode="json", by_alias=True, exclude_none=True) == status
    got, detail = job_state({"status": status})
    assert got == state
    if step == "failed":
        assert detail == "FailedJobs: jobset failed: node-0 exited 1 (OOMKilled on rank 3)"  # one line


# ------------------------------------------------------------------ against a fake Kubernetes API


@pytest.fixture()
def kube():
    fake = FakeKube()
    yield fake
    fake.close()


def params(args: list[str]) -> dict:
    return train_command.make_context("train", list(args)).params


def invoke(kube, *extra, env=None):
    args = ["train", *ARGS, "--nodes", "2", "--gpus-per-node", "8", "--trainjob", "--image", "reg/p:1",
            "--namespace", "team-a", "--k8s-api", kube.url, *extra]
    return CliRunner().invoke(main, args, env={"PAPLOSS_TRAINJOB_POLL": "0.01", **(env or {})})


def test_dry_run_prints_the_manifest_and_contacts_nothing(kube):
    result = invoke(kube, "--dry-run", "--service-account", "paploss-runner")
    assert result.exit_code == 0, result.output
    manifest = yaml.safe_load(result.output)
    job = load(manifest)
    assert job.spec.trainer.num_nodes == 2
    # the same training options as given (as click parsed them: "--epochs 12" comes back as "12.0")
    assert params(job.spec.trainer.args) == params(ARGS)
    assert job.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0] \
        .template.spec.template.spec.service_account_name == "paploss-runner"
    assert kube.requests == []


@pytest.fixture()
def bucket(s3_server, monkeypatch):
    """The ``paploss`` bucket of a loopback S3 server, its credentials in the environment."""
    import uuid

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    name = f"paploss-{uuid.uuid4().hex[:8]}"
    s3_server.make_bucket(name)
    return name


def test_submit_and_wait_succeeds_and_prints_what_rank_0_wrote(kube, bucket, s3_server):
    from paploss import storage

    args = [a.replace("s3://paploss/", f"s3://{bucket}/") for a in ARGS]
    out = args[args.index("--out") + 1]
    # what rank 0 of the job writes when it finishes (paploss.engine)
    storage.write_json(f"{out}/metrics.json", {"metrics": {"AP": 0.3125}, "diverged": False, "iterations": 90000,
                                               "seconds": 3600.0, "config": {"lr": 0.02}})
    kube.script = ["created", "running", "running", "complete"]
    result = CliRunner().invoke(main, ["train", *args, "--nodes", "2", "--gpus-per-node", "8", "--trainjob",
                                       "--image", "reg/p:1", "--namespace", "team-a", "--k8s-api", kube.url],
                                env={"PAPLOSS_TRAINJOB_POLL": "0.01", "MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "created on runtime torch-distributed (2 nodes x 8 processes)" in lines[0]
    assert any(": Running (2 active, 2 ready)" in line for line in lines)
    assert ": Complete" in lines[-2]
    done = json.loads(lines[-1])
    assert done["metrics"] == {"AP": 0.3125} and done["iterations"] == 90000 and "config" not in done
    assert done["checkpoint"] == f"{out}/checkpoint.pt" and done["trainjob"].startswith("paploss-train-")
    assert len(kube.calls("POST")) == 1
    (posted,) = [b for m, _, b in kube.requests if m == "POST"]
    job = load(posted)
    env = {e.name: e.value for e in job.spec.trainer.env}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["AWS_ENDPOINT_URL"] == s3_server.endpoint


def test_a_complete_job_without_metrics_ends_in_one_line(kube, bucket):
    args = [a.replace("s3://paploss/", f"s3://{bucket}/") for a in ARGS]
    result = CliRunner().invoke(main, ["train", *args, "--trainjob", "--image", "i", "--namespace", "team-a",
                                       "--k8s-api", kube.url], env={"PAPLOSS_TRAINJOB_POLL": "0.01"})
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "completed, but s3://" in errors[0] and "metrics.json cannot be read" in errors[0]


def test_a_failed_job_ends_in_one_line(kube):
    kube.script = ["running", "failed"]
    result = invoke(kube)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].startswith("Error: TrainJob team-a/paploss-train-")
    assert "failed: FailedJobs: jobset failed: node-0 exited 1 (OOMKilled on rank 3)" in errors[0]
    assert "kubectl -n team-a logs -l jobset.sigs.k8s.io/jobset-name=" in errors[0]


def test_missing_trainer_ends_in_one_line():
    kube = FakeKube(installed=False)
    try:
        result = invoke(kube)
    finally:
        kube.close()
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert line.startswith("Error: Kubeflow Trainer is not installed on the cluster "
                           "(no trainjobs.trainer.kubeflow.org): GET /apis/trainer.kubeflow.org/v1alpha1 answered 404")
    assert kube.calls("POST") == []


def test_refused_credentials_and_unreachable_api_end_in_one_line(tmp_path):
    kube = FakeKube(token="secret")
    try:
        result = invoke(kube)
    finally:
        kube.close()
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert "refused" in line and "403" in line and "Role in docs/deployment.md" in line
    dead = FakeKube()
    url = dead.url
    dead.close()
    result = CliRunner().invoke(main, ["train", *ARGS, "--trainjob", "--image", "i", "--namespace", "n",
                                       "--k8s-api", url])
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert line.startswith(f"Error: cannot reach the Kubernetes API at {url}")


def _manifest(name="paploss-s-1234567890"):
    return run_final_trainjob(ARGS, nodes=2, gpus_per_node=8, image="reg/p:1", name=name, namespace="team-a",
                              dry_run=True)


@pytest.mark.parametrize("step", ["running", "suspended", "complete"])
def test_a_retry_attaches_to_the_existing_job(kube, step):
    manifest = _manifest()
    kube.put_job(manifest, "team-a", step)
    lines: list[str] = []
    job = run_final_trainjob(ARGS, nodes=2, gpus_per_node=8, image="reg/p:1", name=manifest["metadata"]["name"],
                             namespace="team-a", k8s_api=kube.url, poll=0.01, echo=lines.append)
    assert job_state(job)[0] == "Complete"
    assert kube.calls("POST") == [] and kube.calls("DELETE") == []
    assert "attaching to it" in lines[0]


def test_a_retry_replaces_a_failed_job(kube):
    manifest = _manifest()
    kube.put_job(manifest, "team-a", "failed")
    lines: list[str] = []
    job = run_final_trainjob(ARGS, nodes=2, gpus_per_node=8, image="reg/p:1", name=manifest["metadata"]["name"],
                             namespace="team-a", k8s_api=kube.url, poll=0.01, echo=lines.append)
    assert job_state(job)[0] == "Complete"
    assert len(kube.calls("DELETE")) == 1 and len(kube.calls("POST")) == 1
    assert "earlier attempt failed" in lines[0] and "resumes from its last checkpoint" in lines[0]


def test_a_job_of_that_name_with_another_spec_is_not_taken_over(kube):
    kube.put_job(_manifest(), "team-a", "running")
    other = run_final_trainjob(ARGS[:-1], nodes=2, gpus_per_node=8, image="reg/p:1", name="paploss-s-1234567890",
                               namespace="team-a", dry_run=True)
    with pytest.raises(TrainJobError, match="exists with another spec"):
        submit_and_wait(KubeClient(api=kube.url), other, "team-a", poll=0.01, echo=lambda _: None)
    assert kube.calls("POST") == []


def test_timeout_names_the_job_and_how_to_stop_it(kube):
    kube.script = ["running"]
    with pytest.raises(TrainJobError, match=r"did not finish in 0 s \(still Created\).*delete trainjob"):
        submit_and_wait(KubeClient(api=kube.url), _manifest(), "team-a", poll=0.01, timeout=0.0, echo=lambda _: None)


# ------------------------------------------------------------------ one machine: unchanged


def test_without_trainjob_the_options_are_refused_or_ignored():
    result = CliRunner().invoke(main, ["train", "--data", "d", "--nodes", "2", "--gpus-per-node", "8"])
    assert result.exit_code == 2 and "needs --trainjob" in result.output
    result = CliRunner().invoke(main, ["train", "--data", "d", "--dry-run"])
    assert result.exit_code == 2 and "add --trainjob" in result.output
    # one GPU, no --trainjob: the local training path (it refuses a bad option the same way as before)
    result = CliRunner().invoke(main, ["train", "--data", "d", "--form", "square", "--loss", "focal+l1"])
    assert result.exit_code == 2 and "--form needs --loss paploss" in result.output


def test_the_library_does_not_import_the_pipelines_and_a_dry_run_not_kfp():
    import subprocess
    import sys

    code = ("import sys; import paploss.engine_cli; assert 'pipelines' not in sys.modules, 'pipelines imported'\n"
            "from click.testing import CliRunner; from paploss.cli import main\n"
            "r = CliRunner().invoke(main, ['train', '--data', 's3://a', '--out', 's3://b', '--trainjob', '--dry-run',"
            " '--image', 'i'])\n"
            "assert r.exit_code == 0, r.output; assert 'kfp' not in sys.modules and 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_worked_example_in_the_docs_is_what_the_code_builds():
    """docs/deployment.md's COCO 2 x 8 TrainJob: rebuilt from its own arguments, equal."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "deployment.md").read_text()
    block = text[text.index("## 6. Worked example"):].split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = yaml.safe_load(block)
    load(shown)
    t, meta = shown["spec"]["trainer"], shown["metadata"]
    env = {e["name"]: e for e in t["env"]}
    pod = shown["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    rebuilt = run_final_trainjob(
        t["args"], nodes=t["numNodes"], gpus_per_node=t["numProcPerNode"], image=t["image"],
        namespace=meta["namespace"], search_name=meta["labels"]["paploss/search-name"], task="searched",
        run_id=meta["labels"]["paploss/kfp-run-id"], service_account=pod["serviceAccountName"],
        mlflow_secret=env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["name"],
        tracking_uri=env["MLFLOW_TRACKING_URI"]["value"], s3_endpoint=env["AWS_ENDPOINT_URL"]["value"], dry_run=True)
    assert rebuilt == shown
    assert meta["name"].startswith("paploss-coco-paper-searched-")
