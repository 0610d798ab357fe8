"""The search flow is written once: the compiled KFP pipeline's tasks and the
in-process run's stages are the same list, :data:`paploss.flow.STAGES`."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from paploss import flow, presets, steps

STEP_OF_STAGE = {stage: stage.replace("-", "_") for stage in flow.STAGES}  # prepare-data -> steps.prepare_data


def _compiled_tasks(tmp_path, select_top: int) -> set[str]:
    """The component names of every task in the compiled pipeline, sub-pipelines unfolded."""
    from pipelines.compile import compile_pipeline

    path = compile_pipeline(str(tmp_path / "p.yaml"), preset="smoke", select_top=select_top)
    spec = next(yaml.safe_load_all(open(path)))  # the second document is the platform spec
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    names = set()
    for dag in dags:
        for task in dag["tasks"].values():
            comp = spec["components"][task["componentRef"]["name"]]
            if "executorLabel" in comp:  # a container task, not a sub-pipeline
                names.add(re.sub(r"-\d+$", "", task["componentRef"]["name"].removeprefix("comp-")))
    return names


def test_every_stage_is_a_step_function():
    assert all(callable(getattr(steps, fn)) for fn in STEP_OF_STAGE.values())


def test_the_compiled_pipeline_has_exactly_the_flows_tasks(tmp_path):
    assert _compiled_tasks(tmp_path, select_top=1) == set(flow.STAGES)
    without = set(flow.STAGES) - {"selection-trials", "select-loss"}
    assert _compiled_tasks(tmp_path, select_top=0) == without


@pytest.mark.slow
def test_the_in_process_run_walks_the_stages_in_order(tmp_path, monkeypatch):
    """A real smoke search in this process (no MLflow), each step spied on, not replaced."""
    seen: list[str] = []
    for stage, fn in STEP_OF_STAGE.items():
        real = getattr(steps, fn)

        def spy(*args, _real=real, _stage=stage, **kwargs):
            seen.append(_stage)
            return _real(*args, **kwargs)

        monkeypatch.setattr(steps, fn, spy)
    p = presets.get_preset("smoke").with_overrides(rounds=1, select_top=1, select_seeds=[1])
    s = flow.Search(preset=p, work=str(tmp_path), search_name="flow")
    report = flow.run(s)
    first = list(dict.fromkeys(seen))
    assert first == list(flow.STAGES)
    losses = flow.final_losses(s)
    assert losses == (steps.SEARCHED, steps.START, *steps.BASELINES)
    assert seen.count("proxy-trial") == p.samples + 1 and seen.count("final-train") == len(losses)
    assert seen.count("lr-trial") == len(losses) * len(p.lr_sweep["lrs"])
    assert set(report["final"]) == set(losses)


@pytest.mark.slow
def test_finals_train_any_named_loss_with_its_seed_apart(tmp_path):
    """The benchmark's finals go through the flow: a handcrafted form by its spec, and
    a baseline with two seeds, each kept in its own result; a spec for a baseline, or
    none for an unknown name, is refused before training."""
    from paploss.spec import LossSpec

    p = presets.get_preset("smoke").with_overrides(final={"preset": "smoke", "iterations": 2})
    s = flow.Search(preset=p, work=str(tmp_path), search_name="finals")
    data, init = flow.prepare(s)
    square = LossSpec.handcrafted("square").to_json()
    out = [json.loads(x) for x in flow.finals(s, data, init, "", [
        flow.Final("square", spec=square), flow.Final("focal+l1", seed=1, tag="-s1"),
        flow.Final("focal+l1", seed=2, tag="-s2")])]
    assert [o["loss"] for o in out] == ["square", "focal+l1", "focal+l1"] and out[0]["spec"] == square
    assert out[1]["key"] != out[2]["key"]
    finals_dir = tmp_path / "searches" / "finals" / "final"
    assert {f.name for f in finals_dir.glob("*.json")} == {"square.json", "focal+l1-s1.json", "focal+l1-s2.json"}
    with pytest.raises(steps.StepError, match="takes no spec"):
        flow.finals(s, data, init, "", [flow.Final("focal+l1", spec=square)])
    with pytest.raises(steps.StepError, match="give its spec"):
        flow.finals(s, data, init, "", [flow.Final("cube")])
