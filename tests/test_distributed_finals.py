"""A final training handed elsewhere (a TrainJob on a cluster) gives the result a local
one gives: the same options reach ``paploss train`` (through the flags the TrainJob
passes), and the result is read back from what the training wrote to its folder.

The "elsewhere" here is ``paploss train`` itself, run from the arguments
``pipelines.trainjob`` would put in the TrainJob; the Kubernetes part is tested
against a loopback API in tests/test_trainjob.py."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from paploss import flow, presets, steps
from paploss.spec import LossSpec


@pytest.mark.slow
def test_a_final_trained_through_paploss_train_flags_equals_the_local_one(tmp_path):
    from pipelines import trainjob

    from paploss.cli import main

    p = presets.get_preset("smoke").with_overrides(final={"preset": "smoke", "iterations": 3})
    s = flow.Search(preset=p, work=str(tmp_path / "work"), search_name="elsewhere")
    data, init = flow.prepare(s)
    seen = []

    def through_the_cli(options: dict) -> dict:
        seen.append(options)
        args = trainjob.train_args_from_options({**options, "quiet": True})
        result = CliRunner().invoke(main, ["train", *args])
        assert result.exit_code == 0, result.output
        return trainjob.read_result(args)

    square = LossSpec.handcrafted("square").to_json()
    for loss, spec in (("focal+l1", ""), ("square", square)):
        here = json.loads(steps.final_train(data, init, loss, s.final, s.work, "here", seed=0, spec=spec))
        there = json.loads(steps.final_train(data, init, loss, s.final, s.work, "there", seed=0, spec=spec,
                                             trainer=through_the_cli))
        assert there["metrics"] == here["metrics"] and there["diverged"] == here["diverged"]
        assert there["checkpoint"].endswith(f"/searches/there/final/{loss}/checkpoint.pt")
    assert seen[1]["spec"].endswith("/searches/there/final/square/spec.json") and seen[1]["loss"] == "paploss"
    assert seen[0]["data"] == data and seen[0]["init"] == init and seen[0]["out_dir"].endswith("final/focal+l1")


def test_a_trainer_that_returns_no_metrics_is_a_failure_naming_the_loss(tmp_path):
    p = presets.get_preset("smoke")
    with pytest.raises(steps.SearchFailed, match="final training of focal\\+l1 elsewhere returned no metrics"):
        steps.final_train("unused-data", "", "focal+l1", steps.train_options(p.final), str(tmp_path), "x",
                          trainer=lambda options: {"diverged": False})
