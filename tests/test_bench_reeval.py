"""``bench.reeval``: a search's best samples trained again with other seeds, paired with a baseline."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from bench import reeval
from paploss.spec import LossSpec
from tests.test_engine import learnable  # noqa: F401  (fixture: a small shapes set and its warm start)


class _InThisProcess:
    """Stands in for ``bench.reeval``'s spawned process pool: each job runs in this
    process when submitted (a spawned worker imports torch again, about 5 s a call)."""

    def __init__(self, max_workers=None, mp_context=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        import concurrent.futures as cf

        fut = cf.Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed on through the future, as the pool does
            fut.set_exception(exc)
        return fut


def _search(folder, rewards, inputs=None, failed=()):
    """A benchmark search folder with one trial per reward (round i, sample 0)."""
    (folder / "trials").mkdir(parents=True)
    (folder / "bench-inputs.json").write_text(json.dumps(inputs or {"data": "d", "init": "i", "proxy": {}}))
    for i, r in enumerate(rewards):
        spec = LossSpec.handcrafted("linear" if i % 2 else "square")
        (folder / "trials" / f"r{i:03d}-s00.json").write_text(json.dumps({
            "round": i, "sample": 0, "seed": 0, "reward": None if i in failed else r, "failed": i in failed,
            "spec": spec.to_json()}))
    return folder


def test_trials_come_best_first_without_failed_ones(tmp_path):
    folder = _search(tmp_path / "s", [0.3, 0.5, 0.1, 0.9], failed=(3,))
    # a result kept aside when a selection run again took its name: not a trial of its own
    (folder / "trials" / "r001-s00-0123456789abcdef.json").write_text((folder / "trials" / "r001-s00.json").read_text())
    inputs, trials = reeval.load_trials(str(folder))
    assert inputs["data"] == "d"
    assert [reeval.trial_name(t) for t in trials] == ["r001-s00", "r000-s00", "r002-s00"]


def test_a_folder_that_is_no_search_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="bench-inputs.json does not exist"):
        reeval.load_trials(str(tmp_path))
    _search(tmp_path / "empty", [0.2], failed=(0,))
    with pytest.raises(SystemExit, match="holds no finished trial"):
        reeval.load_trials(str(tmp_path / "empty"))


def test_summary_pairs_each_sample_with_the_baseline_seed_by_seed():
    runs = [{"loss": n, "seed": s, "metrics": {"AP": ap}} for n, s, ap in [
        ("square", 1, 0.30), ("square", 2, 0.40), ("square", 3, 0.35),
        ("a", 1, 0.33), ("a", 2, 0.41), ("a", 3, 0.36),
        ("b", 1, 0.20), ("b", 2, 0.30),  # seed 3 missing: the table keeps seeds 1, 2 only
    ]]
    report = {"runs": runs, "candidates": ["a", "b"], "search_rewards": {"a": 0.5, "b": 0.4}}
    rows, table = reeval.summarize(report, "square")
    by = {r["loss"]: r for r in rows}
    assert by["a"]["seeds"] == [1, 2]
    assert by["a"]["gap"] == pytest.approx(statistics.mean([0.03, 0.01]))
    assert by["a"]["gap_se"] == pytest.approx(statistics.stdev([0.03, 0.01]) / math.sqrt(2))
    assert by["b"]["gap"] == pytest.approx(-0.10)
    assert [r["loss"] for r in rows] == ["a", "square", "b"]  # best mean first
    assert "| a | 50.0 | 33.0, 41.0 | 37.0 | +2.0 ± 1.0 |" in table


@pytest.mark.slow  # real trainings
def test_samples_are_trained_again_on_the_search_split_and_cpu_runs_repeat(learnable, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    """The first run in reeval's process pool, the others in this process: the same
    trainings give the same losses and AP in another process."""
    root, backbone = learnable
    proxy = {"preset": "smoke", "iterations": 2, "image_size": 64, "eval_batch_size": 16}
    folder = _search(tmp_path / "bench-shapes-searched-shared", [0.2, 0.6, 0.4],
                     inputs={"data": str(root), "init": backbone, "proxy": proxy, "detector": ""})
    args = ["--search", str(folder), "--top", "1", "--seeds", "3", "--jobs", "1"]
    first = reeval.main([*args, "--out", str(tmp_path / "a.json")])
    monkeypatch.setattr(reeval.cf, "ProcessPoolExecutor", _InThisProcess)
    again = reeval.main([*args, "--out", str(tmp_path / "b.json")])
    assert first["candidates"] == ["r001-s00"] and first["split"] == "search_train -> search_val"
    assert sorted((r["loss"], r["seed"]) for r in first["runs"]) == [("r001-s00", 3), ("square", 3)]
    saved = json.loads((tmp_path / "a.json").read_text())
    assert [r["loss"] for r in saved["summary"]] == [r["loss"] for r in first["summary"]]
    ran = {r["loss"]: (r["final_loss"], r["metrics"]["AP"]) for r in first["runs"]}
    assert ran["square"][0] != ran["r001-s00"][0]  # each sample its own loss
    assert ran == {r["loss"]: (r["final_loss"], r["metrics"]["AP"]) for r in again["runs"]}  # deterministic on the CPU
    final = reeval.main([*args, "--only", "r002-s00", "--baseline", "none", "--final-iterations", "2",
                         "--iterations", "2"])
    assert final["split"] == "train -> val" and [r["loss"] for r in final["runs"]] == ["r002-s00"]


@pytest.mark.slow  # real trainings
def test_split_k_trains_and_scores_on_that_search_split(learnable, tmp_path, capsys):  # noqa: F811
    """``--split K`` (a search with --search-splits): the trainings read split K's
    annotation files, so the baseline's training loss differs from split 0's; a split the data
    lacks is refused by name before anything trains."""
    import shutil

    from paploss.data import search_split

    root, backbone = learnable
    data = tmp_path / "data"
    shutil.copytree(root, data)
    search_split(data, seed=1, suffix="-1")
    proxy = {"preset": "smoke", "iterations": 2, "image_size": 64, "eval_batch_size": 16}
    folder = _search(tmp_path / "bench-shapes-searched", [0.2],
                     inputs={"data": str(data), "init": backbone, "proxy": proxy, "detector": ""})
    args = ["--search", str(folder), "--top", "0", "--seeds", "1", "--jobs", "1"]
    zero, one = reeval.main(args), reeval.main([*args, "--split", "1"])
    assert one["split"] == "search_train-1 -> search_val-1" and zero["split"] == "search_train -> search_val"
    assert one["runs"][0]["final_loss"] != zero["runs"][0]["final_loss"]  # other training images
    assert zero["runs"][0]["final_loss"] == reeval.main(args)["runs"][0]["final_loss"]  # not run-to-run noise
    with pytest.raises(SystemExit):
        reeval.main([*args, "--split", "2"])
    assert f"--split 2: {data} has no annotations/search_val-2.json" in capsys.readouterr().err


@pytest.mark.slow  # real trainings
def test_the_baseline_alone_across_warm_starts_trains_seed_s_from_warm_start_s_mod_n(learnable, tmp_path):  # noqa: F811
    root, backbone = learnable
    other = tmp_path / "other-backbone.pt"
    other.write_bytes(open(backbone, "rb").read())
    proxy = {"preset": "smoke", "iterations": 2, "image_size": 64, "eval_batch_size": 16}
    folder = _search(tmp_path / "bench-shapes-searched", [0.2, 0.6],
                     inputs={"data": str(root), "init": "not-used.pt", "proxy": proxy, "detector": ""})
    rep = reeval.main(["--search", str(folder), "--top", "0", "--seeds", "1", "2", "3", "--jobs", "1",
                       "--inits", backbone, str(other)])
    assert rep["candidates"] == [] and rep["inits"] == [backbone, str(other)]
    assert sorted((r["loss"], r["seed"], r["init"]) for r in rep["runs"]) == [
        ("square", 1, str(other)), ("square", 2, backbone), ("square", 3, str(other))]
    assert [r["loss"] for r in rep["summary"]] == ["square"]


def test_bad_options_are_refused_by_name(tmp_path, capsys):
    folder = _search(tmp_path / "s", [0.3])
    with pytest.raises(SystemExit):
        reeval.main(["--search", str(folder), "--only", "r009-s00"])
    assert "--only ['r009-s00']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reeval.main(["--search", str(folder), "--baseline", "cubic"])
    assert "'cubic' is not a handcrafted form" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reeval.main(["--search", str(folder), "--top", "0", "--baseline", "none"])
    assert "--top 0 with --baseline none trains nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reeval.main(["--search", str(folder), "--split", "3"])
    assert "--split 3: d has no annotations/search_val-3.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reeval.main(["--search", str(folder), "--inits", str(tmp_path / "gone.pt")])
    assert f"--inits ['{tmp_path / 'gone.pt'}']: no such file" in capsys.readouterr().err
    for text, message in [("{detach", "is not JSON"), ("[1]", "must be a JSON object"),
                          ('{"detach_u": true}', "['detach_u'] are not TrainConfig fields")]:
        with pytest.raises(SystemExit):
            reeval.main(["--search", str(folder), "--train", text])
        assert message in capsys.readouterr().err


@pytest.mark.slow  # real trainings
def test_extra_training_fields_reach_every_training_and_the_report(learnable, tmp_path):  # noqa: F811
    """--train '{"detach_i3": true}': every training (sample and baseline) runs with it, the
    report records it, and the runs differ from the SPEC's loss's (the gradient into the
    boxes through I3 is gone); each run records its iterations and whether its boxes collapsed."""
    root, backbone = learnable
    proxy = {"preset": "smoke", "iterations": 3, "image_size": 64, "eval_batch_size": 16}
    folder = _search(tmp_path / "bench-shapes-searched", [0.2, 0.6],
                     inputs={"data": str(root), "init": backbone, "proxy": proxy, "detector": ""})
    args = ["--search", str(folder), "--top", "1", "--seeds", "1", "--jobs", "1"]
    spec = reeval.main(args)
    detached = reeval.main([*args, "--train", '{"detach_i3": true}'])
    assert detached["train"] == {"detach_i3": True} and spec["train"] == {}
    losses = {(r["loss"], r["final_loss"], r["iterations"], r["box_collapsed"]) for r in spec["runs"]}
    assert {r["loss"] for r in detached["runs"]} == {"square", "r001-s00"}
    assert all(r["iterations"] == 3 and not r["box_collapsed"] for r in detached["runs"])
    assert losses.isdisjoint({(r["loss"], r["final_loss"], r["iterations"], r["box_collapsed"])
                              for r in detached["runs"]})
