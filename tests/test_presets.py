"""The presets: the default `make run` preset (`demo`) and its table, from recorded finals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from paploss import presets, steps, storage
from paploss.search_cli import format_table
from paploss.spec import form_theta


def test_make_run_uses_the_demo_preset():
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    assert re.search(r"^PRESET \?= demo$", makefile, re.M)


def test_the_demo_search_starts_at_square_and_sweeps_every_finals_lr():
    p = presets.get_preset("demo")
    assert presets.SQUARE_THETA == pytest.approx(form_theta("square"), abs=1e-12)
    assert p.controller["mu"] == presets.SQUARE_THETA
    assert len(steps.sweep_lrs(p.lr_sweep)) >= 2
    final = steps.train_options(p.final)
    assert final["detach_i3"] and steps.train_options(p.proxy)["detach_i3"]
    steps.check_train_options(final, "final", loss="paploss")
    steps.check_train_options(steps.loss_options(final, "focal+l1"), "final")  # the baselines drop detach_i3
    # two trainings side by side, one thread each, on 2 cores
    assert p.parallelism == 2 and final["num_threads"] == steps.train_options(p.proxy)["num_threads"] == 1


def _final(loss: str, ap: float, ap50: float) -> str:
    return json.dumps({"loss": loss, "metrics": {"AP": ap, "AP50": ap50}, "model_version": None})


def test_the_table_states_searched_minus_start_and_the_lrs(tmp_path):
    """The report and its console table on recorded finals (no training)."""
    p = presets.get_preset("demo")
    work = str(tmp_path)
    out = steps.init_search(work, "demo-1", p.rounds, p.samples, seed=0, controller=p.controller)
    steps.lr_pick([json.dumps({"loss": loss, "lr": lr, "score": score, "seconds": 9.0})
                   for loss, lr, score in (("searched", 0.01, 0.20), ("searched", 0.02, 0.22),
                                           ("start", 0.01, 0.21), ("start", 0.02, 0.19),
                                           ("focal+l1", 0.01, 0.05), ("focal+l1", 0.02, 0.08),
                                           ("focal+giou", 0.01, 0.06), ("focal+giou", 0.02, 0.07))],
                  work, "demo-1")
    finals = [_final("searched", 0.3125, 0.61), _final("start", 0.3050, 0.60), _final("focal+l1", 0.2012, 0.45),
              _final("focal+giou", 0.2233, 0.47)]
    table = json.loads(steps.report(finals, out["state"], work, "demo-1"))
    assert table["searched_minus_start"] == pytest.approx(0.75)
    assert table["lrs"] == {"focal+giou": 0.02, "focal+l1": 0.02, "searched": 0.02, "start": 0.01}
    assert storage.read_json(str(tmp_path / "searches" / "demo-1" / "report.json"))["lrs"] == table["lrs"]
    text = format_table(table)
    assert "searched - start: +0.75 AP" in text
    assert "searched 0.02, start 0.01" in text
    rows = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()[1:5]}
    assert rows == {"searched": 31.25, "start": 30.5, "focal+l1": 20.12, "focal+giou": 22.33}
    assert "focal+giou beat it" not in table["promotion"]["reason"]
