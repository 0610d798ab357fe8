"""paploss.tracking against real MLflow stores: a sqlite file, and an ``mlflow
server`` whose artifacts live in a ``moto_server`` bucket."""

from __future__ import annotations

import json
import os

import pytest
from mlflow import MlflowClient

from paploss import tracking as tr
from paploss.search import Controller
from tests._servers import free_port, mlflow_server, s3_server  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store per module (creating its tables takes seconds), in memory
    (``/dev/shm``) where the machine has it: sqlite syncs the file to disk on every
    MLflow write, and the kill tests below make thousands (about 4 ms each on a disk)."""
    import shutil
    import tempfile
    from pathlib import Path

    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="paploss-mlflow-", dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) \
        else tmp_path_factory.mktemp("mlflow")
    path = folder / "mlflow.db"
    yield path, MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def client(store):
    return store[1]


def _search_run(client, name="s1"):
    return tr.start_search(client, "exp", name, {"rounds": 2, "proxy": {"iterations": 3}})


def test_start_search_is_idempotent_and_tagged(store):
    path, client = store
    run_id = _search_run(client)
    assert _search_run(client) == run_id  # resume reuses the parent run
    run = client.get_run(run_id)
    assert run.data.tags[tr.KIND] == "search" and run.data.tags[tr.SEARCH_NAME] == "s1"
    assert run.data.params["rounds"] == "2" and json.loads(run.data.params["proxy"]) == {"iterations": 3}
    assert _search_run(client, "s2") != run_id
    # sqlite stores keep artifacts beside the database, where `make clean` finds them
    exp = client.get_experiment_by_name("exp")
    assert exp.artifact_location == (path.parent / "mlartifacts").as_uri()
    tr.finish_search(client, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _search_run(client) == run_id and client.get_run(run_id).info.status == "RUNNING"


def test_trial_round_and_final_runs(client):
    parent = _search_run(client)
    c = Controller(rounds=2, seed=0)
    thetas = c.sample(2).tolist()
    ids = [
        tr.log_trial(client, parent, search_name="s1", round=0, sample=i, theta=thetas[i], names=c.parameter_names,
                     spec_json=c.spec_of(thetas[i]).to_json(), losses=[1.0, 0.5, float("nan"), 0.25],
                     box_quality=[0.7, float("nan"), 0.6, 0.5], reward=0.1 * (i + 1), failed=False,
                     metrics={"AP50": 0.3}, box_collapsed=i == 0)
        for i in range(2)
    ]
    assert [client.get_run(i).data.tags["paploss.box_collapsed"] for i in ids] == ["true", "false"]
    run = client.get_run(ids[1])
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags[tr.KIND] == "trial" and run.data.tags["paploss.round"] == "0"
    assert run.data.tags["paploss.sample"] == "1"
    assert float(run.data.params["H2.theta1"]) == pytest.approx(thetas[1][0], abs=1e-6)
    assert float(run.data.params["grad_scale"]) == pytest.approx(thetas[1][-1], abs=1e-6)
    assert run.data.metrics["reward"] == pytest.approx(20.0)  # AP x 100, the one unit
    assert run.data.metrics["AP50"] == pytest.approx(30.0) and run.info.run_name == "r01-s02"
    losses = client.get_metric_history(ids[1], "loss")
    assert [m.step for m in losses] == [0, 1, 3]  # the NaN step is skipped, not an error
    quality = client.get_metric_history(ids[1], "box_quality")
    assert [(m.step, m.value) for m in quality] == [(0, 0.7), (2, 0.6), (3, 0.5)]
    assert {a.path for a in client.list_artifacts(ids[1])} >= {"loss_spec.json", "theta.json"}

    rec = c.update(thetas, [0.1, 0.2])
    tr.log_round(client, parent, round=0, rewards=[0.1, 0.2], failed=0, mu=c.mu.tolist(), names=c.parameter_names,
                 spec=c.spec(), history=[rec.rewards], noise=[(0.03, 0.01)])
    data = client.get_run(parent).data
    assert data.metrics["mean_reward"] == pytest.approx(15.0) and data.metrics["max_reward"] == pytest.approx(20.0)
    assert data.metrics["reward_spread_sd"] == pytest.approx(3.0) and data.metrics["reward_noise_sd"] == pytest.approx(1.0)
    assert data.metrics["mu.grad_scale"] == pytest.approx(c.mu[-1].item())
    arts = {a.path for a in client.list_artifacts(parent)}
    assert {"functions.png", "rewards.png", "loss_spec.json", "functions"} <= arts
    assert [a.path for a in client.list_artifacts(parent, "functions")] == ["functions/round-000.png"]

    final = tr.log_final(client, parent, search_name="s1", loss="searched",
                         metrics={"AP": 0.3, "AP50": 0.5, "AP75": 0.2, "APs": 0.1, "APm": 0.3, "APl": 0.4},
                         spec_json=c.spec().to_json())
    run = client.get_run(final)
    assert run.data.tags[tr.KIND] == "final" and run.data.metrics["AP"] == pytest.approx(30.0)
    assert run.info.run_name == "final searched" and run.data.tags[tr.KEY] == "s1/final/searched"
    assert {a.path for a in client.list_artifacts(final, "model")} >= {"model/loss_spec.json", "model/metrics.json"}


@pytest.mark.parametrize(
    "champion_ap, new_ap, promoted",
    [(None, 20.0, True), (30.0, 40.0, True), (30.0, 30.0, True), (30.0, 20.0, False)],
    ids=["no-champion", "better", "equal", "worse"],
)
def test_register_and_champion(client, champion_ap, new_ap, promoted, request):
    parent = _search_run(client)
    model = f"m-{request.node.callspec.id}"
    if champion_ap is not None:
        old = tr.log_final(client, parent, search_name="old", loss=f"old-{model}", metrics={"AP": champion_ap / 100},
                           spec_json="{}")
        v_old, p_old = tr.register_detector(client, model, old, search_name="old", ap=champion_ap, promote=True)
        assert p_old and str(tr.champion_version(client, model).version) == v_old
    new = tr.log_final(client, parent, search_name="s1", loss=f"new-{model}", metrics={"AP": new_ap / 100},
                       spec_json="{}")
    version, was_promoted = tr.register_detector(client, model, new, search_name="s1", ap=new_ap, promote=True)
    assert was_promoted is promoted
    mv = client.get_model_version(model, version)
    assert mv.tags[tr.SEARCH_NAME] == "s1" and float(mv.tags["AP"]) == new_ap and mv.tags[tr.AP_UNIT_TAG] == tr.AP_UNIT
    champ = tr.champion_version(client, model)
    assert (str(champ.version) == version) is promoted
    # idempotent: a retried step registers no second version
    assert tr.register_detector(client, model, new, search_name="s1", ap=new_ap)[0] == version
    assert len(client.search_model_versions(f"name = '{model}'")) == (1 if champion_ap is None else 2)


def test_register_without_promote_leaves_champion(client):
    parent = _search_run(client)
    run = tr.log_final(client, parent, search_name="s1", loss="np", metrics={"AP": 0.9}, spec_json="{}")
    version, promoted = tr.register_detector(client, "m-np", run, search_name="s1", ap=90.0)
    assert not promoted and tr.champion_version(client, "m-np") is None  # registering moves no alias by default
    assert tr.promote_if_better(client, "m-np", version, 90.0)
    assert str(tr.champion_version(client, "m-np").version) == version


def test_check_tracking_names_unreachable_server(tmp_path):
    port = free_port()
    with pytest.raises(tr.TrackingError, match=f"127.0.0.1:{port}"):
        tr.check_tracking(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(tr.TrackingError, match="does not exist"):
        tr.check_tracking(f"sqlite:///{tmp_path}/no/such/folder/mlflow.db")
    with pytest.raises(tr.TrackingError, match="not a URI"):
        tr.check_tracking("mlflow-server:5000")
    assert tr.check_tracking(f"sqlite:///{tmp_path}/mlflow.db").endswith("mlflow.db")


@pytest.mark.slow
def test_server_stores_artifacts_in_s3_and_registers(mlflow_server, monkeypatch):
    for key, value in mlflow_server.s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    tr.check_tracking(mlflow_server.uri)
    client = tr.make_client(mlflow_server.uri)
    parent = tr.start_search(client, "srv", "s-server", {"rounds": 1})
    final = tr.log_final(client, parent, search_name="s-server", loss="searched", metrics={"AP": 0.5},
                         spec_json='{"form": "searched"}')
    version, promoted = tr.register_detector(client, "m-server", final, search_name="s-server", ap=50.0, promote=True)
    assert promoted and str(tr.champion_version(client, "m-server").version) == version
    keys = [o["Key"] for o in mlflow_server.s3.client().list_objects_v2(Bucket=mlflow_server.artifact_bucket)["Contents"]]
    assert any(k.endswith(f"{final}/artifacts/model/loss_spec.json") for k in keys), keys
    # the registry contract paploss retrain relies on: models:/name/version/loss_spec.json
    from mlflow.artifacts import download_artifacts

    path = download_artifacts(artifact_uri=f"models:/m-server/{version}/loss_spec.json",
                              tracking_uri=mlflow_server.uri)
    assert json.loads(open(path).read()) == {"form": "searched"}
    assert os.environ["AWS_ENDPOINT_URL"] == mlflow_server.s3.endpoint


# ----------------------------------------------------------------------------- one run per key, real durations

def test_experiment_opens_in_the_model_training_view(client):
    _search_run(client)
    exp = client.get_experiment_by_name("exp")
    assert exp.tags[tr.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_trial_run_lasts_as_long_as_its_training(client):
    """Opened when training starts and ended when it ends: the run's duration is the
    training's; a result logged after the fact (a stored one) starts ``seconds`` ago."""
    import time

    parent = _search_run(client, "dur")
    t = {"uri": client.tracking_uri, "experiment": "exp"}
    run_id = tr.start_trial(t, "dur", 0, 0)
    assert client.get_run(run_id).info.status == "RUNNING"
    time.sleep(0.6)
    result = {"round": 0, "sample": 0, "theta": [0.1, 0.2], "reward": 0.5, "failed": False, "diverged": False,
              "metrics": {"AP": 0.5}, "seconds": 0.6, "losses": [1.0, 0.5]}
    assert tr.record_trial(t, "dur", result) == run_id
    info = client.get_run(run_id).info
    assert info.status == "FINISHED" and info.end_time - info.start_time >= 600
    late = tr.record_trial(t, "dur", {**result, "sample": 1, "seconds": 42.0})
    info = client.get_run(late).info
    assert late != run_id and 41_000 <= info.end_time - info.start_time <= 45_000
    assert client.get_run(late).data.tags["mlflow.parentRunId"] == parent


def test_claim_takes_over_a_killed_run_and_supersedes_duplicates(client):
    exp = client.get_experiment_by_name("exp").experiment_id
    key = "dup/trial/r000/s00"
    a = client.create_run(exp, tags={tr.KEY: key}).info.run_id  # left RUNNING by a killed task
    b = client.create_run(exp, tags={tr.KEY: key}).info.run_id  # a second one, as two writers once made
    run_id, done = tr.claim_run(client, exp, key, name="x", tags={})
    assert (run_id, done) == (a, False) and client.get_run(a).info.status == "RUNNING"
    assert client.get_run(b).info.status == "KILLED" and tr.KEY not in client.get_run(b).data.tags
    assert client.get_run(b).data.tags["paploss.superseded_by"] == a
    client.set_terminated(a, status="KILLED")  # killed again: the retry takes it over once more
    assert tr.claim_run(client, exp, key, name="x", tags={}) == (a, False)
    client.set_terminated(a)
    c = client.create_run(exp, tags={tr.KEY: key}).info.run_id
    assert tr.claim_run(client, exp, key, name="x", tags={}) == (a, True)  # the finished one wins
    assert client.get_run(c).info.status == "KILLED"
    assert [r.info.run_id for r in tr.runs_with_key(client, exp, key)] == [a]


def test_a_parent_run_from_before_keys_is_found_and_keyed(client):
    exp = tr.experiment_id(client, "exp")
    old = client.create_run(exp, tags={tr.KIND: "search", tr.SEARCH_NAME: "legacy"}).info.run_id
    assert tr.start_search(client, "exp", "legacy", {"rounds": 1}) == old
    assert client.get_run(old).data.tags[tr.KEY] == "legacy/search"


def test_version_ap_reads_old_fractions_in_the_one_unit(client):
    from types import SimpleNamespace

    old = SimpleNamespace(name="m", version="1", tags={"AP": "0.25"})
    new = SimpleNamespace(name="m", version="2", tags={"AP": "25.0", tr.AP_UNIT_TAG: tr.AP_UNIT})
    assert tr.version_ap(old) == pytest.approx(25.0) == tr.version_ap(new)
    with pytest.raises(tr.TrackingError, match="v3 has no numeric AP"):
        tr.version_ap(SimpleNamespace(name="m", version="3", tags={}))


@pytest.mark.slow
def test_ui_command_runs_from_a_fresh_shell():
    """``mlflow`` is not on a fresh shell's PATH: the printed command names it by its absolute path."""
    import subprocess
    import sys
    from pathlib import Path

    cmd = tr.ui_command("sqlite:////tmp/x/mlflow.db")
    prog = cmd.split()[0]
    assert Path(prog).is_absolute() and Path(prog).parent == Path(sys.executable).parent.absolute()
    assert cmd.endswith("ui --backend-store-uri sqlite:////tmp/x/mlflow.db --port 5000")
    out = subprocess.run([prog, "ui", "--help"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert out.returncode == 0 and "--backend-store-uri" in out.stdout


# ----------------------------------------------------------------------------- kill at each logging point

_WRITES = {"create_run", "update_run", "set_terminated", "log_batch", "log_metric", "log_text", "log_dict",
           "log_artifact", "log_artifacts", "set_tag", "delete_tag", "create_registered_model",
           "create_model_version", "set_registered_model_alias", "set_model_version_tag", "set_experiment_tag",
           "create_experiment"}


class Killed(BaseException):
    """The task died (nothing catches it, as nothing catches SIGKILL)."""


class _Death:
    """Kills the task right after its ``at``-th MLflow write (counted over every client it makes)."""

    def __init__(self, at: int, how=None):
        self.at, self.n, self.dead, self.how, self.calls = at, 0, False, how, []

    def client(self, real):
        death = self

        class Dying:
            def __getattr__(self, name):
                attr = getattr(real, name)
                if not callable(attr):
                    return attr

                def call(*args, **kwargs):
                    if death.dead:
                        raise Killed(name)
                    out = attr(*args, **kwargs)
                    if name in _WRITES:
                        death.n += 1
                        death.calls.append(name)
                        if death.n == death.at:
                            death.dead = True
                            if death.how is not None:
                                death.how()
                            raise Killed(name)
                    return out
                return call
        return Dying()


def _fake_training(cfg, on_step=None):
    """A training's result without the training: the AP depends on the loss, so the searched one wins."""
    from types import SimpleNamespace

    for i in range(3):
        if on_step is not None:
            on_step(i, 1.0 / (i + 1))
    ap = {"focal+l1": 0.20, "focal+giou": 0.22}.get(cfg.loss, 0.30)
    ckpt = None
    if cfg.out_dir:
        ckpt = os.path.join(cfg.out_dir, "checkpoint.pt")
        with open(ckpt, "wb") as fh:
            fh.write(b"not a real checkpoint")
    return SimpleNamespace(metrics={"AP": ap, "AP50": ap + 0.1}, box_quality=[0.5, 0.6, 0.7], diverged=False,
                           box_collapsed=False, checkpoint=ckpt)


def _fake_model(path, checkpoint, metadata=None):
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True)
    (path / "MLmodel").write_text("flavors: {}\n")
    return path


def _tiny_png(*args, **kwargs) -> bytes:
    """A figure's PNG without drawing it (these tests log figures, they do not look at them)."""
    import base64

    return base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def _whole_search(data: str, work: str, name: str, uri: str, model: str) -> dict:
    """Every logging step of a search: init, two trials, the update, two finals, the report
    (a PPO update of 5 steps: what it logs does not depend on how many)."""
    from paploss import steps

    t = {"uri": uri, "experiment": "kill"}
    out = steps.init_search(work, name, rounds=1, samples=2, seed=0, tracking=t, controller={"steps": 5})
    proxy = {"iterations": 3, "image_size": 64}
    results = [steps.proxy_trial(data, "", trial, proxy, work, name, state=out["state"], tracking=t)
               for trial in out["trials"]]
    upd = steps.controller_update(out["state"], results, work, name, tracking=t)
    finals = [steps.final_train(data, "", loss, {"iterations": 3, "image_size": 64}, work, name,
                                state=upd["state"] if loss == "searched" else "", tracking=t, model_name=model)
              for loss in ("searched", "focal+l1")]
    return json.loads(steps.report(finals, upd["state"], work, name, tracking=t, model_name=model, promote=True))


@pytest.fixture(scope="module")
def kill_env(tmp_path_factory, store):
    from paploss.data import make_dataset, search_split

    root = make_dataset("shapes", tmp_path_factory.mktemp("killdata") / "shapes", n_train=10, n_val=4,
                        image_size=64, progress=False)
    search_split(root)
    return str(root), f"sqlite:///{store[0]}", tmp_path_factory.mktemp("killwork")


def _patch(monkeypatch):
    import paploss.plots
    import paploss.serving
    import paploss.steps.finals
    import paploss.steps.trials

    monkeypatch.setattr(paploss.steps.trials, "_run_training", _fake_training)
    monkeypatch.setattr(paploss.steps.finals, "_run_training", _fake_training)
    monkeypatch.setattr(paploss.serving, "save_detector", _fake_model)
    for name in ("functions_figure", "reward_figure"):  # drawn: most of a search's time here
        monkeypatch.setattr(paploss.plots, name, _tiny_png)


def _assert_repaired(client, name: str, model: str, report: dict) -> None:
    """Exactly one run per key, all FINISHED, none without a key; one model version, champion."""
    exp = client.get_experiment_by_name("kill").experiment_id
    # this search's runs and every superseded run (of any search): asked of the store by their tags, not
    # read whole (the experiment grows by a search per kill)
    queries = (f"tags.`{tr.SEARCH_NAME}` = '{name}'", "tags.`paploss.superseded_by` LIKE '%'")
    found = {r.info.run_id: r for query in queries for r in client.search_runs([exp], query, max_results=1000)}
    runs = [r for r in found.values()
            if r.data.tags.get(tr.SEARCH_NAME) == name or r.data.tags.get("paploss.superseded_by")]
    keys = sorted(r.data.tags.get(tr.KEY, "(none)") for r in runs)
    assert keys == sorted([f"{name}/search", f"{name}/trial/r000/s00", f"{name}/trial/r000/s01",
                           f"{name}/final/searched", f"{name}/final/focal+l1"]), keys
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    versions = client.search_model_versions(f"name = '{model}'")
    assert len(versions) == 1
    assert str(tr.champion_version(client, model).version) == str(versions[0].version) == report["model_version"]
    assert report["promoted"] is True


def _kill_and_resume(kill_env, monkeypatch, pick, prefix: str) -> None:
    """Run a whole search counting its MLflow writes (once the experiment exists, as
    for every search after the first); then, for each write ``pick`` chooses, a fresh
    search (named ``<prefix><write>``) killed right after that write and run again."""
    data, uri, work = kill_env
    _patch(monkeypatch)
    real = tr.make_client
    client = real(uri)
    _assert_repaired(client, f"{prefix}-a", f"m{prefix}-a",
                     _whole_search(data, str(work / f"{prefix}-a"), f"{prefix}-a", uri, f"m{prefix}-a"))
    count = _Death(10**9)
    monkeypatch.setattr(tr, "make_client", lambda u=None: count.client(real(u)))
    _assert_repaired(client, f"{prefix}-b", f"m{prefix}-b",
                     _whole_search(data, str(work / f"{prefix}-b"), f"{prefix}-b", uri, f"m{prefix}-b"))
    assert count.n >= 25 and "create_model_version" in count.calls
    for at in pick(count.calls):
        name, model = f"{prefix}{at}", f"m{prefix}{at}"
        death = _Death(at)
        monkeypatch.setattr(tr, "make_client", lambda u=None, d=death: d.client(real(u)))
        with pytest.raises(Killed):
            _whole_search(data, str(work / name), name, uri, model)
        assert death.calls[-1] == count.calls[at - 1]  # killed after the very write counted
        monkeypatch.setattr(tr, "make_client", real)
        _assert_repaired(client, name, model, _whole_search(data, str(work / name), name, uri, model))


def test_kill_at_a_trial_start_a_registration_and_a_promotion_then_resume(kill_env, monkeypatch):
    """Three kills: a trial's run just opened (left RUNNING), the searched model just
    registered (its final's result never stored), the champion alias just moved (the
    parent run still RUNNING); each search, run again, is repaired."""
    def pick(calls):
        return [calls.index("create_run", calls.index("create_run") + 1) + 1,  # the first trial's run
                calls.index("create_model_version") + 1, calls.index("set_registered_model_alias") + 1]
    _kill_and_resume(kill_env, monkeypatch, pick, "k")


@pytest.mark.slow
def test_kill_at_each_logging_point_then_resume(kill_env, monkeypatch):
    """A task killed right after each MLflow write of a whole search (init, trials,
    update, finals and registration, report), then the search run again: every key
    has exactly one run, FINISHED, and the searched detector one model version."""
    _kill_and_resume(kill_env, monkeypatch, lambda calls: range(1, len(calls) + 1), "all")


@pytest.mark.slow
def test_sigkill_while_logging_the_model_then_resume(kill_env, tmp_path):
    """A real SIGKILL: a process that dies right after the searched final's model is
    uploaded (its run still RUNNING, nothing registered), then the search resumed here."""
    import signal
    import subprocess
    import sys

    data, uri, _ = kill_env
    script = f"""
import os, signal
from paploss import tracking as tr
from tests import test_tracking as T
import paploss.plots, paploss.serving, paploss.steps.finals, paploss.steps.trials
paploss.plots.functions_figure = paploss.plots.reward_figure = T._tiny_png
paploss.steps.trials._run_training = T._fake_training
paploss.steps.finals._run_training = T._fake_training
paploss.serving.save_detector = T._fake_model
real = tr.make_client
def make(u=None):
    c = real(u)
    orig = c.log_artifacts
    def log_artifacts(run_id, local_dir, artifact_path=None):
        orig(run_id, local_dir, artifact_path)
        if artifact_path == "model" and c.get_run(run_id).data.tags.get("paploss.loss") == "searched":
            os.kill(os.getpid(), signal.SIGKILL)
    c.log_artifacts = log_artifacts
    return c
tr.make_client = make
T._whole_search({data!r}, {str(tmp_path / 'w')!r}, "sk", {uri!r}, "msk")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    client = tr.make_client(uri)
    exp = client.get_experiment_by_name("kill").experiment_id
    left = tr.runs_with_key(client, exp, "sk/final/searched")
    assert [r.info.status for r in left] == ["RUNNING"] and not client.search_model_versions("name = 'msk'")
    mp = pytest.MonkeyPatch()
    try:
        _patch(mp)
        report = _whole_search(data, str(tmp_path / "w"), "sk", uri, "msk")
    finally:
        mp.undo()
    _assert_repaired(client, "sk", "msk", report)


def test_saved_views_open_the_runs_table_on_ap_reward_and_duration(client):
    """The report keeps two saved views (experiment tags MLflow 3's UI reads as its
    "Views"): every run, and the finals and trials best AP first; the printed address
    opens the second in the model-training view."""
    exp = tr.experiment_id(client, "views")
    tr.save_runs_views(client, exp)
    tr.save_runs_views(client, exp)  # kept, not duplicated: its creation time stays
    tags = client.get_experiment(exp).tags
    envelopes = {k[len("mlflow.sharedViewState."):]: json.loads(v) for k, v in tags.items()
                 if k.startswith("mlflow.sharedViewState.")}
    assert set(envelopes) == {tr.RUNS_VIEW, tr.FINALS_VIEW}
    finals = envelopes[tr.FINALS_VIEW]
    assert isinstance(finals["name"], str) and finals["updatedAt"] >= finals["createdAt"]
    state = json.loads(finals["state"])
    assert {"metrics.`AP`", "metrics.`AP50`", "metrics.`reward`", "attributes.`Duration`"} <= set(state["selectedColumns"])
    assert state["orderByKey"] == "metrics.`AP`" and state["searchFilter"] == "tags.`paploss.kind` != 'search'"
    url = tr.runs_url(exp, view=tr.FINALS_VIEW)
    assert url == (f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
                   f"&viewStateShareKey={tr.FINALS_VIEW}")
    lines = tr.ui_lines(client.tracking_uri, "views")
    assert lines[0].startswith("look at it with: make ui   (or: /") and lines[1].endswith(url)
    assert len(tr.ui_lines(client.tracking_uri, "no-such-experiment")) == 1
