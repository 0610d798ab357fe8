"""Promote only a winner: the report step decides, against a real MLflow store, whether
the searched detector becomes ``champion`` (better than the champion and not behind a
baseline of the same search, ``focal+l1`` or ``focal+giou``; the search's start is no baseline), says why, and registers a real pyfunc model that
``models:/<name>@champion`` serves."""

from __future__ import annotations

import json

import mlflow.pyfunc
import numpy as np
import pytest
from mlflow import MlflowClient

from paploss import steps
from paploss import tracking as tr
from paploss.data import make_dataset, search_split
from paploss.engine import TrainConfig, train

TINY = dict(detector="retinanet_mobilenet_v3_small", image_size=64, fpn_channels=16, anchor_size=8.0, batch_size=4,
            warmup_iters=2, num_threads=1, eval_batch_size=8)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A sqlite store, a tiny dataset and a real (3-iteration) detector checkpoint."""
    tmp = tmp_path_factory.mktemp("promotion")
    data = make_dataset("shapes", tmp / "shapes", n_train=8, n_val=4, image_size=64, progress=False)
    search_split(data)
    ckpt = train(TrainConfig(data=str(data), iterations=3, out_dir=str(tmp / "ckpt"), **TINY), progress=False).checkpoint
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return {"tmp": tmp, "data": str(data), "ckpt": ckpt, "uri": uri, "client": MlflowClient(uri, uri)}


def _search(env, name: str, model: str, aps: dict, rule: str = "beat-baselines", promote: bool = True) -> dict:
    """A search's finals (APs as fractions, as evaluation gives them) through record_final and the report step."""
    t = {"uri": env["uri"], "experiment": "promo"}
    work = str(env["tmp"] / "work")
    out = steps.init_search(work, name, rounds=1, samples=2, seed=0, tracking=t)
    spec = steps.load_controller(out["state"]).spec().to_json()
    rows = []
    for loss, ap in aps.items():
        searched = loss == "searched"
        result = {"loss": loss, "metrics": {"AP": ap, "AP50": min(1.0, ap + 0.2)}, "seconds": 1.0,
                  "checkpoint": env["ckpt"] if searched else "", "spec": spec if searched else None}
        rows.append({**result, **tr.record_final(t, name, result, data=env["data"], model_name=model,
                                                 register=searched)})
    return json.loads(steps.report(rows, out["state"], work, name, tracking=t, model_name=model, promote=promote,
                                   promote_rule=rule))


def _champion(client, model):
    v = tr.champion_version(client, model)
    return None if v is None else str(v.version)


def test_decide_promotion_rules():
    d = tr.decide_promotion(30.0, {"focal+l1": 20.0, "focal+giou": 22.0}, None)
    assert d["promote"] and d["behind"] == {} and "no champion before" in d["reason"]
    d = tr.decide_promotion(30.0, {"focal+l1": 20.0, "focal+giou": 31.5}, ("4", 25.0))
    assert not d["promote"] and d["behind"] == {"focal+giou": 1.5}
    assert "focal+giou beat it by 1.50 AP (31.50 > 30.00)" in d["reason"] and "focal+l1" not in d["reason"]
    d = tr.decide_promotion(30.0, {"focal+giou": 31.5}, ("4", 25.0), rule="champion")
    assert d["promote"] and "rule champion ignores baselines" in d["reason"]
    d = tr.decide_promotion(30.0, {}, ("4", 30.0))
    assert d["promote"]  # equal to the champion is enough
    d = tr.decide_promotion(29.0, {"focal+l1": 10.0}, ("4", 30.0), rule="champion")
    assert not d["promote"] and "behind champion version 4 by 1.00 AP" in d["reason"]
    with pytest.raises(ValueError, match="promote rule 'best'"):
        tr.decide_promotion(1.0, {}, None, rule="best")


def test_no_champion_yet_and_better_than_the_baselines(env):
    """Promoted; the parent run says so with the AP table and the figure; the version
    is a pyfunc that models:/name@champion serves, with its lineage as tags."""
    client, model = env["client"], "m-first"
    report = _search(env, "p1", model, {"searched": 0.30, "focal+l1": 0.20, "focal+giou": 0.22})
    assert report["promoted"] is True and report["promotion"]["reason"].startswith("promoted: AP 30.00")
    assert _champion(client, model) == report["model_version"] == "1"

    parent = tr.find_search_run(client, "promo", "p1")
    assert parent.info.status == "FINISHED"
    note = parent.data.tags["mlflow.note.content"]
    assert "| searched | 30.00 | 50.00 |" in note and "| focal+giou | 22.00 | 42.00 |" in note
    assert f"get-artifact?path=functions.png&run_uuid={parent.info.run_id}" in note and "**promoted:" in note
    assert parent.data.metrics["AP.searched"] == pytest.approx(30.0)
    assert parent.data.metrics["AP.focal_giou"] == pytest.approx(22.0)
    report_json = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="report.json", tracking_uri=env["uri"])).read())
    assert report_json["promotion"]["promote"] is True

    mv = client.get_model_version(model, "1")
    assert mv.tags["AP"] == "30.0" and mv.tags[tr.AP_UNIT_TAG] == tr.AP_UNIT
    assert json.loads(mv.tags[tr.BASELINES_TAG]) == {"focal+l1": 20.0, "focal+giou": 22.0}
    assert len(mv.tags["paploss.data_digest"]) == 16 and mv.tags["paploss.git_commit"]
    assert json.loads(mv.tags["paploss.loss_spec"])["form"] and mv.tags["paploss.image"]
    final = client.get_run(mv.run_id)
    assert final.info.run_name == "final searched" and final.data.tags["paploss.data_digest"] == mv.tags[
        "paploss.data_digest"]

    import os

    os.environ["MLFLOW_TRACKING_URI"] = env["uri"]
    try:
        served = mlflow.pyfunc.load_model(f"models:/{model}@champion")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = served.predict(images, params={"score_threshold": 0.0})
    assert len(out) == 2 and all(o["boxes"].shape == (len(o["scores"]), 4) for o in out)
    assert sum(len(o["scores"]) for o in out) > 0


def test_worse_than_a_baseline_is_registered_without_the_alias(env):
    """Ahead of the champion but behind focal+giou: version 2 exists, champion stays 1,
    the report names the baseline and the gap; the champion rule would have promoted it."""
    client, model = env["client"], "m-first"
    report = _search(env, "p2", model, {"searched": 0.35, "focal+l1": 0.20, "focal+giou": 0.40})
    assert report["promoted"] is False and report["model_version"] == "2"
    assert "focal+giou beat it by 5.00 AP (40.00 > 35.00)" in report["promotion"]["reason"]
    assert _champion(client, model) == "1"
    assert client.get_model_version(model, "2").aliases == []
    assert "not promoted" in tr.find_search_run(client, "promo", "p2").data.tags["mlflow.note.content"]
    report = _search(env, "p2", model, {"searched": 0.35, "focal+l1": 0.20, "focal+giou": 0.40}, rule="champion")
    assert report["promoted"] is True and _champion(client, model) == "2"  # the same version, no third one
    assert len(client.search_model_versions(f"name = '{model}'")) == 2


def test_behind_the_champion_is_not_promoted(env):
    client, model = env["client"], "m-first"
    held = _champion(client, model)
    report = _search(env, "p3", model, {"searched": 0.25, "focal+l1": 0.10, "focal+giou": 0.12})
    assert report["promoted"] is False and _champion(client, model) == held
    assert f"behind champion version {held} by 10.00 AP" in report["promotion"]["reason"]


def test_no_champion_yet_but_behind_a_baseline(env):
    client, model = env["client"], "m-none"
    report = _search(env, "p4", model, {"searched": 0.10, "focal+l1": 0.20, "focal+giou": 0.15})
    assert report["promoted"] is False and _champion(client, model) is None
    reason = report["promotion"]["reason"]
    assert "focal+l1 beat it by 10.00 AP" in reason and "focal+giou beat it by 5.00 AP" in reason
    assert len(client.search_model_versions(f"name = '{model}'")) == 1


def test_behind_its_start_but_ahead_of_the_baselines_is_promoted(env):
    """The search's starting loss is a row of the table, not a baseline of the rule: the
    searched detector 0.5 AP behind its start but ahead of both baselines is promoted, and
    the rule's baselines (the version's tag) hold the baselines only."""
    from paploss.steps.lr_sweep import START

    assert START == tr.START_FINAL
    client, model = env["client"], "m-start"
    report = _search(env, "p7", model, {"searched": 0.30, "start": 0.305, "focal+l1": 0.20, "focal+giou": 0.22})
    assert report["promoted"] is True and _champion(client, model) == report["model_version"]
    assert "start" not in report["promotion"]["reason"] and report["promotion"]["behind"] == {}
    assert json.loads(client.get_model_version(model, report["model_version"]).tags[tr.BASELINES_TAG]) == {
        "focal+l1": 20.0, "focal+giou": 22.0}


def test_an_old_champion_in_fractions_compares_in_the_one_unit(env):
    """A champion registered before AP x 100 holds AP=0.5 (a fraction): a new 45.00 is behind its 50.00."""
    client, model = env["client"], "m-legacy"
    client.create_registered_model(model)
    run = client.create_run(client.get_experiment_by_name("promo").experiment_id)
    old = client.create_model_version(model, source="runs:/x/model", run_id=run.info.run_id, tags={"AP": "0.5"})
    tr.set_champion(client, model, old.version)
    report = _search(env, "p5", model, {"searched": 0.45, "focal+l1": 0.20, "focal+giou": 0.22})
    assert report["promoted"] is False and _champion(client, model) == str(old.version)
    assert "(45.00 < 50.00)" in report["promotion"]["reason"]


def test_promotion_off_registers_and_says_so(env):
    client, model = env["client"], "m-off"
    report = _search(env, "p6", model, {"searched": 0.30, "focal+l1": 0.20, "focal+giou": 0.22}, promote=False)
    assert report["promoted"] is False and _champion(client, model) is None
    assert report["promotion"]["reason"].startswith("would be promoted, but promotion is off")


def test_kfp_report_outputs(env):
    """What the report task writes to KFP's Metrics and Markdown outputs."""
    table = {"search_name": "k", "rounds": 2, "failed_trials": 0, "model_version": "3",
             "final": {"searched": {"AP": 0.3, "AP50": 0.5, "AP75": -1.0}, "focal+l1": {"AP": 0.2, "AP50": 0.4}},
             "promotion": {"reason": "promoted: AP 30.00, no champion before"}}
    metrics, markdown = steps.report_outputs(json.dumps(table))
    assert metrics == pytest.approx({"AP.searched": 30.0, "AP50.searched": 50.0, "AP.focal+l1": 20.0,
                                     "AP50.focal+l1": 40.0})
    assert "| searched | 30.00 | 50.00 | - |" in markdown and "**promoted: AP 30.00" in markdown
