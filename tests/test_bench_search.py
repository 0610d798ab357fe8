"""The search-quality benchmark's own correctness (issue 8): the table, the input
checks, and that every loss is trained and evaluated the same way, on val, never on
search-val."""

from __future__ import annotations

import dataclasses
import json
import re
import os
from pathlib import Path

import pytest
import torch

from bench.search import (LOSSES, BenchConfig, _loss_specs, selection_text, goal_check, goal_lines, goal_text, mu_travel,
                          reward_table, split_scale, summarize)
from paploss import presets, steps, storage
from paploss.search import Controller
from paploss.spec import LossSpec, form_theta


class _Built(Exception):
    pass


def final_config(p, data, init, loss, spec, seed, work="w"):
    """The TrainConfig a bench final of ``loss`` and ``seed`` trains with: the one
    ``steps.final_train`` builds, going through ``bench.search.run_finals``'s flow
    (caught before it trains)."""
    import bench.search as B
    from unittest import mock

    seen = []

    def build(cfg, on_step=None):
        seen.append(cfg)
        raise _Built

    job = B.final_jobs([seed], [loss], {loss: spec}, [init])[(loss, seed)]
    with mock.patch("paploss.steps.finals._run_training", build), pytest.raises(_Built):
        B.run_finals(_InOrder((init,)), p, data, str(work), {(loss, seed): job})
    return dataclasses.replace(seen[0], out_dir=None)  # a temporary folder for its checkpoint


@pytest.mark.parametrize("detach_i3", [False, True])
@pytest.mark.parametrize("loss", ["square", "focal+l1", "square@g1.8"])
def test_a_final_trains_the_config_the_benchmark_trained_before_the_flow(tmp_path, loss, detach_i3):
    """The twin of the finals before they went through ``paploss.flow``: the preset's
    final options (less ``detach_i3`` for a baseline) on train, scored on val, the
    loss's spec, the warm start and the seed; the flow's final trains that config."""
    from paploss.engine import TrainConfig

    cfg = BenchConfig(detach_i3=detach_i3, final_iterations=400)
    p = cfg.preset("digits")
    data, init = str(tmp_path / "data"), storage.write_bytes(str(tmp_path / "init.pt"), b"a path passed on")
    (tmp_path / "data").mkdir()
    spec = _loss_specs(cfg, "digits", {}, [loss])[loss]
    options = dict(p.final) if spec else {k: v for k, v in p.final.items() if k != "detach_i3"}
    before = TrainConfig(**{**steps.train_options(options, p.detector), "data": str(storage.localize(data)),
                            "train_ann": "train", "val_ann": "val", "loss": "paploss" if spec else loss,
                            "spec": LossSpec.from_json(spec) if spec else None, "init": str(storage.localize(init)),
                            "seed": 2, "out_dir": None})
    assert final_config(p, data, init, loss, spec, 2, work=str(tmp_path)) == before


class _InOrder:
    """A flow Map of bench's WarmStarts rule that runs the tasks here, one after another."""

    def __init__(self, inits):
        import bench.search as B

        self.m = B.WarmStarts(None, finals=tuple(inits))
        self.finals = self.m.finals

    def __call__(self, fn, items):
        import bench.search as B

        return [B._with_init(fn, self.m.init_of(item))(item) for item in items]


def test_summarize_mean_and_std_in_ap_points():
    table = summarize({"shapes": {"focal+l1": {"AP": [0.4, 0.5, 0.6], "AP50": [0.7], "AP75": []}}})
    row = next(line for line in table.splitlines() if line.startswith("| focal+l1"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["focal+l1", "3", "50.0 ± 10.0", "70.0", "–"]
    assert "### shapes" in table


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"losses": ("searched", "cross-entropy")}, "cross-entropy"),
        ({"datasets": ("shapes", "coco")}, "coco"),
        ({"datasets": ("shapes",)}, "transfer"),
        ({"datasets": ("shapes",), "losses": ("square", "transfer-shared")},
         "loss 'transfer-shared' trains the searched-shared loss found on digits, which this run does not benchmark: "
         "add it to --datasets, or give that loss as --loss-file digits:searched-shared=FILE"),
        ({"samples": 1}, "samples=1"),
        ({"rounds": 0}, "rounds=0"),
        ({"seeds": ()}, "seeds=()"),
        ({"n_train": 0}, "n_train=0"),
        ({"final_iterations": -5}, "final_iterations=-5"),
        ({"pretrain_iterations": 0}, "pretrain_iterations=0 must be >= 1"),
        ({"sigma": 0.0}, "sigma=0.0"),
        ({"start": "sigmoid"}, "start 'sigmoid' is neither a form"),
        ({"losses": ("square@g20",)}, "'square@g20'"),
        ({"losses": ("focal+l1@g2",)}, "'focal\\+l1@g2'"),
        ({"losses": ("square@gbig",)}, "'square@gbig'"),
        ({"select_top": -2}, "select_top=-2"),
        ({"select_top": 2, "select_seeds": (3, 0)}, "holds the search's trial seed 0"),
        ({"select_top": 2, "select_rank": "best"}, "select_rank='best' is not one of"),
        ({"warm_starts": 0}, "warm_starts=0"),
        ({"box_collapse": 1.0}, "box_collapse=1.0 must be a box quality in (0, 1)"),
        ({"search_tag": "r6/long"}, "search_tag='r6/long' must be 1-40 letters"),
        ({"search_tag": "-r6"}, "search_tag='-r6'"),
        ({"reward_seeds": 0}, "reward_seeds=0 is out of range"),
        ({"search_splits": 17}, "search_splits=17 is out of range"),
        ({"search_val_fraction": 0.0}, "search_val_fraction=0.0 must be in (0, 1)"),
    ],
)
def test_config_rejects_bad_values_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BenchConfig(**kwargs)


@pytest.mark.parametrize("losses, modes", [
    (("square", "focal+l1"), []),
    (("transfer", "square"), ["searched"]),
    (("transfer-shared",), ["searched-shared"]),
    (("searched-shared@g1", "transfer"), ["searched", "searched-shared"]),
])
def test_a_run_searches_what_its_losses_and_transfers_need(losses, modes):
    assert BenchConfig(losses=losses).searches() == {"shapes": modes, "digits": modes}


def test_one_dataset_transfers_a_loss_given_for_the_other():
    """With one dataset benchmarked, a transfer loss trains the other dataset's loss
    given as a file: nothing is searched for it, and only the files it needs are taken."""
    given = ("shapes", "searched", "found.json")
    cfg = BenchConfig(datasets=("digits",), losses=("transfer", "square"), loss_files=(given,))
    assert cfg.searches() == {"digits": []}
    spec = LossSpec.from_theta([0.4] * 41).to_json()
    assert _loss_specs(cfg, "digits", {}, given={("shapes", "searched"): spec}) == {
        "transfer": spec, "square": LossSpec.handcrafted("square").to_json()}
    both = BenchConfig(datasets=("digits",), losses=("searched-shared", "transfer"), loss_files=(given,))
    assert both.searches() == {"digits": ["searched-shared"]}
    with pytest.raises(ValueError, match=r"loss file shapes:searched-shared=f.json: loss 'searched-shared' is not "
                                         r"taken by a transfer loss"):
        BenchConfig(datasets=("digits",), losses=("transfer", "square"),
                    loss_files=(given, ("shapes", "searched-shared", "f.json")))
    with pytest.raises(ValueError, match=r"loss file shapes:searched=found.json: dataset 'shapes' is not benchmarked"):
        BenchConfig(datasets=("digits",), losses=("searched", "square"), loss_files=(given,))


def test_goal_check_needs_the_margin_and_separated_seeds():
    hand = {f: {"AP": [0.10, 0.11, 0.12]} for f in ("sigmoid", "sqrt", "linear")}
    results = {
        # +3 AP and every searched seed above every focal seed; above every handcrafted form
        "a": {"searched": {"AP": [0.15, 0.16, 0.17]}, "focal+l1": {"AP": [0.12, 0.13, 0.14]},
              "square": {"AP": [0.14, 0.15, 0.16]}, **hand},
        # +3 AP on the mean but the seeds overlap; ties square
        "b": {"searched": {"AP": [0.11, 0.18, 0.19]}, "focal+l1": {"AP": [0.12, 0.13, 0.14]},
              "square": {"AP": [0.11, 0.18, 0.19]}, **hand},
        # separated seeds but only +1 AP; square missing
        "c": {"searched": {"AP": [0.145, 0.14, 0.145]}, "focal+l1": {"AP": [0.13, 0.13, 0.13]}},
    }
    check = goal_check(results)
    assert check["a"]["beats_focal"] is True and check["a"]["beats_handcrafted"] is True
    assert check["a"]["vs_focal"] == pytest.approx(0.03)
    assert check["b"]["beats_focal"] is False and check["b"]["beats_handcrafted"] is False
    assert check["b"]["vs_handcrafted"]["square"] == pytest.approx(0.0)
    assert check["c"]["beats_focal"] is False and check["c"]["beats_handcrafted"] is None
    text = goal_lines(check)
    assert "- a: searched − focal+l1 = +3.0 AP" in text and "square +1.0" in text
    assert "c:" in text and "not measured" in text


def test_goal_check_tells_a_win_over_a_form_from_a_tie_by_the_paired_gaps():
    hand = {f: {"AP": [0.01, 0.01, 0.01]} for f in ("sigmoid", "sqrt", "linear")}
    searched = [0.100, 0.120, 0.090]
    results = {
        # a steady +1 AP on every seed: a win
        "win": {"searched": {"AP": searched}, "square": {"AP": [s - 0.01 for s in searched]}, **hand},
        # +1 AP on the mean, but -3, +1, +5 seed by seed: a tie
        "tie": {"searched": {"AP": searched}, "square": {"AP": [0.130, 0.110, 0.040]}, **hand},
    }
    win, tie = goal_check(results)["win"], goal_check(results)["tie"]
    assert win["beats_handcrafted"] is True and tie["beats_handcrafted"] is True
    assert win["se_handcrafted"]["square"] == pytest.approx(0.0, abs=1e-12)
    diffs = [-0.03, 0.01, 0.05]  # by hand: stdev 0.04, over sqrt(3)
    assert tie["se_handcrafted"]["square"] == pytest.approx(0.04 / 3 ** 0.5)
    assert win["clearly_beats_handcrafted"] is True and tie["clearly_beats_handcrafted"] is False
    assert sum(diffs) / 3 == pytest.approx(tie["vs_handcrafted"]["square"])
    text = goal_lines(goal_check(results))
    assert "square +1.0 ± 2.3" in text and "by more than 2 standard errors of the per-seed gap: **no**" in text
    # unequal seed counts: no paired error, no verdict on it
    uneven = {"a": {**results["tie"], "square": {"AP": [0.13, 0.11]}}}
    assert "square" not in goal_check(uneven)["a"]["se_handcrafted"]
    assert goal_check(uneven)["a"]["clearly_beats_handcrafted"] is None


def test_goal_check_of_the_shared_search_uses_its_own_results():
    hand = {f: {"AP": [0.10, 0.11, 0.12]} for f in ("sigmoid", "sqrt", "linear", "square")}
    results = {"a": {"searched": {"AP": [0.12, 0.12, 0.12]}, "searched-shared": {"AP": [0.16, 0.17, 0.18]},
                     "focal+l1": {"AP": [0.13, 0.14, 0.15]}, **hand}}
    separate, shared = goal_check(results)["a"], goal_check(results, loss="searched-shared")["a"]
    assert separate["vs_focal"] == pytest.approx(-0.02) and separate["beats_focal"] is False
    assert shared["vs_focal"] == pytest.approx(0.03) and shared["beats_focal"] is True
    assert shared["vs_handcrafted"]["square"] == pytest.approx(0.06) and shared["beats_handcrafted"] is True
    text = goal_text(results)
    assert text.splitlines()[0].startswith("- a: searched − focal+l1 = -2.0 AP")
    assert text.splitlines()[1].startswith("- a: searched-shared − focal+l1 = +3.0 AP")
    # no shared results: the separate search's line only
    assert goal_text({"a": {k: v for k, v in results["a"].items() if k != "searched-shared"}}).count("\n") == 0


def test_reward_table_counts_collapsed_trials_per_round():
    table = reward_table({"searched on shapes": [[0.0, 0.0004, 0.03, 0.01], [0.02, 0.04]]})
    rows = [line for line in table.splitlines() if line.startswith("| searched on shapes")]
    assert rows == ["| searched on shapes | 1 | 0.0101 | 0.0300 | 2/4 |",
                    "| searched on shapes | 2 | 0.0300 | 0.0400 | 0/2 |"]


def test_reward_table_travel_columns():
    table = reward_table({"s": [[0.01, 0.03]]}, {"s": [(0.25, 0.5)]})
    assert table.splitlines()[0].endswith("| ‖μ − μ₀‖ | ‖μ − square‖ |")
    assert table.splitlines()[1] == "|---|---|---|---|---|---|---|"
    assert table.splitlines()[2] == "| s | 1 | 0.0200 | 0.0300 | 0/2 | 0.250 | 0.500 |"
    noisy = reward_table({"s": [[0.01, 0.03], [0.02, 0.02]]}, {"s": [(0.25, 0.5), (0.3, 0.4)]},
                         {"s": [(0.0141, 0.005), None]})
    assert noisy.splitlines()[0].endswith("| ‖μ − square‖ | spread / seed noise (sd) |")
    assert noisy.splitlines()[2:] == ["| s | 1 | 0.0200 | 0.0300 | 0/2 | 0.250 | 0.500 | 0.0141 / 0.0050 |",
                                      "| s | 2 | 0.0200 | 0.0200 | 0/2 | 0.300 | 0.400 | – |"]


@pytest.mark.parametrize("shared", [False, True])
def test_mu_travel_measures_the_mean_against_start_and_square(tmp_path, shared):
    """mu_travel, against a direct computation on a controller that moved: round by
    round the distance of μ to the identity start and to the square form."""
    c = Controller(rounds=3, sigma=0.1, seed=3, shared=shared)
    groups = 1 if shared else 5
    square = torch.tensor(form_theta("square", functions=groups), dtype=torch.float64)
    for _ in range(3):
        thetas = c.sample(4)
        c.update(thetas, (-((thetas - square) ** 2).sum(1)).tolist())
    state = str(tmp_path / "state.json")
    storage.write_json(state, {"controller": c.state_dict()})
    got = mu_travel(state)
    start = torch.tensor(form_theta("linear", functions=groups), dtype=torch.float64)
    assert len(got) == 3
    for (moved, to_square), rec in zip(got, c.history):
        mu = torch.tensor(rec.mu_after, dtype=torch.float64)
        assert moved == pytest.approx(float(torch.linalg.vector_norm(mu - start)), rel=1e-6)
        assert to_square == pytest.approx(float(torch.linalg.vector_norm(mu - square)), rel=1e-9)
    assert got[-1][0] > 0
    # the distances mu_travel's docstring gives for the start
    assert float(torch.linalg.vector_norm(start - square)) == pytest.approx(0.23 if shared else 0.52, abs=0.01)


def test_long_proxy_preset_is_default_with_the_final_schedule_length(tmp_path):
    from click.testing import CliRunner

    from bench.search import BENCH_PRESETS, bench

    long, default = BENCH_PRESETS["long-proxy"], BENCH_PRESETS["default"]
    assert long["proxy_iterations"] == long["final_iterations"] == default["final_iterations"]
    assert {k: v for k, v in long.items() if k != "proxy_iterations"} == \
        {k: v for k, v in default.items() if k != "proxy_iterations"}
    # the CLI takes it; --report-only on an empty cache trains nothing and writes the (empty) tables
    res = CliRunner().invoke(bench, ["--preset", "long-proxy", "--work", str(tmp_path / "w"), "--out",
                                     str(tmp_path / "o"), "--report-only", "--tracking-uri", ""])
    assert res.exit_code == 0, res.output
    assert '"proxy_iterations": 400' in (tmp_path / "o" / "bench_search.md").read_text()


@pytest.mark.parametrize("extra, start, top, seeds", [
    ([], "square", 4, "1,2"),  # the preset's procedure
    (["--start", "linear", "--select-top", "0", "--select-seeds", "3"], "linear", 0, "3"),  # options override it
])
def test_select_1200_preset_sets_the_procedure_and_options_override_it(tmp_path, extra, start, top, seeds):
    from click.testing import CliRunner

    from bench.search import BENCH_PRESETS, bench

    res = CliRunner().invoke(bench, ["--preset", "select-1200", "--work", str(tmp_path / "w"), "--out",
                                     str(tmp_path / "o"), "--report-only", "--tracking-uri", "", *extra])
    assert res.exit_code == 0, res.output
    report = (tmp_path / "o" / "bench_search.md").read_text()
    for field, value in [("proxy_iterations", 1200), ("final_iterations", 1200), ("rounds", 6),
                         ("start", f'"{start}"'), ("select_top", top), ("select_seeds", f"[{seeds.replace(',', ', ')}]")]:
        assert f'"{field}": {value}' in report, field
    # the other presets keep the CLI's own defaults: no selection, started at the identity
    assert not {"start", "select_top", "select_seeds"} & set(BENCH_PRESETS["default"])


def _report_config(args: list[str], tmp_path, name: str) -> dict:
    """The config a ``python -m bench.search --report-only`` run with ``args`` writes in its report."""
    from click.testing import CliRunner

    from bench.search import bench

    out = tmp_path / name
    res = CliRunner().invoke(bench, [*args, "--work", str(tmp_path / "w"), "--out", str(out), "--report-only",
                                     "--tracking-uri", ""])
    assert res.exit_code == 0, res.output
    line = next(x for x in (out / "bench_search.md").read_text().splitlines() if x.startswith("Config: `"))
    return {k: v for k, v in json.loads(line.removeprefix("Config: `").removesuffix("`")).items() if k != "out"}


def test_strong_start_preset_is_finding_35s_command_and_every_option_overrides_it(tmp_path):
    """The preset is the command of BENCHMARKS.md's finding 35 (so it takes up that search's
    cache), and each option, flags included, still overrides a preset that sets it."""
    finding_35 = ["--preset", "select-1200", "--datasets", "digits", "--losses", "searched,square",
                  "--seeds", "0,1,2,3,4,5,6,7,8", "--warm-starts", "3", "--select-warm-starts", "--select-seeds", "1,2",
                  "--detach-i3", "--search-splits", "5", "--rounds", "4", "--samples", "8", "--sigma", "0.2",
                  "--search-tag", "s2x8", "--n-train", "2000", "--search-val-fraction", "0.5",
                  "--pretrain-iterations", "3000", "--reward-baseline", "square"]
    preset = _report_config(["--preset", "strong-start"], tmp_path, "preset")
    assert preset == _report_config(finding_35, tmp_path, "command")
    assert preset["detach_i3"] and preset["select_warm_starts"] and preset["search_tag"] == "s2x8"
    over = _report_config(["--preset", "strong-start", "--no-detach-i3", "--no-select-warm-starts",
                           "--warm-starts", "1", "--search-tag", "", "--datasets", "shapes,digits", "--seeds", "4",
                           "--reward-baseline", "linear", "--search-splits", "2", "--jobs", "1"], tmp_path, "over")
    changed = {k: (preset[k], v) for k, v in over.items() if v != preset[k]}
    assert changed == {"detach_i3": (True, False), "select_warm_starts": (True, False), "warm_starts": (3, 1),
                       "search_tag": ("s2x8", ""), "datasets": (["digits"], ["shapes", "digits"]),
                       "seeds": (list(range(9)), [4]), "reward_baseline": ("square", "linear"),
                       "search_splits": (5, 2), "jobs": (2, 1)}
    assert _report_config(["--preset", "strong-start", "--reward-baseline", "none"], tmp_path, "off")["reward_baseline"] == ""
    # a preset that does not set an option leaves the CLI's own default
    default = _report_config([], tmp_path, "default")
    assert (default["detach_i3"], default["warm_starts"], default["search_tag"], default["datasets"]) == \
        (False, 1, "", ["shapes", "digits"])


def test_data_sizes_reach_the_bundled_dataset():
    p = BenchConfig(n_train=300, n_val=60).preset("digits")
    assert p.dataset == "bundled:digits"
    assert p.bundled["n_train"] == 300 and p.bundled["n_val"] == 60
    assert BenchConfig().preset("digits").bundled == presets.get_preset("quick").bundled
    assert BenchConfig(sigma=0.1).preset("shapes").controller["sigma"] == 0.1
    assert "sigma" not in BenchConfig().preset("shapes").controller
    assert BenchConfig(box_collapse=0.5).preset("digits").proxy["box_collapse"] == 0.5
    assert "box_collapse" not in BenchConfig().preset("digits").proxy  # off: cached searches keep their inputs


def test_pretrain_iterations_reach_the_warm_starts_and_name_the_searches(tmp_path):
    """--pretrain-iterations: the warm starts' pre-training runs that long (its other
    options the preset's), they are other warm starts than the preset's (the preset's
    cached one is not taken for them), and the searches from them carry ``-pt<n>``."""
    quick = presets.get_preset("quick").pretrain
    p = BenchConfig(pretrain_iterations=3000).preset("digits")
    assert p.pretrain == {**quick, "iterations": 3000} and quick["iterations"] != 3000
    assert BenchConfig().preset("digits").pretrain == quick
    names = [BenchConfig(pretrain_iterations=n, detach_i3=True).search_name("digits", "searched") for n in (None, 3000)]
    assert names == ["bench-digits-searched-detach-i3", "bench-digits-searched-detach-i3-pt3000"]
    # the preset's warm start cached, the longer one is not found in its place
    config = BenchConfig().preset("digits").pretrain
    short = steps.cache_key(str(tmp_path), "pretrain", steps.At(str(tmp_path / "data")),
                            steps.pretrain_options(config), 0)
    storage.write_bytes(str(tmp_path / "pretrain" / short / "backbone.pt"), b"200 iterations")
    assert steps.pretrain(str(tmp_path / "data"), str(tmp_path), config=config, only_cached=True)
    assert steps.pretrain(str(tmp_path / "data"), str(tmp_path), config=p.pretrain, only_cached=True) == ""


def test_detach_i3_reaches_every_pap_loss_training_and_names_its_searches(prepared):
    """--detach-i3: proxies and the finals of PAP losses train with it, the focal finals
    without (the engine refuses it there); its searches and finals live beside the
    SPEC's in one --work (another search name, other final keys)."""
    _, _, data, init, _ = prepared
    cfg, spec = BenchConfig(detach_i3=True), BenchConfig()
    p, p0 = cfg.preset("digits"), spec.preset("digits")
    assert p.proxy["detach_i3"] is True and "detach_i3" not in p0.proxy
    square = LossSpec.handcrafted("square").to_json()
    assert final_config(p, data, init, "square", square, 0).detach_i3
    assert not final_config(p0, data, init, "square", square, 0).detach_i3
    assert not final_config(p, data, init, "focal+l1", None, 0).detach_i3
    # a baseline trains as in the SPEC's run
    assert final_config(p, data, init, "focal+l1", None, 0) == final_config(p0, data, init, "focal+l1", None, 0)
    assert cfg.search_name("digits", "searched") == "bench-digits-searched-detach-i3"
    assert spec.search_name("digits", "searched") == "bench-digits-searched"


def test_start_sets_the_searches_starting_mean():
    """--start square: both searches start at the piecewise-linear square (41 or 9
    numbers), and the Controller's first mean is that θ; linear leaves the SPEC's
    identity start (no mu option: the same controller options as before --start)."""
    cfg = BenchConfig(start="square", sigma=0.1)
    p = cfg.preset("shapes")
    sep, shared = cfg.controller(p, "searched"), cfg.controller(p, "searched-shared")
    assert sep == {"sigma": 0.1, "mu": form_theta("square")}
    assert shared == {"sigma": 0.1, "shared": True, "mu": form_theta("square", functions=1)}
    for options, dim in ((sep, 41), (shared, 9)):
        c = Controller(rounds=2, **options)
        assert c.dim == dim
        torch.testing.assert_close(c.mu, torch.tensor(options["mu"], dtype=torch.float64).clamp(1e-6, 1 - 1e-6))
    plain = BenchConfig(sigma=0.1)
    assert plain.controller(p, "searched") == {"sigma": 0.1}
    assert plain.controller(p, "searched-shared") == {"sigma": 0.1, "shared": True}


def test_start_from_a_loss_file_refines_that_loss(tmp_path):
    """--start FILE: the separate search starts at the file's loss, a shared loss's one
    function in all five places and its gradient scale; the Controller's first mean reads
    back as that loss. The search is named after the file's digest. A separate loss cannot
    start the shared search, and a missing or invalid file is refused by name, on the
    command line before anything is trained."""
    import hashlib

    from click.testing import CliRunner

    from bench.search import bench

    pts = [0.0, 0.0, 0.2, 0.03, 0.45, 0.18, 0.65, 0.35, 0.83, 0.69, 1.0, 1.0]
    shared_file = tmp_path / "shared.json"
    shared_file.write_text(LossSpec.shared(pts, 1.25).to_json())
    sep = LossSpec.searched([pts, [0.0, 0.0, 0.3, 0.1, 0.5, 0.3, 0.7, 0.5, 0.9, 0.8, 1.0, 1.0], pts, pts, pts], 0.7)
    sep_file = tmp_path / "sep.json"
    sep_file.write_text(sep.to_json())
    p = BenchConfig().preset("digits")
    for path, spec in ((shared_file, LossSpec.searched([pts] * 5, 1.25)), (sep_file, sep)):
        cfg = BenchConfig(start=str(path), losses=("searched", "square"), sigma=0.1)
        c = Controller(rounds=2, **cfg.controller(p, "searched"))
        assert c.dim == 41
        got = c.spec()
        assert got.grad_scale == pytest.approx(spec.grad_scale, rel=1e-5)
        for a, b in zip(got.points, spec.points):
            assert a == pytest.approx(b, abs=1e-5)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        assert cfg.search_name("digits", "searched") == f"bench-digits-searched-start-{digest}"
    shared = BenchConfig(start=str(shared_file), losses=("searched-shared",))
    assert Controller(rounds=2, **shared.controller(p, "searched-shared")).spec().points[0] == pytest.approx(pts, abs=1e-5)
    assert BenchConfig(start="square").search_name("digits", "searched") == "bench-digits-searched"
    with pytest.raises(ValueError, match=r"sep\.json.*'searched'.*shared search"):
        BenchConfig(start=str(sep_file), losses=("searched-shared",))
    (tmp_path / "bad.json").write_text('{"form": "shared", "points": [[0, 0, 1, 1]]}')
    for bad in ("cube", str(tmp_path / "bad.json")):
        res = CliRunner().invoke(bench, ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--report-only",
                                         "--tracking-uri", "", "--start", bad])
        assert res.exit_code == 2 and f"start {bad!r} is neither a form" in res.output, res.output
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(work=str(work), rounds=1, samples=2)
    p = cfg.preset("shapes").with_overrides(bundled={"n_train": 24, "n_val": 8, "image_size": 64})
    data = steps.prepare_data(p.dataset, str(work), bundled=p.bundled)
    init = storage.write_bytes(str(work / "init.pt"), b"placeholder: final_config only passes the path on")
    states = {}
    for i, (dataset, mode) in enumerate(
        [("shapes", "searched"), ("shapes", "searched-shared"), ("digits", "searched"), ("digits", "searched-shared")]
    ):
        c = Controller(seed=i, shared=(mode == "searched-shared"))
        c.update(c.sample(4), [0.1, 0.4, 0.2, 0.3])  # a real PPO round moves μ off the identity
        states[(dataset, mode)] = storage.write_json(str(work / f"{dataset}-{mode}.json"), {"controller": c.state_dict()})
    return cfg, p, data, init, states


def test_every_loss_shares_detector_schedule_data_and_seed(prepared):
    cfg, p, data, init, states = prepared
    specs = _loss_specs(cfg, "shapes", states)
    assert set(specs) == set(LOSSES)
    configs = {loss: dataclasses.asdict(final_config(p, data, init, loss, specs[loss], seed=1)) for loss in LOSSES}
    shared = {loss: {k: v for k, v in c.items() if k not in ("loss", "spec")} for loss, c in configs.items()}
    first = shared["focal+l1"]
    for loss, rest in shared.items():
        assert rest == first, f"{loss} differs from focal+l1 in more than the loss"
    assert first["train_ann"] == "train" and first["val_ann"] == "val" and first["seed"] == 1
    assert configs["focal+giou"]["loss"] == "focal+giou" and configs["focal+giou"]["spec"] is None
    for form in ("sigmoid", "sqrt", "linear", "square"):
        assert configs[form]["loss"] == "paploss"
        assert LossSpec.from_json(specs[form]) == LossSpec.handcrafted(form)


def test_a_scaled_loss_is_its_base_loss_with_that_gradient_scale(prepared):
    """``<loss>@g<scale>``: the same functions as the base loss (handcrafted or
    searched), the gradient scale replaced; trained like every other loss."""
    cfg, p, data, init, states = prepared
    cfg = dataclasses.replace(cfg, losses=("square", "square@g1.7", "searched-shared", "searched-shared@g1"))
    specs = _loss_specs(cfg, "shapes", states)
    assert LossSpec.from_json(specs["square@g1.7"]) == dataclasses.replace(LossSpec.handcrafted("square"),
                                                                           grad_scale=1.7)
    searched, scaled = LossSpec.from_json(specs["searched-shared"]), LossSpec.from_json(specs["searched-shared@g1"])
    assert searched.grad_scale != 1.0  # the fixture's PPO round moved θ_g
    assert scaled.grad_scale == 1.0 and scaled.points == searched.points and scaled.form == "shared"
    a, b = (dataclasses.asdict(final_config(p, data, init, loss, specs[loss], seed=0)) for loss in ("square", "square@g1.7"))
    assert b["loss"] == "paploss" and {k: v for k, v in a.items() if k != "spec"} == {
        k: v for k, v in b.items() if k != "spec"}
    assert split_scale("linear@g0.5") == ("linear", 0.5) and split_scale("focal+l1") == ("focal+l1", None)


def test_transfer_is_the_loss_searched_on_the_other_dataset(prepared):
    cfg, _, _, _, states = prepared
    cfg = dataclasses.replace(cfg, losses=(*cfg.losses, "transfer-shared"))
    shapes, digits = _loss_specs(cfg, "shapes", states), _loss_specs(cfg, "digits", states)
    assert shapes["transfer"] == digits["searched"] and digits["transfer"] == shapes["searched"]
    assert shapes["transfer-shared"] == digits["searched-shared"] and digits["transfer-shared"] == shapes["searched-shared"]
    assert shapes["searched-shared"] != digits["searched-shared"]
    assert shapes["searched"] != digits["searched"]
    assert LossSpec.from_json(shapes["searched-shared"]).form == "shared"
    assert LossSpec.from_json(shapes["searched"]).form == "searched"


def test_evaluation_split_holds_no_search_val_image(prepared):
    _, _, data, _, _ = prepared
    ann = lambda split: json.loads(storage.read_text(storage.join(data, "annotations", f"{split}.json")))  # noqa: E731
    val_files = {im["file_name"] for im in ann("val")["images"]}
    search_val_files = {im["file_name"] for im in ann("search_val")["images"]}
    train_files = {im["file_name"] for im in ann("train")["images"]}
    assert search_val_files and val_files
    assert not val_files & search_val_files
    assert search_val_files <= train_files


def test_mlflow_run_holds_table_rewards_and_goal(prepared, tmp_path):
    """The benchmark's MLflow run (a real sqlite store): per-loss means, the reward
    per round of both searches, the searched specs, and the goal check."""
    import mlflow

    from bench.search import _log_mlflow

    cfg, _, _, _, states = prepared
    per_loss = {"searched": {"AP": [0.15, 0.16, 0.17]}, "searched-shared": {"AP": [0.11, 0.12, 0.13]},
                "focal+l1": {"AP": [0.12, 0.13, 0.14]}, "square@g1.7": {"AP": [0.2]},
                **{f: {"AP": [0.10, 0.11, 0.12]} for f in ("sigmoid", "sqrt", "linear", "square")}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    against = {("shapes", "searched"): {"rounds": [{"baseline": 0.2, "mean": 0.05, "best": 0.2, "above": 3,
                                                    "samples": 4}], "candidates": [0.01, None]}}
    _log_mlflow(uri, "shapes", dataclasses.replace(cfg, reward_baseline="square"), per_loss, [], states,
                against=against)
    run = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("paploss-bench").experiment_id])[0]
    assert run.data.metrics["searched.AP.mean"] == pytest.approx(0.16)
    assert run.data.metrics["square.g1.7.AP.mean"] == pytest.approx(0.2)  # '@' is not allowed in a metric name
    assert run.data.metrics["goal.searched_minus_focal_l1.AP"] == pytest.approx(0.03)
    assert run.data.metrics["goal.searched_minus_square.AP"] == pytest.approx(0.05)
    assert run.data.tags["goal.beats_focal_l1"] == "True" and run.data.tags["goal.beats_handcrafted"] == "True"
    # the shared search's loss is checked on its own: 1 AP below focal+l1, 1 above square
    assert run.data.metrics["goal.shared.searched_minus_focal_l1.AP"] == pytest.approx(-0.01)
    assert run.data.metrics["goal.shared.searched_minus_square.AP"] == pytest.approx(0.01)
    assert run.data.tags["goal.shared.beats_focal_l1"] == "False"
    assert run.data.tags["goal.shared.beats_handcrafted"] == "True"
    assert run.data.metrics["searched.mean_reward"] == pytest.approx(0.25)  # the one PPO round of the fixture
    assert run.data.params["sigma"] == str(cfg.sigma)
    # the search against --reward-baseline: per round, and per selection candidate (one lacking its baseline)
    assert run.data.params["reward_baseline"] == "square"
    assert (run.data.metrics["searched.square_reward"], run.data.metrics["searched.mean_reward_minus_square"],
            run.data.metrics["searched.max_reward_minus_square"]) == pytest.approx((0.2, 0.05, 0.2))
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "searched.selection_minus_square")
    assert [(m.step, m.value) for m in history] == [(0, pytest.approx(0.01))]
    assert "searched-shared.square_reward" not in run.data.metrics


def test_report_only_trains_and_builds_nothing(tmp_path):
    """``--report-only`` on a work folder that holds nothing: no data generated, no
    warm start trained, an empty (partial) table written."""
    from bench.search import run_bench

    cfg = BenchConfig(work=str(tmp_path / "work"), out=str(tmp_path / "out"), rounds=1, samples=2)
    assert run_bench(cfg, report_only=True) == {}
    assert not (tmp_path / "work").exists()
    text = (tmp_path / "out" / "bench_search.md").read_text()
    assert "Partial" in text
    assert json.loads((tmp_path / "out" / "bench_search.json").read_text()) == {}


def test_h2_over_h1_ratio_of_bench_collapse():
    from bench.collapse import h2_over_h1

    identity = [0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0]
    concave = [0.0, 0.0, 0.2, 0.4, 0.4, 0.7, 0.6, 0.85, 0.8, 0.95, 1.0, 1.0]  # H2 0.7 -> 0.85 on [0.4, 0.6]
    assert h2_over_h1(LossSpec.searched([identity] * 5).to_json()) == pytest.approx(1.0)
    assert h2_over_h1(LossSpec.searched([concave] + [identity] * 4).to_json()) == pytest.approx(0.775 / 0.5)
    assert h2_over_h1(LossSpec.handcrafted("square").to_json()) == pytest.approx(1.0)


def test_bench_collapse_prints_mid_range_h2_and_h1_of_collapsed_and_other_trials(tmp_path, capsys):
    from bench.collapse import main, mid_means

    identity = [0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0]
    high = [0.0, 0.0, 0.2, 0.3, 0.4, 0.6, 0.6, 0.8, 0.8, 0.9, 1.0, 1.0]  # 0.6 -> 0.8 on [0.4, 0.6]: mean 0.7
    square = LossSpec.handcrafted("square").to_json()
    h2, h1 = mid_means(square)  # x² and x² on 21 points of [0.4, 0.6]
    assert h2 == h1 == pytest.approx(sum((0.4 + 0.01 * k) ** 2 for k in range(21)) / 21)
    trials = [(0.0, LossSpec.searched([high] + [identity] * 4)),  # collapsed: H2 0.7, H1 0.5
              (0.2, LossSpec.searched([identity] * 5)),
              (0.3, LossSpec.searched([identity] * 4 + [high]))]  # H2 0.5, H1 0.7
    quality = [[0.7, 0.6, float("nan"), 0.3, 0.1, 0.2], [0.7, 0.75, 0.8], []]
    for k, (reward, spec) in enumerate(trials):
        storage.write_json(str(tmp_path / "s" / "trials" / f"r000-s{k:02d}.json"),
                           {"round": 0, "sample": k, "reward": reward, "spec": spec.to_json(),
                            "box_quality": quality[k], "box_collapsed": k == 0})
    main([str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "collapsed trials (1), on x in [0.4, 0.6]: mean H2 0.70 (from 0.70 to 0.70), mean H1 0.50, " \
        "mean H2/H1 1.40" in out
    assert "other trials (2), on x in [0.4, 0.6]: mean H2 0.50 (from 0.50 to 0.50), mean H1 0.60, " \
        "mean H2/H1 0.86" in out
    # the collapsed one: l(u) = 1 - u + 1.4 u, gain 0.4; the others' l(u) falls to u = 1 (1 - u + R u, R <= 1)
    assert "mean H2/H1 1.40; worse-box gain from 0.40 to 0.40" in out
    assert "worse-box gain from 0.00 to 0.00" in out
    assert "r000-s00: u below 0.5 from iteration 3, lowest 0.10, reward 0.0000, stopped early (box collapse)" in out
    assert "r000-s01:" not in out


def test_worse_box_gain_against_a_brute_force_minimum():
    """worse_box_gain: l(1) - min over u of (1 - I1(u)) + R I3(u), checked against a
    plain loop over u for the box-collapsing loss of the engine's test; 0 for square."""
    from bench.collapse import h2_over_h1, worse_box_gain
    from tests.test_engine import BOX_COLLAPSING

    js = BOX_COLLAPSING.to_json()
    r = h2_over_h1(js)
    i1, i3 = BOX_COLLAPSING.function("I1"), BOX_COLLAPSING.function("I3")
    values = [1 - float(i1(torch.tensor([k / 1000], dtype=torch.float64))) +
              r * float(i3(torch.tensor([k / 1000], dtype=torch.float64))) for k in range(1001)]
    assert worse_box_gain(js) == pytest.approx(values[-1] - min(values), abs=1e-9) and worse_box_gain(js) > 1
    assert worse_box_gain(LossSpec.handcrafted("square").to_json()) == pytest.approx(0.0, abs=1e-12)


def test_a_cached_search_is_reused_only_with_its_own_inputs(prepared, tmp_path):
    """A search cached with 400-iteration proxies is not reported as the search of a
    run with 150: the second run is refused, naming the field and both values. A
    search cached before the inputs file existed adopts the first run's inputs."""
    from bench.search import _search_inputs

    _, p, data, init, _ = prepared
    work = str(tmp_path)
    long = p.with_overrides(proxy={**p.proxy, "iterations": 400})
    short = p.with_overrides(proxy={**p.proxy, "iterations": 150})
    _search_inputs(long, data, (init,), work, "s", write=False)  # nothing cached: nothing to check, nothing written
    assert not storage.exists(storage.join(steps.search_dir(work, "s"), "bench-inputs.json"))
    _search_inputs(long, data, (init,), work, "s", write=True)
    _search_inputs(long, data, (init,), work, "s", write=False)  # same inputs: fine
    with pytest.raises(steps.StepError, match=r"search 's'.*proxy: .*'iterations': 400.* there, .*'iterations': 150.* now"):
        _search_inputs(short, data, (init,), work, "s", write=True)
    with pytest.raises(steps.StepError, match=r"init: .*other\.pt"):
        _search_inputs(long, data, (str(tmp_path / "other.pt"),), work, "s", write=False)
    assert storage.read_json(storage.join(steps.search_dir(work, "s"), "bench-inputs.json"))["proxy"]["iterations"] == 400
    # a search whose reward seeds train across warm starts keeps them all: other ones are refused
    other = str(tmp_path / "other.pt")
    _search_inputs(long, data, (init, other), work, "rs", write=True)
    with pytest.raises(steps.StepError, match=r"search 'rs'.*inits: .*other\.pt.* there, .*"):
        _search_inputs(long, data, (init, init), work, "rs", write=False)


def test_a_moved_work_folder_keeps_its_searches_trials_and_inputs(tmp_path):
    """A work folder moved elsewhere (copied off a GPU machine, say): its search's inputs
    are not refused, its trained trial is read back rather than trained again, and
    ``bench.reeval`` finds the data and warm start where they lie now. Other inputs are
    still refused."""
    import shutil

    from bench.reeval import load_trials
    from bench.search import _search_inputs

    def inputs(work):
        data = steps.prepare_data("bundled:shapes", work, bundled={"n_train": 24, "n_val": 8, "image_size": 64})
        return data, steps.pretrain(data, work, config={"iterations": 1, "batch_size": 4, "num_threads": 1})

    p = BenchConfig().preset("shapes")
    work = str(tmp_path / "a" / "shapes")
    data, init = inputs(work)
    out = steps.init_search(work, "s", rounds=1, samples=2, seed=0)
    proxy = {"preset": "smoke", "iterations": 2}
    first = json.loads(steps.proxy_trial(data, init, out["trials"][0], proxy, work, "s", state=out["state"]))
    assert not first["failed"], first["error"]
    _search_inputs(p, data, (init,), work, "s", write=True)

    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    work = str(tmp_path / "b" / "shapes")
    data, init = inputs(work)  # found there, not made again
    assert data.startswith(work) and init.startswith(work)
    _search_inputs(p, data, (init,), work, "s", write=False)
    state = storage.join(work, os.path.relpath(out["state"], str(tmp_path / "a" / "shapes")))
    again = json.loads(steps.proxy_trial(data, init, out["trials"][0], proxy, work, "s", state=state))
    assert again["seconds"] == first["seconds"] and again["reward"] == first["reward"]  # read back, not retrained
    found, trials = load_trials(steps.search_dir(work, "s"))
    assert (found["data"], found["init"]) == (data, init) and trials[0]["reward"] == first["reward"]
    with pytest.raises(steps.StepError, match=r"init: '<work>/.*' there, .*other\.pt.* now"):
        _search_inputs(p, data, (str(tmp_path / "other.pt"),), work, "s", write=False)


def test_a_search_with_other_rounds_is_refused_naming_them_and_a_tag_sets_it_beside(prepared, tmp_path):
    """A cached 4-round search is not taken up by a 6-round run of the same name: the
    refusal names both values and the option that names the new one apart; the tag
    ends every search's name, after the other parts."""
    from bench.search import WarmStarts, run_search

    cfg, p, data, init, _ = prepared
    work = str(tmp_path)
    steps.init_search(work, "s", 4, p.samples, seed=p.seed, controller=p.controller)
    with pytest.raises(steps.StepError, match=r"'s' already exists .*rounds=4 there, 6 now.*--search-tag TAG runs this "
                                              r"one as s-TAG"):
        run_search(cfg, WarmStarts(None, search=(init,)), p.with_overrides(rounds=6), data, work, "s", "searched")
    assert storage.read_json(steps.state_uri(work, "s", 0))["controller"]["options"]["rounds"] == 4
    tagged = BenchConfig(detach_i3=True, search_tag="r6")
    assert tagged.search_name("digits", "searched") == "bench-digits-searched-detach-i3-r6"
    assert BenchConfig(search_tag="r6").search_name("shapes", "searched-shared") == "bench-shapes-searched-shared-r6"
    assert BenchConfig(detach_i3=True, reward_seeds=2, search_tag="x").search_name("digits", "searched") == \
        "bench-digits-searched-detach-i3-rs2-x"
    assert BenchConfig(reward_seeds=2, search_splits=5).search_name("digits", "searched") == \
        "bench-digits-searched-rs2-ss5"


def test_the_selection_of_a_report_only_run_comes_from_cached_trials_only(prepared, tmp_path):
    """``--select-top`` with ``--report-only``: no training; with every selection trial
    cached, the searched loss is the candidate of the best mean, in the specs of the
    finals and in the report."""
    from bench.search import WarmStarts, run_search

    cfg, p, data, init, _ = prepared
    cfg = dataclasses.replace(cfg, select_top=2, select_seeds=(5, 6))
    work, name = str(tmp_path), "bench-shapes-searched-shared"
    q = p.with_overrides(rounds=1, samples=2)
    out = steps.init_search(work, name, 1, 2, seed=q.seed, controller=cfg.controller(q, "searched-shared"))
    results = [{**json.loads(t), "reward": 0.1 + 0.1 * k, "failed": False, "error": ""}
               for k, t in enumerate(out["trials"])]
    for r in results:  # the round's trials cached as a run stores them
        storage.write_json(steps._trial_uri(work, name, r["round"], r["sample"]), r)
    state = steps.controller_update(out["state"], [json.dumps(r) for r in results], work, name)["state"]
    m = WarmStarts(None, search=(init,), select=(init,))
    # the rounds are cached, the selection's trials are not: nothing trained, the loss left out
    assert run_search(cfg, m, q, data, work, name, "searched-shared", report_only=True) is None
    trials = [json.loads(t) for t in steps.selection_trials(state, 2, [5, 6])]
    for t in trials:  # candidate 1 (samples 2, 3) has the better mean
        storage.write_json(steps._trial_uri(work, name, t["round"], t["sample"]),
                           {**t, "reward": 0.1 * t["sample"], "failed": False})
    chosen = run_search(cfg, m, q, data, work, name, "searched-shared", report_only=True)
    assert storage.read_json(chosen)["selected"]["theta"] == trials[2]["theta"]
    specs = _loss_specs(cfg, "shapes", {("shapes", "searched-shared"): chosen}, ["searched-shared"])
    assert specs["searched-shared"] == steps.searched_spec(chosen).to_json() != steps.searched_spec(state).to_json()
    assert "mean AP x 100 on search-val 5.0, 25.0; selected candidate 1" in selection_text(
        {("shapes", "searched-shared"): chosen})
    assert "seeds 5, 6 (seed s from warm start s mod 3), mean AP" in selection_text(
        {("shapes", "searched-shared"): chosen}, warm_starts=3)


def test_each_searched_loss_is_written_as_a_spec_file_train_takes(prepared, tmp_path):
    """The results name each search's loss and write it as a LossSpec file that
    ``paploss train --spec`` reads back to the same spec: the loss outlives --work."""
    from bench.search import _write_results, loss_file
    from paploss.engine_cli import _spec

    cfg, _, _, _, states = prepared
    cfg = dataclasses.replace(cfg, out=str(tmp_path / "out"))
    _write_results(cfg, {"shapes": {}}, states, done=False)
    md = (tmp_path / "out" / "bench_search.md").read_text()
    for (dataset, mode), state in states.items():
        path = loss_file(cfg.out, dataset, mode)
        assert _spec(path, None) == steps.searched_spec(state)
        assert f"`{mode}` on {dataset} (`bench_{dataset}_{mode}_loss.json`" in md
    files = {loss_file(cfg.out, *k) for k in states}
    assert len(files) == 4 and len({storage.read_text(f) for f in files}) == 4  # four searches, four losses


# ----------------------------------------------------------------------------------
# --loss-file: a searched loss given as a file, its search not run
# ----------------------------------------------------------------------------------

def _spec_file(path, spec: LossSpec) -> str:
    return storage.write_text(str(path), spec.to_json() + "\n")


@pytest.mark.parametrize(
    "loss_files, message",
    [
        ((("coco", "searched", "f.json"),), "loss file coco:searched=f.json: dataset 'coco' is not benchmarked"),
        ((("shapes", "square", "f.json"),), "loss file shapes:square=f.json: 'square' is not a searched loss"),
        ((("shapes", "searched-shared", "f.json"),), "'searched-shared' is not among the losses compared"),
        ((("shapes", "searched", "f.json"), ("shapes", "searched", "g.json")), "shapes:searched is given twice"),
    ],
)
def test_config_rejects_loss_files_naming_them(loss_files, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(datasets=("shapes", "digits"), losses=("searched", "square"), loss_files=loss_files)


def test_a_given_loss_file_is_read_checked_and_named_in_errors(tmp_path):
    shared = _spec_file(tmp_path / "shared.json", LossSpec.from_theta([0.3] * 9))
    cfg = lambda mode, path: BenchConfig(datasets=("shapes",), losses=(mode,), loss_files=(("shapes", mode, path),))  # noqa: E731
    assert LossSpec.from_json(cfg("searched-shared", shared).given_specs()[("shapes", "searched-shared")]) == \
        LossSpec.from_json(storage.read_text(shared))
    with pytest.raises(ValueError, match=r"loss file .*shared\.json \(shapes:searched\): its form is 'shared'"):
        cfg("searched", shared).given_specs()
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"loss file .*nope\.json \(shapes:searched\)"):
        cfg("searched", missing).given_specs()
    bad = storage.write_text(str(tmp_path / "bad.json"), '{"form": "shared", "points": [[0, 0, 1')
    with pytest.raises(ValueError, match=r"loss file .*bad\.json .*not valid JSON"):
        cfg("searched-shared", bad).given_specs()


def test_a_given_loss_takes_the_place_of_its_search_and_of_transfer(prepared, tmp_path):
    """A loss file stands in for one search's state: the finals of that mode and the
    other dataset's ``transfer`` train it; the searches not given still come from their states."""
    cfg, _, _, _, states = prepared
    searched = LossSpec.from_theta([0.4] * 41)
    given = {("shapes", "searched"): searched.to_json()}
    without = {k: v for k, v in states.items() if k != ("shapes", "searched")}
    shapes, digits = (_loss_specs(cfg, d, without, given=given) for d in ("shapes", "digits"))
    assert shapes["searched"] == digits["transfer"] == searched.to_json()
    assert shapes["searched-shared"] == steps.searched_spec(states[("shapes", "searched-shared")]).to_json()
    assert shapes["transfer"] == steps.searched_spec(states[("digits", "searched")]).to_json()


def _finals_of(work) -> dict:
    """``{(loss, seed): result + {"w": warm start index}}`` of a dataset's bench finals
    (``steps.final_train``'s files ``pap.<loss>-seed<k>-w<i>.json`` in its search ``bench-finals``)."""
    got = {}
    for f in (work / "searches" / "bench-finals" / "final").glob("*.json"):
        name, seed, w = re.fullmatch(r"(.+)-seed(\d+)-w(\d+)\.json", f.name).groups()
        loss = name[len("pap."):].replace(".g", "@g") if name.startswith("pap.") else name
        got[(loss, int(seed))] = {**json.loads(f.read_text()), "w": int(w)}
    return got


@pytest.mark.slow
def test_bench_with_a_loss_file_trains_it_without_searching(tmp_path):
    """``python -m bench.search --loss-file`` end to end at the smoke size (real data, warm start,
    trainings, MLflow store): no search is run, the given loss is trained beside
    ``square``, written back as the run's loss file, named in the report and logged;
    ``transfer-shared`` trains the loss given for ``digits``, which is not benchmarked."""
    import subprocess
    import sys

    import mlflow

    from bench.search import tree_digest, weights_digest

    spec = LossSpec.from_theta([0.35] * 8 + [0.7])
    path = _spec_file(tmp_path / "found.json", spec)
    other = LossSpec.from_theta([0.3] * 8 + [0.6])
    other_path = _spec_file(tmp_path / "other.json", other)
    work, out, uri = tmp_path / "work", tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "bench.search", "--preset", "smoke", "--datasets", "shapes",
           "--losses", "searched-shared,square,transfer-shared", "--seeds", "0,1", "--warm-starts", "2", "--final-iterations", "2",
           "--n-train", "24",
           "--n-val", "8", "--loss-file", f"shapes:searched-shared={path}",
           "--loss-file", f"digits:searched-shared={other_path}", "--work", str(work), "--out", str(out),
           "--tracking-uri", uri, "--jobs", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [f.name for f in (work / "shapes" / "searches").iterdir()] == ["bench-finals"]  # the search was not run
    docs = _finals_of(work / "shapes")
    assert set(docs) == {(loss, seed) for loss in ("searched-shared", "square", "transfer-shared") for seed in (0, 1)}
    assert not (work / "digits").exists()  # the dataset of the transferred loss is not prepared
    assert LossSpec.from_json(docs[("transfer-shared", 1)]["spec"]) == other
    # seed k of every loss from warm start k mod 2
    assert {key: d["w"] for key, d in docs.items()} == {key: key[1] % 2 for key in docs}
    assert LossSpec.from_json(docs[("searched-shared", 0)]["spec"]) == spec
    assert LossSpec.from_json((out / "bench_shapes_searched-shared_loss.json").read_text()) == spec
    results = json.loads((out / "bench_search.json").read_text())["shapes"]
    assert [round(v, 6) for v in results["searched-shared"]["AP"]] == [
        round(docs[("searched-shared", k)]["metrics"]["AP"], 6) for k in (0, 1)]
    md = (out / "bench_search.md").read_text()
    assert f"given as `{path}`, not searched in this run" in md
    assert f"`searched-shared` on digits (`bench_digits_searched-shared_loss.json`, for `paploss train --spec`; " \
        f"given as `{other_path}`" in md
    assert "## Searches" not in md  # none was run: no empty reward table
    data = next((work / "shapes" / "data").iterdir())
    assert f"- shapes: data `{data}` (sha256 `{tree_digest(data)[:16]}`)" in md
    warm = re.search(r"warm start 1 `([^`]+)`", md).group(1)
    assert warm.startswith(str(work / "shapes" / "pretrain"))
    accuracy = torch.load(warm, weights_only=True)["train_accuracy"]
    assert f"warm start 1 `{warm}` (weights sha256 `{weights_digest(warm)[:16]}`, crop accuracy " \
        f"{100 * accuracy:.0f} % after 10 iterations)" in md
    assert (out / "bench_shapes_searched-shared_functions.png").stat().st_size > 0
    assert not (out / "bench_shapes_searched-shared_rewards.png").exists()  # no search, no rewards
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("paploss-bench").experiment_id])[0]
    assert run.data.params["loss_files"] == f"shapes:searched-shared={path},digits:searched-shared={other_path}"
    assert run.data.params["warm_starts"] == "2"
    logged = client.download_artifacts(run.info.run_id, "searched-shared_loss_spec.json", str(tmp_path))
    assert LossSpec.from_json(storage.read_text(logged)) == spec

    at = cmd.index("--loss-file")
    bad = subprocess.run([*cmd[:at], "--loss-file", f"shapes:searched={path}", *cmd[at + 2:]], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "is not among the losses compared" in bad.stderr


@pytest.mark.slow
def test_bench_selection_across_warm_starts_trains_seed_s_from_warm_start_s_mod_n(tmp_path, monkeypatch):
    """``--select-warm-starts`` end to end at the smoke size: the selection's seed s
    trains from warm start s mod N (as final seed s does), and the loss trained as ``searched-shared``
    is the candidate with the best mean over those trials. With ``--reward-seeds 2``
    each sampled loss's j-th trial trains from warm start j mod N too, and its reward
    is the mean of its two. With ``--search-splits 3`` round r trains and scores on
    split r, the selection on split 2; with ``--select-rank round`` its candidates are
    the best rewards relative to their round's mean. The benchmark runs as a command
    (a process of its own); the twin, the refused option and the report-only run after
    it run in this process (no second torch import each)."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from bench import reeval
    from bench.search import bench

    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.search", "--preset", "smoke", "--datasets", "shapes",
           "--losses", "searched-shared", "--seeds", "0,1", "--warm-starts", "2", "--select-top", "2",
           "--select-seeds", "1,2", "--select-warm-starts", "--reward-seeds", "2", "--search-splits", "3", "--proxy-iterations", "2",
           "--final-iterations", "2", "--select-rank", "round",
           "--n-train", "24", "--n-val", "8", "--work", str(work), "--out", str(out), "--tracking-uri", "",
           "--jobs", "1", "--reward-baseline", "square"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    finals = _finals_of(work / "shapes")
    assert {key: d["w"] for key, d in finals.items()} == {("searched-shared", k): k for k in (0, 1)}
    search = work / "shapes" / "searches" / "bench-shapes-searched-shared-rs2-ss3"
    trials = [json.loads(f.read_text()) for f in sorted((search / "trials").glob("r*.json"))]
    search_trials, picked = [t for t in trials if t["round"] < 2], [t for t in trials if t["round"] == 2]
    inits = [search_trials[0]["init"], search_trials[1]["init"]]  # reward seed j from warm start j
    assert inits[0] != inits[1]
    assert [t["seed"] for t in search_trials] == [0, 1000] * 4  # 2 rounds x 2 samples x 2 reward seeds
    assert [t["split"] for t in search_trials] == [0] * 4 + [1] * 4
    assert all(t["init"] == inits[t["seed"] // 1000] and not t["failed"] for t in search_trials)
    c = steps.load_controller(str(search / "state" / "round-002.json"))
    assert [r for rec in c.history for r in rec.rewards] == pytest.approx(
        [(a["reward"] + b["reward"]) / 2 for a, b in zip(search_trials[::2], search_trials[1::2])])
    assert sorted(t["seed"] for t in picked) == [1, 1, 2, 2] and {t["split"] for t in picked} == {2}
    relative = sorted(((r - sum(rec.rewards) / len(rec.rewards), [float(v) for v in theta]) for rec in c.history
                       for r, theta in zip(rec.rewards, rec.thetas)), key=lambda x: -x[0])
    assert sorted(t["theta"] for t in picked) == sorted([theta for _, theta in relative[:2]] * 2)
    assert "candidates (best search reward relative to its round's mean first)" in (out / "bench_search.md").read_text()
    for t in picked:
        assert t["init"] == inits[t["seed"] % 2] and not t["failed"]
    means = {}
    for t in picked:
        means.setdefault(tuple(t["theta"]), []).append(t["reward"])
    best = max(means, key=lambda theta: sum(means[theta]) / 2)
    assert LossSpec.from_json(finals[("searched-shared", 0)]["spec"]) == LossSpec.from_json(
        next(t["spec"] for t in picked if tuple(t["theta"]) == best))
    report = (out / "bench_search.md").read_text()
    assert "re-trained with seeds 1, 2 (seed s from warm start s mod 2)" in report
    # the search table's noise column: each round's from its two trainings per sample
    for r, noise in enumerate(steps.round_noise(str(search / "state" / "round-002.json")), start=1):
        assert f"| searched-shared on shapes | {r} | " in report and f"| {noise[0]:.4f} / {noise[1]:.4f} |" in report
    # --reward-baseline square: trained once per distinct (warm start, seed, split) of the rounds' and the
    # selection's trials, each the training bench.reeval gives (its twin), and the rounds set against it
    base = {(d["init"], d["seed"], d["split"]): d["reward"]
            for d in (json.loads(f.read_text()) for f in (work / "shapes" / "baseline").iterdir())}
    assert set(base) == {(t["init"], t["seed"], t["split"]) for t in search_trials + picked} and len(base) == 6
    reeval.main(["--search", str(search), "--top", "0", "--seeds", "1", "2", "--inits",
                 *(storage.at_location(i, str(work / "shapes")) for i in inits), "--split", "2", "--jobs", "1",
                 "--out", str(tmp_path / "twin.json")])
    assert {r["seed"]: r["metrics"]["AP"] for r in json.loads((tmp_path / "twin.json").read_text())["runs"]} == {
        s: base[(inits[s % 2], s, 2)] for s in (1, 2)}
    section = report[report.index("## Rewards against `square`"):]
    for r, rec in enumerate(c.history):
        b = (base[(inits[0], 0, r)] + base[(inits[1], 1000, r)]) / 2
        assert (f"| searched-shared on shapes | {r + 1} | {100 * b:.2f} | {100 * (sum(rec.rewards) / 2 - b):+.2f} | "
                f"{100 * (max(rec.rewards) - b):+.2f} | {sum(x > b for x in rec.rewards)}/2 |") in section
    args = cmd[3:]  # less `python -m bench.search`
    bad = CliRunner().invoke(bench, [*args, "--warm-starts", "1", "--report-only"])
    assert bad.exit_code == 2 and "select_warm_starts needs" in bad.output and "warm_starts=1" in bad.output, bad.output
    # the work folder given relative (absolute above): every warm start, search, selection
    # and final is found under its key (a report-only run trains nothing, so a miss would
    # leave a result out)
    at = args.index("--work")
    relative = [*args[:at], "--work", "work/../work", "--out", "out2", *args[at + 4:], "--report-only"]
    monkeypatch.chdir(tmp_path)
    again = CliRunner().invoke(bench, relative)
    assert again.exit_code == 0, again.output[-3000:]
    assert (tmp_path / "out2" / "bench_search.json").read_text() == (out / "bench_search.json").read_text()
    again_md = (tmp_path / "out2" / "bench_search.md").read_text()
    assert again_md[again_md.index("## Rewards against `square`"):again_md.index("## Searched losses")] == \
        section[:section.index("## Searched losses")]  # the baselines found in their cache


def test_tree_digest_names_a_folder_by_its_files_names_and_bytes(tmp_path):
    """The report's digest of the data and the warm start: equal for a copy, different
    after one byte or one name changes, and for a file the SHA-256 of its bytes framed
    as the folder's entries are."""
    import hashlib
    import shutil

    from bench.search import tree_digest

    a = tmp_path / "a"
    (a / "images").mkdir(parents=True)
    (a / "images" / "0.png").write_bytes(b"\x89PNG one")
    (a / "ann.json").write_text('{"images": []}')
    shutil.copytree(a, tmp_path / "copy")
    assert tree_digest(a) == tree_digest(tmp_path / "copy")
    (tmp_path / "copy" / "images" / "0.png").write_bytes(b"\x89PNG onE")
    assert tree_digest(a) != tree_digest(tmp_path / "copy")
    shutil.copytree(a, tmp_path / "renamed")
    (tmp_path / "renamed" / "images" / "0.png").rename(tmp_path / "renamed" / "images" / "1.png")
    assert tree_digest(a) != tree_digest(tmp_path / "renamed")
    expected = hashlib.sha256(b"ann.json\0" + b'{"images": []}' + b"\0" + b"images/0.png\0" + b"\x89PNG one" + b"\0")
    assert tree_digest(a) == expected.hexdigest()
    assert tree_digest(a / "ann.json") == hashlib.sha256(b"\0" + b'{"images": []}' + b"\0").hexdigest()


def test_weights_digest_names_a_warm_start_by_its_weights_not_its_file(tmp_path):
    """Two backbone files with the same weights but other recorded data paths: one
    weights digest, two file digests; one weight changed by its last bit, or one
    tensor renamed, changes it (0-dim tensors included)."""
    import torch

    from bench.search import tree_digest, weights_digest

    state = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(7),
             "bn.running_mean": torch.zeros(4)}
    doc = {"format": "paploss-backbone/1", "state_dict": state}
    torch.save({**doc, "data": "runs/a/data"}, tmp_path / "a.pt")
    torch.save({**doc, "data": "runs/b/data"}, tmp_path / "b.pt")
    assert weights_digest(tmp_path / "a.pt") == weights_digest(tmp_path / "b.pt")
    assert tree_digest(tmp_path / "a.pt") != tree_digest(tmp_path / "b.pt")
    bumped = {**state, "conv.weight": state["conv.weight"].clone()}
    bumped["conv.weight"].view(-1)[5] = torch.nextafter(bumped["conv.weight"].view(-1)[5], torch.tensor(10.0))
    torch.save({**doc, "state_dict": bumped}, tmp_path / "c.pt")
    renamed = {("bn.tracked" if k == "bn.num_batches_tracked" else k): v for k, v in state.items()}
    torch.save({**doc, "state_dict": renamed}, tmp_path / "d.pt")
    assert len({weights_digest(tmp_path / f"{n}.pt") for n in "acd"}) == 3


def test_final_seed_k_trains_from_warm_start_k_mod_n_for_every_loss(prepared):
    """``--warm-starts N``: the finals of seed k, every loss alike, start from warm start
    k mod N; a warm start missing from a report-only run's cache leaves its seeds out."""
    from bench.search import WarmStarts, final_jobs, final_name

    cfg, p, data, _, states = prepared
    specs = _loss_specs(cfg, "shapes", states, ["square", "focal+l1", "searched"])
    jobs = final_jobs((0, 1, 2, 3), list(specs), specs, ("w0.pt", "w1.pt"))
    m = WarmStarts(None, finals=("w0.pt", "w1.pt"))
    assert {key: m.init_of(job) for key, job in jobs.items()} == {
        (loss, seed): ("w0.pt", "w1.pt")[seed % 2] for loss in specs for seed in (0, 1, 2, 3)}
    assert all(job.seed == seed and job.loss == final_name(loss) and job.tag == f"-seed{seed}-w{seed % 2}"
               for (loss, seed), job in jobs.items())
    assert final_name("focal+l1") == "focal+l1" and final_name("square@g1.8") == "pap.square.g1.8"
    partial = final_jobs((0, 1, 2, 3), list(specs), specs, ("w0.pt", None))
    assert sorted({seed for _, seed in partial}) == [0, 2]


def test_cuda_mps_is_off_without_a_gpu_or_when_disabled(monkeypatch):
    """No CUDA here (or --no-mps): the trainings run as before, nothing is started and the
    environment is left as it was."""
    import os

    from bench.search import cuda_mps

    before = dict(os.environ)
    with cuda_mps(enabled=False) as on:
        assert on is False
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with cuda_mps(enabled=True) as on:
        assert on is False
    assert dict(os.environ) == before


def test_options_that_paploss_search_has_are_its_own():
    """Every option the benchmark shares with ``paploss search`` is declared there once:
    the same flags, type, default and help; and none of the benchmark's own options
    repeats one of them under another help."""
    from bench.search import SHARED_OPTIONS, bench
    from paploss.search_cli import search

    ours = {p.name: p for p in bench.params}
    theirs = {p.name: p for p in search.params}
    for name in SHARED_OPTIONS:
        a, b = ours[name], theirs[name]
        assert (a.opts, a.secondary_opts, a.type.to_info_dict(), a.default, a.help, a.envvar) == \
            (b.opts, b.secondary_opts, b.type.to_info_dict(), b.default, b.help, b.envvar), name
    flags = {flag: name for name, p in theirs.items() for flag in p.opts}
    repeated = {p.name for p in bench.params for flag in p.opts if flag in flags and p.name not in SHARED_OPTIONS}
    assert repeated == {"preset", "work"}  # bench's own sizes and cache folder: other choices, other default
    with pytest.raises(ValueError, match=r"paploss search has no options \['trial_seeds'\]"):
        from bench.search import shared_options

        shared_options("rounds", "trial_seeds")
