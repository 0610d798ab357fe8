"""The search pipeline end to end: compiled YAML, bad input, in-process and
kfp.local runs at a tiny size against real MLflow stores and a real S3 server."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from google.protobuf import json_format

from paploss import steps, storage
from paploss.cli import main
from tests._servers import free_port, mlflow_server, s3_server  # noqa: F401 - fixtures

ROUNDS, SAMPLES = 2, 2


# ----------------------------------------------------------------------------- compiled YAML


def _walk(node, key):
    """Every value under ``key`` anywhere in a nested dict/list."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def test_compiled_yaml_is_a_pipeline_spec_with_cluster_settings(tmp_path):
    from kfp.pipeline_spec import pipeline_spec_pb2

    out = tmp_path / "build" / "search_pipeline.yaml"
    result = CliRunner().invoke(main, ["compile", "--out", str(out), "--image", "registry.example/paploss:1.2",
                                       "--preset", "smoke", "--parallelism", "3", "--retries", "4",
                                       "--pvc", "datasets"])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(out.read_text()))
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    assert spec.pipeline_info.name == "paploss-search"
    params = spec.root.input_definitions.parameters
    for name in ("dataset", "search_name", "model_name", "promote", "samples", "max_failed_trials",
                 "node_selector", "tolerations", "s3_secret", "tracking_uri", "experiment", "select_rank"):
        assert name in params, name
    assert params["select_rank"].default_value.string_value == "reward"
    assert params["model_name"].default_value.string_value == "paploss-retinanet"
    assert params["promote"].default_value.bool_value is True

    executors = spec.deployment_spec.fields["executors"].struct_value.fields
    comps = docs[0]["components"]
    round_comps = {name for name, c in comps.items() if "controller-update" in c.get("dag", {}).get("tasks", {})}
    rounds = [t for t in docs[0]["root"]["dag"]["tasks"].values() if t["componentRef"]["name"] in round_comps]
    assert len(rounds) == ROUNDS and len(round_comps) == 1  # a task per round, one shared definition (compacted)
    for name, ex in executors.items():
        container = json_format.MessageToDict(ex.struct_value)["container"]
        assert container["image"] == "registry.example/paploss:1.2"
        assert "pip install" not in " ".join(container.get("command", []))  # install_kfp_package=False
        if name.startswith(("exec-proxy-trial", "exec-final-train", "exec-pretrain")):
            res = container["resources"]
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert res["accelerator"]["resourceCount"] == "1"
            assert res["resourceCpuRequest"] and res["resourceMemoryRequest"]
    doc = docs[0]
    from pipelines.search_pipeline import FINAL_LOSSES

    assert sorted(set(_walk(doc, "parallelismLimit"))) == [3, len(FINAL_LOSSES)]  # trials; the finals side by side
    retries = [p["maxRetryCount"] for p in _walk(doc, "retryPolicy")]
    assert retries and set(retries) == {4}

    k8s = json_format.MessageToDict(platform)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)  # every task gets the cluster settings
    for name, cfg in k8s.items():
        # the pipeline parameters (inside a round sub-pipeline: its channel of them)
        assert re.fullmatch(r"(pipelinechannel--)?node_selector",
                            cfg["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"])
        assert re.fullmatch(r"(pipelinechannel--)?tolerations",
                            cfg["tolerations"][0]["tolerationJson"]["componentInputParameter"])
        secret = cfg["secretAsEnv"][0]
        assert re.fullmatch(r"(pipelinechannel--)?s3_secret", secret["secretNameParameter"]["componentInputParameter"])
        assert {k["envVar"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert cfg["pvcMount"][0]["mountPath"] == "/data"


def test_compile_pipeline_api_is_atomic(tmp_path):
    from pipelines.compile import compile_pipeline

    out = tmp_path / "p.yaml"
    out.write_text("old")
    assert compile_pipeline(str(out), image="x/y:z") == str(out)
    assert "x/y:z" in out.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]  # no temporary left behind
    with pytest.raises(ValueError, match="must end in .yaml"):
        compile_pipeline(str(tmp_path / "p.txt"))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def cli_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "0"], "rounds=0 is out of range"),
        (["--samples", "1"], "samples=1 is out of range"),
        (["--parallelism", "0"], "parallelism=0 is out of range"),
        (["--dataset", "/no/such/dataset"], "dataset='/no/such/dataset' has no annotations/train.json"),
        (["--proxy", '{"iters": 3}'], "unknown training option(s) ['iters']"),
        # the proxies' PAP-loss options pass; a final's are checked too (the baselines train without them)
        (["--proxy", '{"box_collapse": 0.3}', "--final", '{"box_collapse": 1.5}'],
         "final options: box_collapse is a box quality u in (0, 1)"),
        (["--proxy-epochs", "-1"], "--proxy-epochs=-1.0 must be >= 0"),
        (["--search-name", "a/b"], "search_name='a/b'"),
        (["--select-top", "2", "--select-seeds", "0,1"], "holds the search's trial seed 0"),
        (["--select-top", "-1"], "select_top=-1 is out of range"),
        (["--select-top", "2", "--select-seeds", "x"], "'x' is not a comma-separated list of integers"),
        (["--reward-seeds", "0"], "reward_seeds=0 is out of range"),
        (["--reward-seeds", "2", "--select-top", "2", "--select-seeds", "1,1000"], "holds the search's trial seed 1000"),
        (["--search-splits", "0"], "search_splits=0 is out of range"),
        (["--search-val-fraction", "1"], "search_val_fraction=1.0 must be in (0, 1)"),
        (["--select-top", "2", "--select-rank", "best"], "'best' is not one of 'reward', 'round'"),
        (["--lr-sweep", '{"iters": 3}'], "lr sweep options (--lr-sweep) has unknown training option(s) ['iters']"),
        (["--lr-sweep", '{"lrs": 0.01}'], '--lr-sweep: "lrs": 0.01 must be a list of learning rates'),
        (["--lr-sweep", '{"lrs": [0.01, -1]}'], "--lr-sweep: lr sweep: lrs=[0.01, -1] must be numbers > 0"),
        (["--lr-sweep", "[]"], "--lr-sweep: '[]' must be a JSON object"),
    ],
)
@pytest.mark.parametrize("command", ["run", "search"])
def test_bad_input_stops_before_training(cli_env, command, args, message):
    result = CliRunner().invoke(main, [command, "--preset", "smoke", "--work", "w", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (cli_env / "w").exists() and not (cli_env / "runs").exists()  # nothing half-written
    assert not (cli_env / "mlflow.db").exists()


def test_unreachable_services_are_named(cli_env, monkeypatch):
    port = free_port()
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2 and f"cannot reach the MLflow server MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" \
        in result.output
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--dataset", "s3://data/shapes"])
    assert result.exit_code == 2 and f"127.0.0.1:{port}" in result.output and "s3://data/shapes" in result.output
    result = CliRunner().invoke(main, ["search", "--preset", "smoke", "--work", "s3://work/x"])
    assert result.exit_code == 2 and "cannot reach the S3 endpoint" in result.output
    assert not (cli_env / "runs").exists()


def test_help_answers():
    for command in ("run", "search", "compile", "submit"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, command
    assert "--search-name" in CliRunner().invoke(main, ["run", "--help"]).output
    for command in ("run", "search"):
        assert "--lr-sweep" in CliRunner().invoke(main, [command, "--help"]).output, command


def test_lr_sweep_option_is_merged_over_the_presets_sweep():
    """``--lr-sweep JSON`` replaces the keys it gives of the preset's sweep, keeps the
    others; not given, the preset's sweep; ``{"lrs": []}`` leaves nothing to sweep."""
    from paploss import presets
    from paploss.search_cli import settings_from_options

    def settings(lr_sweep_json):
        return settings_from_options(
            preset="smoke", dataset=None, work="w", search_name="x", rounds=None, samples=None, parallelism=None,
            max_failed_trials=None, attempts=None, seed=None, detector=None, proxy_epochs=0, final_epochs=0,
            proxy_json=None, final_json=None, controller_json=None, tracking_uri="sqlite:///m.db", experiment="e",
            model_name="m", promote=True, lr_sweep_json=lr_sweep_json)

    preset = presets.get_preset("smoke").lr_sweep
    assert len(steps.sweep_lrs(preset)) >= 2
    assert settings(None).preset.lr_sweep == preset
    off = settings('{"lrs": []}').preset.lr_sweep
    assert off == {**preset, "lrs": []} and steps.sweep_lrs(off) == []
    assert settings('{"lrs": [0.1, 0.2, 0.3], "iterations": 5}').preset.lr_sweep == {
        **preset, "lrs": [0.1, 0.2, 0.3], "iterations": 5}


# ----------------------------------------------------------------------------- end to end


def _check_mlflow(client, experiment: str, search_name: str, rounds: int = ROUNDS, samples: int = SAMPLES):
    """The layout the issue asks for: parent, trials, per-round metrics/figures, finals, registry."""
    from paploss import tracking as tr

    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{tr.SEARCH_NAME}` = '{search_name}'", max_results=1000)
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get(tr.KIND), []).append(r)
    (parent,) = by_kind["search"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["samples"] == str(samples)
    trials = by_kind["trial"]
    assert len(trials) == rounds * samples
    assert {(t.data.tags["paploss.round"], t.data.tags["paploss.sample"]) for t in trials} == {
        (str(r), str(s)) for r in range(rounds) for s in range(samples)}
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "reward" in t.data.metrics and "H2.theta1" in t.data.params and "grad_scale" in t.data.params
        assert len(client.get_metric_history(t.info.run_id, "loss")) >= 1
        assert {"loss_spec.json", "theta.json"} <= {a.path for a in client.list_artifacts(t.info.run_id)}
    for key in ("mean_reward", "max_reward", "mu.H2.theta1", "mu.grad_scale"):
        assert [m.step for m in client.get_metric_history(parent.info.run_id, key)] == list(range(rounds)), key
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"functions.png", "rewards.png", "report.json", "loss_spec.json"} <= arts
    assert len(client.list_artifacts(parent.info.run_id, "functions")) == rounds
    finals = {r.data.tags["paploss.loss"]: r for r in by_kind["final"]}
    assert set(finals) == {"searched", "start", "focal+l1", "focal+giou"}
    for r in finals.values():
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(r.data.metrics)
    versions = client.search_model_versions("name = 'paploss-retinanet'")
    mine = [v for v in versions if v.tags.get(tr.SEARCH_NAME) == search_name]
    assert len(mine) == 1 and float(mine[0].tags["AP"]) == finals["searched"].data.metrics["AP"]
    assert mine[0].run_id == finals["searched"].info.run_id
    assert {a.path for a in client.list_artifacts(mine[0].run_id, "model")} >= {
        "model/MLmodel", "model/artifacts", "model/loss_spec.json"}  # a pyfunc; its checkpoint under artifacts/
    return parent, trials


@pytest.mark.slow
def test_inprocess_search_fills_the_sqlite_store(cli_env):
    from mlflow import MlflowClient

    # one round, no lr sweep: the in-process path into the store (two rounds and the sweep: the kfp.local
    # run below; the in-process sweep: tests/test_flow.py)
    result = CliRunner().invoke(main, ["search", "--preset", "smoke", "--search-name", "inproc", "--work", "w",
                                       "--rounds", "1", "--lr-sweep", '{"lrs": []}'])
    assert result.exit_code == 0, result.output
    assert re.search(r"searched\s+\d+\.\d\d", result.output) and "focal+giou" in result.output
    assert "learning rates (each loss's best" not in result.output  # no sweep: every final at the final options' lr
    uri = f"sqlite:///{cli_env / 'mlflow.db'}"
    _check_mlflow(MlflowClient(uri, uri), "paploss", "inproc", rounds=1)
    report = storage.read_json(cli_env / "w" / "searches" / "inproc" / "report.json")
    assert report["rounds"] == 1 and set(report["final"]) == {"searched", "start", "focal+l1", "focal+giou"}
    assert not (cli_env / "w" / "searches" / "inproc" / "lr_sweep.json").exists()


@pytest.mark.slow
def test_kfp_local_run_with_mlflow_server_and_s3_then_resume_from_cache(tmp_path, mlflow_server, monkeypatch):
    """`paploss run` through kfp.local: dataset read from S3, work folder on S3,
    MLflow server with artifacts in S3. Then the same run again: every task comes
    from KFP's cache (no trial trains twice) and the result is the same."""
    from paploss.data import make_dataset
    from paploss.tracking import make_client

    for key, value in mlflow_server.s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    s3 = mlflow_server.s3
    s3.make_bucket("datasets")
    s3.make_bucket("work")
    local = make_dataset("shapes", tmp_path / "shapes", n_train=48, n_val=16, image_size=64, progress=False)
    storage.upload_dir(local, "s3://datasets/shapes")
    args = ["run", "--preset", "smoke", "--dataset", "s3://datasets/shapes", "--work", "s3://work/paploss",
            "--search-name", "kfp-s3", "--tracking-uri", mlflow_server.uri, "--root", str(tmp_path / "runs")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output + (tmp_path / "runs" / "logs" / "kfp-s3.log").read_text()[-5000:]
    assert f"round {ROUNDS}/{ROUNDS} done: mean reward" in first.output  # progress per round (the display's line)
    assert "searched" in first.output and "make ui" in first.output
    # the preset's lr sweep ran (the one kfp.local test that runs it): each final loss got its lr
    assert "learning rates (each loss's best of the sweep on search-val)" in first.output

    client = make_client(mlflow_server.uri)
    parent, trials = _check_mlflow(client, "paploss", "kfp-s3")
    assert parent.data.params["dataset"] == "s3://datasets/shapes"
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="work", Prefix="paploss/")["Contents"]]
    assert "paploss/searches/kfp-s3/report.json" in keys and "paploss/searches/kfp-s3/lr_sweep.json" in keys
    assert sum(k.startswith("paploss/searches/kfp-s3/trials/") for k in keys) == ROUNDS * SAMPLES
    arts = [o["Key"] for o in s3.client().list_objects_v2(Bucket=mlflow_server.artifact_bucket)["Contents"]]
    assert any(k.endswith("/functions.png") for k in arts)  # MLflow's artifacts went to S3
    report = json.loads(storage.read_text("s3://work/paploss/searches/kfp-s3/report.json"))

    log = Path(tmp_path / "runs" / "logs" / "kfp-s3.log")
    log.unlink()
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    text = log.read_text()
    hits = re.findall(r"Task '?([\w-]+)'? cache hit", text)
    assert sum(h.startswith("proxy-trial") for h in hits) == ROUNDS * SAMPLES
    # nothing ran again but the report, whose KFP Metrics and Markdown outputs kfp.local does not cache
    # (it re-reads the finals, finds its MLflow runs by their keys and registers nothing twice)
    again = re.findall(r"Executing task \S*'([\w-]+)", text)
    assert set(again) <= {"report"}, again
    assert len(client.search_runs([parent.info.experiment_id], "tags.`paploss.kind` = 'trial' and "
                                  "tags.`paploss.search_name` = 'kfp-s3'", max_results=100)) == len(trials)
    assert json.loads(storage.read_text("s3://work/paploss/searches/kfp-s3/report.json")) == report


@pytest.mark.slow
def test_kfp_local_run_with_a_selection_stage(cli_env):
    """`paploss run --select-top 2 --select-seeds 1,2` through kfp.local: after the last
    round the two best samples are trained again with seeds 1 and 2 (a sub-pipeline
    with its own ParallelFor), the best mean is the searched loss, and the final
    training, the report and MLflow use that loss, not the policy's mean. With
    ``--reward-seeds 2`` every sampled loss is trained twice (seeds 0 and 1000) and
    the controller is given the mean of the two. With ``--search-splits 3`` the
    data step draws three search splits, round r trains and scores on split r and the
    selection on split rounds mod 3, which no round used; with ``--search-val-fraction 0.4`` each
    holds out 40 % of train. Each round logs the seeds' noise in its rewards. With
    ``--select-rank round`` the candidates are the best rewards relative to their
    round's mean (each round scored on its own split).

    One round (``--rounds 1``: round 0 on split 0, the selection on split 1) and no lr
    sweep (``--lr-sweep '{"lrs": []}'``): this test is the selection's plumbing through
    kfp.local; two rounds and the sweep run in the S3 test above, a round per split and the
    ranks' orders in tests/test_steps.py."""
    from mlflow import MlflowClient

    rounds = 1
    args = ["run", "--preset", "smoke", "--search-name", "kfp-select", "--work", "w", "--root", "runs",
            "--rounds", str(rounds), "--lr-sweep", '{"lrs": []}', "--select-top", "2", "--select-seeds", "1,2",
            "--reward-seeds", "2", "--search-splits", "3", "--search-val-fraction", "0.4", "--select-rank", "round"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + (cli_env / "runs" / "logs" / "kfp-select.log").read_text()[-5000:]
    assert "selection candidate 1: reward" in result.output and "searched loss: selection candidate" in result.output
    folder = cli_env / "w" / "searches" / "kfp-select"
    (selected,) = (folder / "state").glob("selected-*.json")
    doc = json.loads(selected.read_text())
    cands = doc["selected"]["candidates"]
    assert len(cands) == 2 and all(sorted(c["rewards"]) == ["1", "2"] for c in cands)
    trial_files = sorted(p.name for p in (folder / "trials").iterdir())
    assert trial_files[-4:] == [f"r{rounds:03d}-s{s:02d}.json" for s in range(4)]  # after the last round
    search_trials = [json.loads((folder / "trials" / f"r{r:03d}-s{s:02d}.json").read_text())
                     for r in range(rounds) for s in range(2 * SAMPLES)]
    assert [t["seed"] for t in search_trials] == [0, 1000] * (rounds * SAMPLES)
    assert [t["split"] for t in search_trials] == [r for r in range(rounds) for _ in range(2 * SAMPLES)]
    assert {json.loads((folder / "trials" / f"r{rounds:03d}-s{s:02d}.json").read_text())["split"]
            for s in range(4)} == {rounds % 3}
    (data,) = (cli_env / "w" / "data").iterdir()
    assert {p.name for p in (data / "annotations").glob("search_val*.json")} == {
        "search_val.json", "search_val-1.json", "search_val-2.json"}
    images = {n: len(json.loads((data / "annotations" / f"{n}.json").read_text())["images"])
              for n in ("train", "search_val", "search_val-2")}
    assert abs(images["search_val"] - 0.4 * images["train"]) <= 2 and images["search_val-2"] == images["search_val"]
    c = steps.load_controller(str(folder / "state" / f"round-{rounds:03d}.json"))
    assert [r for rec in c.history for r in rec.rewards] == pytest.approx(
        [(a["reward"] + b["reward"]) / 2 for a, b in zip(search_trials[::2], search_trials[1::2])])
    assert not any(rec.failed for rec in c.history)
    relative = sorted(((r - statistics.fmean(rec.rewards), [float(v) for v in theta]) for rec in c.history
                       for r, theta in zip(rec.rewards, rec.thetas)), key=lambda x: -x[0])
    assert [cand["theta"] for cand in cands] == [theta for _, theta in relative[:2]]
    assert doc["selected"]["rank"] == "round"
    report = json.loads((folder / "report.json").read_text())
    final = json.loads((folder / "final" / "searched.json").read_text())
    assert final["spec"] == report["searched_spec"] == doc["selected"]["spec"]
    assert final["spec"] != steps.load_controller(str(folder / "state" / f"round-{rounds:03d}.json")).spec().to_json()
    uri = f"sqlite:///{cli_env / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    parent = client.search_runs([client.get_experiment_by_name("paploss").experiment_id],
                                "tags.`paploss.kind` = 'search'")[0]
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "selection.mean_reward")] == [0, 1]
    noise = steps.round_noise(str(folder / "state" / f"round-{rounds:03d}.json"))
    logged = sorted((m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "reward_noise_sd"))
    assert [step for step, _ in logged] == list(range(rounds))
    assert [value for _, value in logged] == pytest.approx([noise[r][1] for r in range(rounds)], abs=1e-12)
    assert "selection.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # no sweep: nothing trained for it, every final at the final options' lr
    assert not (folder / "lr_sweep.json").exists() and "lrs" not in report
    assert "learning rates (each loss's best" not in result.output  # the table's line of the sweep's picks


def test_submit_names_what_is_wrong(tmp_path):
    from pipelines.compile import compile_pipeline

    missing = CliRunner().invoke(main, ["submit", "--host", "http://127.0.0.1:1", "--package", str(tmp_path / "x.yaml")])
    assert missing.exit_code == 2 and "does not exist: run `make compile` first" in missing.output
    package = compile_pipeline(str(tmp_path / "p.yaml"), preset="smoke")
    port = free_port()
    result = CliRunner().invoke(main, ["submit", "--host", f"http://127.0.0.1:{port}", "--package", package])
    assert result.exit_code == 1 and f"127.0.0.1:{port}" in result.output
    bad = CliRunner().invoke(main, ["submit", "--host", f"http://127.0.0.1:{port}", "--package", package,
                                    "--param", "novalue"])
    assert bad.exit_code == 2 and "'novalue' is not NAME=VALUE" in bad.output


def test_local_run_console_shows_progress_lines_only():
    import io
    from collections import deque

    from pipelines.run_local import _cause, _Tee

    log, console = io.StringIO(), io.StringIO()
    tee = _Tee(log, console)
    tee.write("05:00 - INFO - Executing task 'x'\n        paploss> round 1/2: mean reward 0.1")
    tee.write("\n    [KFP Executor] noise\n")
    assert console.getvalue() == "round 1/2: mean reward 0.1\n"
    assert "Executing task" in log.getvalue() and "noise" in log.getvalue()
    tail = deque(["x", "paploss.steps.SearchFailed: search 's': 3 failed trials exceed max_failed_trials=2", "y"])
    assert _cause(tail).startswith("paploss.steps.SearchFailed: search 's': 3 failed")
