"""``bench.device_search`` end to end at the smoke size, in a subprocess (it ends
with ``os._exit`` to drop trainings past its budget): the rounds fitted to the
budget, the search's own mean trained in the finals, and the guard that skips a
search too short to mean anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paploss import steps, storage

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--pipeline-preset", "smoke", "--n-train", "24", "--n-val", "8", "--proxy-iterations", "3",
         "--final-iterations", "4", "--samples", "2", "--max-rounds", "2", "--jobs", "2", "--datasets", "shapes",
         "--seeds", "0", "--search-budget-s", "600", "--total-budget-s", "900"]


def _run(work: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", "bench.device_search", "--work", str(work), "--out", str(out),
                           *SMOKE, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


@pytest.mark.slow
def test_device_search_fits_rounds_trains_its_mean_and_skips_short_searches(tmp_path):
    work = tmp_path / "work"
    timing_state = str(work / "shapes" / "searches" / "timing-shapes-s2" / "state" / "round-000.json")
    run = _run(work, tmp_path / "out", "--min-rounds", "1", "--losses", "searched,square",
               "--compare", "start=" + timing_state.replace("shapes", "{dataset}"))
    # a budget of minutes for rounds of seconds: the cap, and every round done
    assert run["rounds"] == 2 and run["searches"]["shapes"]["rounds_done"] == 2
    state = run["searches"]["shapes"]["state"]
    assert state.endswith("round-002.json")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(results["shapes"]) == ["searched", "square", "start"]
    assert all(len(results["shapes"][loss]["AP"]) == 1 for loss in results["shapes"])
    # the final training of "searched" used the search's final mean, "start" the compared state's
    # each final is flow.finals' (steps.final_train's file of its loss, seed and warm start)
    finals = steps.search_dir(str(work / "shapes"), "device-finals") + "/final"
    final = storage.read_json(f"{finals}/pap.searched-seed0-w0.json")
    assert final["spec"] == steps.load_controller(state).spec().to_json()
    start = storage.read_json(f"{finals}/pap.start-seed0-w0.json")
    assert start["spec"] == steps.load_controller(timing_state).spec().to_json()
    assert run["finals_all"]["shapes/searched/seed0"] == final["metrics"]
    assert "| searched |" in (tmp_path / "out" / "summary.md").read_text()

    # the same budget with a floor of 99 rounds: no search, the other losses' finals only
    skipped = _run(work, tmp_path / "out2", "--min-rounds", "99", "--losses", "searched,square")
    assert skipped["skipped"] == "R = 2 < --min-rounds 99" and skipped["searches"] == {"shapes": {}}
    assert sorted(json.loads((tmp_path / "out2" / "results.json").read_text())["shapes"]) == ["square"]
