"""The learning-rate sweep (paploss.steps.lr_sweep): its items, the per-loss options, the
pick on recorded scores, the search's start as a loss, and real short trainings."""

from __future__ import annotations

import json

import pytest

from paploss import flow, presets, steps, storage
from paploss.spec import LossSpec, form_theta


def test_items_are_every_loss_at_every_lr_or_one_per_loss_without_a_sweep():
    assert steps.sweep_items(["searched", "focal+l1"], {"lrs": [0.01, 0.02]}) == [
        "searched@0.01", "searched@0.02", "focal+l1@0.01", "focal+l1@0.02"]
    assert steps.sweep_items(["start"], {}, {"lr": 0.005}) == ["start@0.005"]
    for bad in ({"lrs": [0.01, -1]}, {"lrs": [0.01, 0.01]}, {"lrs": ["fast", 0.01]}):
        with pytest.raises(steps.StepError, match="lr sweep"):
            steps.sweep_items(["start"], bad)


def test_a_baseline_drops_the_pap_only_options_and_every_loss_takes_its_lr():
    final = {"iterations": 10, "detach_i3": True, "box_collapse": 0.2, "lr": 0.01}
    assert steps.loss_options(final, "focal+giou", 0.02) == {"iterations": 10, "lr": 0.02}
    assert steps.loss_options(final, "searched", None) == final
    with pytest.raises(steps.StepError, match="lr=0.0"):
        steps.loss_options(final, "start", 0.0)


def _rows(scores):
    return [json.dumps({"loss": loss, "lr": lr, "score": s, "seconds": 1.0}) for (loss, lr), s in scores.items()]


def test_the_pick_is_each_losss_best_lr_recorded_in_the_search_folder(tmp_path):
    rows = _rows({("searched", 0.01): 0.05, ("searched", 0.02): 0.07, ("focal+l1", 0.01): 0.03,
                  ("focal+l1", 0.02): 0.03, ("start", 0.02): 0.0, ("start", 0.01): 0.01})
    picked = json.loads(steps.lr_pick(rows, str(tmp_path), "s"))
    assert picked == {"focal+l1": 0.01, "searched": 0.02, "start": 0.01}  # a tie goes to the smaller lr
    doc = storage.read_json(str(tmp_path / "searches" / "s" / "lr_sweep.json"))
    assert doc["lrs"] == picked and len(doc["trials"]) == 6
    # nothing trained (fewer than two lrs): every final keeps its own lr
    assert json.loads(steps.lr_pick(_rows({("start", 0.01): None}), str(tmp_path), "t")) == {}
    with pytest.raises(steps.StepError, match="no results"):
        steps.lr_pick([], str(tmp_path), "u")


def test_the_start_is_the_controllers_starting_mean(tmp_path):
    p = presets.get_preset("demo")
    steps.init_search(str(tmp_path), "s", 1, 2, seed=0, controller=p.controller)
    start = LossSpec.from_json(steps.start_spec(str(tmp_path), "s"))
    square = LossSpec.from_theta(form_theta("square"))
    assert start.form == square.form and start.grad_scale == pytest.approx(square.grad_scale)
    assert [x for f in start.points for x in f] == pytest.approx([x for f in square.points for x in f], abs=1e-6)
    with pytest.raises(steps.StepError, match="no first state"):
        steps.start_spec(str(tmp_path), "other")


@pytest.mark.slow
def test_sweep_trainings_score_on_search_val_and_are_found_again(tmp_path):
    """Short real trainings on the smoke data: a baseline and the start at two lrs;
    the same call again finds its result; the flow's finals then train at the picks."""
    p = presets.get_preset("smoke").with_overrides(
        rounds=1, final={"preset": "smoke", "iterations": 2, "detach_i3": True},
        lr_sweep={"lrs": [0.01, 0.03], "iterations": 2, "warmup_iters": 1})
    s = flow.Search(preset=p, work=str(tmp_path), search_name="lr")
    data, init = flow.prepare(s)
    steps.init_search(s.work, s.search_name, 1, 2, seed=0, controller=p.controller)
    lrs = flow.lr_sweep(s, data, init, "", ["start", "focal+l1"])
    assert set(lrs) == {"start", "focal+l1"} and set(lrs.values()) <= {0.01, 0.03}
    trials = storage.read_json(str(tmp_path / "searches" / "lr" / "lr_sweep.json"))["trials"]
    assert sorted((t["loss"], t["lr"]) for t in trials) == [("focal+l1", 0.01), ("focal+l1", 0.03),
                                                            ("start", 0.01), ("start", 0.03)]
    assert all(0.0 <= t["score"] <= 1.0 for t in trials)
    again = json.loads(steps.lr_trial(data, init, "focal+l1@0.03", s.final, p.lr_sweep, s.work, s.search_name))
    first = next(t for t in trials if (t["loss"], t["lr"]) == ("focal+l1", 0.03))
    assert again == first  # found, not trained again (same seconds)
    out = [json.loads(x) for x in flow.finals(s, data, init, "", ["start", "focal+l1"], lrs=lrs)]
    assert [o["loss"] for o in out] == ["start", "focal+l1"]
    assert out[0]["spec"] == steps.start_spec(s.work, s.search_name)
