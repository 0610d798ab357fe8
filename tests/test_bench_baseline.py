"""bench.baseline: a handcrafted loss trained as a search's proxy trials were, and the
search's rewards set against it (``python -m bench.search --reward-baseline``). The training
itself, against ``bench.reeval``'s as its twin, is in the slow bench test of
tests/test_bench_search.py."""

from __future__ import annotations

import json
import statistics

import pytest

from bench import baseline
from bench.search import BenchConfig
from paploss import steps, storage


def _search(work: str, name: str, rewards: list[list[float]], **options) -> str:
    """A real search state after ``len(rewards)`` rounds, round r's samples given ``rewards[r]``
    (each sample's reward seeds all given its reward)."""
    out = steps.init_search(work, name, rounds=len(rewards), samples=len(rewards[0]), seed=3, **options)
    n = options.get("reward_seeds", 1)
    for got in rewards:
        results = [json.dumps({**json.loads(t), "reward": got[json.loads(t)["sample"] // n], "failed": False,
                               "error": ""}) for t in out["trials"]]
        out = steps.controller_update(out["state"], results, work, name)
    return out["state"]


def test_runs_are_each_round_s_trainings_and_the_selection_s(tmp_path):
    """Round r's runs: its seeds, its split, the j-th reward seed from warm start j mod N;
    the selection's: seed s from warm start s mod N on the selection's split."""
    state = _search(str(tmp_path), "s", [[0.1, 0.2], [0.3, 0.1], [0.2, 0.2]], reward_seeds=2, search_splits=2)
    rounds = baseline.round_runs(state, ["w0", "w1"])
    assert rounds == [[("w0", 3, 0), ("w1", 1003, 0)], [("w0", 3, 1), ("w1", 1003, 1)],
                      [("w0", 3, 0), ("w1", 1003, 0)]]
    assert baseline.round_runs(state, ["w0"]) == [[(w.replace("w1", "w0"), s, k) for w, s, k in r] for r in rounds]
    assert baseline.selection_runs(state, ["w0", "w1", "w2"], [1, 2, 3]) == {
        1: ("w1", 1, 1), 2: ("w2", 2, 1), 3: ("w0", 3, 1)}  # 3 rounds mod 2 splits


def test_gaps_set_each_round_and_candidate_against_the_baseline_trained_as_they_were(tmp_path):
    """Each round's mean and best reward minus the baseline's (its mean over the round's
    trainings, as a sample's reward is the mean over its seeds), the samples above it,
    and each selection candidate's mean gap over the selection's seeds; a missing or
    diverged baseline training leaves its round out, not the others."""
    work = str(tmp_path)
    rewards = [[0.10, 0.30, 0.20], [0.25, 0.15, 0.40]]
    state = _search(work, "g", rewards, search_splits=2)
    rounds = baseline.round_runs(state, ["w0"])
    trials = [json.loads(t) for t in steps.selection_trials(state, 2, [1, 2])]
    picked = {(0, 1): 0.42, (0, 2): 0.38, (1, 1): 0.30, (1, 2): 0.34}
    selected = steps.select_loss(state, [json.dumps({**t, "reward": picked[(t["candidate"], t["seed"])],
                                                     "failed": False}) for t in trials], work, "g")
    selection = baseline.selection_runs(selected, ["w0"], [1, 2])
    base = {("w0", 3, 0): 0.18, ("w0", 3, 1): 0.30, ("w0", 1, 0): 0.33, ("w0", 2, 0): 0.37}
    doc = storage.read_json(selected)
    got = baseline.gaps(doc, rounds, selection, base)
    r1, r2 = got["rounds"]
    assert r1 == pytest.approx({"baseline": 0.18, "mean": 0.20 - 0.18, "best": 0.30 - 0.18, "above": 2, "samples": 3})
    assert r2 == pytest.approx({"baseline": 0.30, "mean": statistics.mean(rewards[1]) - 0.30, "best": 0.10,
                                "above": 1, "samples": 3})
    # candidate 0 trained 0.42 and 0.38 against 0.33 and 0.37; candidate 1 0.30 and 0.34
    assert got["candidates"] == pytest.approx([(0.09 + 0.01) / 2, (-0.03 - 0.03) / 2])
    partial = baseline.gaps(doc, rounds, selection, {**base, ("w0", 3, 1): None, ("w0", 2, 0): None})
    assert partial["rounds"][0] == r1 and partial["rounds"][1] is None and partial["candidates"] == [None, None]
    own = storage.read_json(state)  # the search's own state: no selection in it
    assert baseline.gaps(own, rounds, {}, base)["candidates"] == []

    text = baseline.gaps_text("square", {"searched on digits": got})
    assert "| searched on digits | 1 | 18.00 | +2.00 | +12.00 | 2/3 |" in text
    assert "| searched on digits | 2 | 30.00 | -3.33 | +10.00 | 1/3 |" in text
    assert "- searched on digits: +5.00, -3.00" in text
    assert "| 2 | – | – | – | – |" in baseline.gaps_text("square", {"x": partial})
    assert baseline.gaps_text("square", {}) == ""


def test_a_cached_baseline_is_found_only_for_its_own_inputs(tmp_path):
    """The cache key holds the form, the warm start, the seed, the split and the proxy's
    options: a result is found again under the same ones, and under no other."""
    cfg = BenchConfig(work=str(tmp_path), rounds=1, samples=2)
    p = cfg.preset("shapes")
    work, data = str(tmp_path / "shapes"), str(tmp_path / "shapes" / "data" / "d")
    run = (str(tmp_path / "ws0.pt"), 0, 1)
    key, uri, done = baseline.cached(p, data, run, "square", work)
    assert done is None and uri.startswith(str(tmp_path / "shapes" / "baseline" / "square-split1-seed0-"))
    storage.write_json(uri, {"key": key, "reward": 0.25})
    assert baseline.cached(p, data, run, "square", work)[2]["reward"] == 0.25
    assert baseline.measure(None, p, data, work, "square", [run, run]) == {run: 0.25}
    for other in [(run, "linear", p), ((run[0], 1, 1), "square", p), ((run[0], 0, 2), "square", p),
                  ((str(tmp_path / "ws1.pt"), 0, 1), "square", p),
                  (run, "square", p.with_overrides(proxy={**p.proxy, "detach_i3": True}))]:
        assert baseline.cached(other[2], data, other[0], other[1], work)[2] is None, other
    assert baseline.measure(None, p, data, work, "linear", [run]) == {run: None}


def test_config_and_cli_take_a_handcrafted_form_only(tmp_path):
    from click.testing import CliRunner

    from bench.search import bench

    assert BenchConfig(reward_baseline="square").reward_baseline == "square"
    with pytest.raises(ValueError, match=r"reward_baseline='focal\+l1' is not a handcrafted form"):
        BenchConfig(reward_baseline="focal+l1")
    res = CliRunner().invoke(bench, ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--report-only",
                                     "--tracking-uri", "", "--reward-baseline", "cube"])
    assert res.exit_code == 2 and "'cube' is not one of" in res.output, res.output


@pytest.mark.parametrize("reward_seeds, search_splits", [(1, 1), (2, 3), (3, 2)])
def test_round_trainings_are_the_trainings_each_round_s_trials_had(tmp_path, reward_seeds, search_splits):
    """``round_trainings``: per finished round, the (seed, split, repeat) of the trials
    the round actually handed out (read off its trials' JSON, the obvious twin), one
    entry per reward seed; ``selection_split``: the split ``selection_trials`` gives."""
    work, name = str(tmp_path), f"rt-{reward_seeds}-{search_splits}"
    out = steps.init_search(work, name, rounds=4, samples=2, seed=7, reward_seeds=reward_seeds,
                            search_splits=search_splits)
    handed = []
    for _ in range(4):
        trials = [json.loads(t) for t in out["trials"]]
        handed.append(sorted({(t["seed"], t.get("split", 0), t.get("repeat", 0)) for t in trials}))
        results = [json.dumps({**t, "reward": 0.1 * i, "failed": False, "error": ""}) for i, t in enumerate(trials)]
        out = steps.controller_update(out["state"], results, work, name)
        got = baseline.round_trainings(out["state"])
        assert [sorted((x["seed"], x["split"], x["repeat"]) for x in rnd) for rnd in got] == handed
    assert all(len(rnd) == reward_seeds for rnd in handed)
    picked = {json.loads(t).get("split", 0) for t in steps.selection_trials(out["state"], 2, [1, 2])}
    assert picked == {baseline.selection_split(out["state"])} == {4 % search_splits}
