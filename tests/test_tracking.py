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
    """One sqlite store per module (creating its tables takes seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return path, MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}")


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
    assert run.data.metrics["reward"] == pytest.approx(0.2)
    losses = client.get_metric_history(ids[1], "loss")
    assert [m.step for m in losses] == [0, 1, 3]  # the NaN step is skipped, not an error
    quality = client.get_metric_history(ids[1], "box_quality")
    assert [(m.step, m.value) for m in quality] == [(0, 0.7), (2, 0.6), (3, 0.5)]
    assert {a.path for a in client.list_artifacts(ids[1])} >= {"loss_spec.json", "theta.json"}

    rec = c.update(thetas, [0.1, 0.2])
    tr.log_round(client, parent, round=0, rewards=[0.1, 0.2], failed=0, mu=c.mu.tolist(), names=c.parameter_names,
                 spec=c.spec(), history=[rec.rewards], noise=[(0.03, 0.01)])
    data = client.get_run(parent).data
    assert data.metrics["mean_reward"] == pytest.approx(0.15) and data.metrics["max_reward"] == pytest.approx(0.2)
    assert data.metrics["reward_spread_sd"] == 0.03 and data.metrics["reward_noise_sd"] == 0.01
    assert data.metrics["mu.grad_scale"] == pytest.approx(c.mu[-1].item())
    arts = {a.path for a in client.list_artifacts(parent)}
    assert {"functions.png", "rewards.png", "loss_spec.json", "functions"} <= arts
    assert [a.path for a in client.list_artifacts(parent, "functions")] == ["functions/round-000.png"]

    final = tr.log_final(client, parent, search_name="s1", loss="searched",
                         metrics={"AP": 0.3, "AP50": 0.5, "AP75": 0.2, "APs": 0.1, "APm": 0.3, "APl": 0.4},
                         spec_json=c.spec().to_json())
    run = client.get_run(final)
    assert run.data.tags[tr.KIND] == "final" and run.data.metrics["AP"] == 0.3
    assert {a.path for a in client.list_artifacts(final, "model")} >= {"model/loss_spec.json", "model/metrics.json"}


@pytest.mark.parametrize(
    "champion_ap, new_ap, promoted",
    [(None, 0.2, True), (0.3, 0.4, True), (0.3, 0.3, True), (0.3, 0.2, False)],
    ids=["no-champion", "better", "equal", "worse"],
)
def test_register_and_champion(client, champion_ap, new_ap, promoted, request):
    parent = _search_run(client)
    model = f"m-{request.node.callspec.id}"
    if champion_ap is not None:
        old = tr.log_final(client, parent, search_name="old", loss="searched", metrics={"AP": champion_ap},
                           spec_json="{}")
        v_old, p_old = tr.register_detector(client, model, old, search_name="old", ap=champion_ap)
        assert p_old and str(tr.champion_version(client, model).version) == v_old
    new = tr.log_final(client, parent, search_name="s1", loss="searched", metrics={"AP": new_ap}, spec_json="{}")
    version, was_promoted = tr.register_detector(client, model, new, search_name="s1", ap=new_ap)
    assert was_promoted is promoted
    mv = client.get_model_version(model, version)
    assert mv.tags[tr.SEARCH_NAME] == "s1" and float(mv.tags["AP"]) == new_ap
    champ = tr.champion_version(client, model)
    assert (str(champ.version) == version) is promoted
    # idempotent: a retried step registers no second version
    assert tr.register_detector(client, model, new, search_name="s1", ap=new_ap)[0] == version
    assert len(client.search_model_versions(f"name = '{model}'")) == (1 if champion_ap is None else 2)


def test_register_without_promote_leaves_champion(client):
    parent = _search_run(client)
    run = tr.log_final(client, parent, search_name="s1", loss="searched", metrics={"AP": 0.9}, spec_json="{}")
    version, promoted = tr.register_detector(client, "m-np", run, search_name="s1", ap=0.9, promote=False)
    assert not promoted and tr.champion_version(client, "m-np") is None
    assert tr.promote_if_better(client, "m-np", version, 0.9)
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
    version, promoted = tr.register_detector(client, "m-server", final, search_name="s-server", ap=0.5)
    assert promoted and str(tr.champion_version(client, "m-server").version) == version
    keys = [o["Key"] for o in mlflow_server.s3.client().list_objects_v2(Bucket=mlflow_server.artifact_bucket)["Contents"]]
    assert any(k.endswith(f"{final}/artifacts/model/loss_spec.json") for k in keys), keys
    # the registry contract paploss retrain relies on: models:/name/version/loss_spec.json
    from mlflow.artifacts import download_artifacts

    path = download_artifacts(artifact_uri=f"models:/m-server/{version}/loss_spec.json",
                              tracking_uri=mlflow_server.uri)
    assert json.loads(open(path).read()) == {"form": "searched"}
    assert os.environ["AWS_ENDPOINT_URL"] == mlflow_server.s3.endpoint
