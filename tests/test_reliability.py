"""Reliability: the controller keeps its word, files are made for a team, secrets stay
secret, temporary files do not outlive their writer (docs/reliability.md)."""

from __future__ import annotations

import copy
import math
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from paploss import storage
from paploss.errors import mask
from paploss.search import Controller


# ----------------------------------------------------------------------------- the controller


@pytest.mark.filterwarnings("ignore:reward of sample:RuntimeWarning")
@pytest.mark.parametrize("rewards", [
    [1.7e308, 1.7e308, 0.0, 0.0],     # the mean overflows
    [1.7e308, -1.7e308, 0.0, 0.0],    # an advantage overflows
    [float("nan"), 1.7e308, 1.7e308, 0.0],  # with a failed trial among them
])
def test_overflowing_rewards_raise_and_leave_the_controller_unchanged(rewards):
    c = Controller(rounds=3, steps=5)
    c.update(c.sample(4), [0.1, 0.2, 0.3, 0.4])
    before = copy.deepcopy(c.state_dict())
    thetas = c.sample(4)
    with pytest.raises(ValueError, match="overflow|not finite"):
        c.update(thetas, rewards)
    assert c.state_dict() == before
    assert all(math.isfinite(x) for x in c.mu.tolist())
    # and it goes on as if the bad call had not happened
    twin = Controller.from_state_dict(before)
    assert c.update(thetas, [0.0, 0.1, 0.2, 0.3]) == twin.update(thetas, [0.0, 0.1, 0.2, 0.3])


def test_failed_trials_still_count_as_min_reward():
    """NaN / Inf rewards are failed trials (SPEC §3), not an overflow."""
    c = Controller(rounds=2, steps=5, min_reward=0.0)
    with pytest.warns(RuntimeWarning, match="failed trial"):
        rec = c.update(c.sample(4), [float("nan"), float("inf"), 0.2, 0.3])
    assert rec.failed == [0, 1] and c.round == 1


def test_controller_has_no_file_io():
    assert not any(hasattr(Controller, name) for name in ("save", "load"))
    c = Controller(rounds=2, steps=5)
    with pytest.raises(ValueError, match="JSON object"):
        Controller.from_state_dict('{"format": "paploss.search.Controller"}')
    assert Controller.from_state_dict(c.state_dict()).state_dict() == c.state_dict()


# ----------------------------------------------------------------------------- files for a team


@pytest.mark.parametrize("mask_", [0o022, 0o002, 0o027])
def test_written_files_and_folders_follow_the_umask(tmp_path, mask_):
    old = os.umask(mask_)
    try:
        storage.write_text(str(tmp_path / "a" / "f.json"), "{}")
        with storage.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "f.json").stat().st_mode) == 0o666 & ~mask_
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask_
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(storage.TMP_SUFFIX)]


def test_a_failed_write_leaves_no_temporary_behind(tmp_path, monkeypatch):
    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes(str(tmp_path / "f"), b"x")
    with pytest.raises(OSError, match="disk full"), storage.atomic_dir(tmp_path / "d"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_swept(tmp_path):
    work, temp = tmp_path / "work", tmp_path / "systmp"
    (work / "searches" / "s").mkdir(parents=True)
    temp.mkdir()
    old, young = time.time() - 7200, time.time()
    stale = [work / "searches" / "s" / ".round-001.json.abc123.tmp", work / ".data.x1y2.tmp", temp / "paploss-trial-k1"]
    fresh = [work / "searches" / "s" / ".trial.json.zz.tmp", temp / "paploss-trial-live"]
    kept = [work / "searches" / "s" / "round-000.json", temp / "other-tool-dir"]
    for path in stale + fresh + kept:
        if path.name.startswith((".data", "paploss-", "other")):
            path.mkdir()
            (path / "inner").write_text("x")
        else:
            path.write_text("x")
    for path in stale:
        for p in [path, *path.rglob("*")]:
            os.utime(p, (old, old))
    (temp / "paploss-trial-live" / "inner").touch()  # a trial still writing
    os.utime(temp / "paploss-trial-live", (old, old))  # its folder is old, its checkpoint is not
    removed = storage.sweep_temp(work, older_than=1800, temp_dir=temp, now=young)
    assert sorted(removed) == sorted(str(p) for p in stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in fresh + kept)


# ----------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("text, shown", [
    ("https://me:s3cret@mlflow.example.org/", "https://me:***@mlflow.example.org/"),
    ("postgresql://mlflow:p%40ss@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("http://tok3n@host/x", "http://***@host/x"),
    ("https://h/api?token=abc&x=1", "https://h/api?token=***&x=1"),
    ("https://b.s3/k?X-Amz-Credential=AK&X-Amz-Signature=ff", "https://b.s3/k?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("run failed at http://u:pw@h:5000: 503", "run failed at http://u:***@h:5000: 503"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("s3://bucket/work", "s3://bucket/work"),
    ("mail me@example.org", "mail me@example.org"),
    ("http://h/?access_key=1&api_key=2&monkey=3", "http://h/?access_key=***&api_key=***&monkey=3"),
    # the MLflow UI link the run prints: a view's share key is no secret and must stay clickable
    ("http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=ab12",
     "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=ab12"),
])
def test_mask(text, shown):
    assert mask(text) == shown


def test_tracking_credentials_never_reach_the_console(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from paploss.cli import main
    from paploss.search_cli import format_table, settings_from_options

    monkeypatch.chdir(tmp_path)
    uri = "https://me:s3cret@127.0.0.1:9/"
    result = CliRunner().invoke(main, ["search", "--preset", "smoke", "--work", "w", "--tracking-uri", uri])
    assert result.exit_code == 2 and "me:***@127.0.0.1:9" in result.output and "s3cret" not in result.output
    result = CliRunner().invoke(main, ["run", "--preset", "smoke", "--work", "w", "--tracking-uri",
                                       "postgresql://me:s3cret@db/x"])
    assert result.exit_code == 2 and "s3cret" not in result.output
    s = settings_from_options(preset="smoke", dataset=None, work="w", search_name="x", rounds=None, samples=None,
                              parallelism=None, max_failed_trials=None, attempts=None, seed=None, detector=None,
                              proxy_epochs=0, final_epochs=0, proxy_json=None, final_json=None,
                              controller_json=None, tracking_uri=uri, experiment="e", model_name="m", promote=True)
    table = format_table({"final": {}, "rounds": 1, "failed_trials": 0}, s)
    assert "s3cret" not in table and "me:***@" in table


def test_run_log_masks_credentials(tmp_path):
    import io

    from pipelines.run_local import _Tee

    log, console = io.StringIO(), io.StringIO()
    tee = _Tee(log, console)
    tee.write("inputs: tracking_uri=https://me:s3cret@h/\n    paploss> MLflow at https://me:s3cret@h/\n")
    assert "s3cret" not in log.getvalue() + console.getvalue() + "".join(tee.tail)
    assert console.getvalue() == "MLflow at https://me:***@h/\n"


def test_compiled_pipeline_takes_mlflow_credentials_from_a_secret(tmp_path):
    import yaml

    from pipelines.compile import compile_pipeline

    docs = list(yaml.safe_load_all(Path(compile_pipeline(str(tmp_path / "p.yaml"), preset="smoke")).read_text()))
    platform = next(d for d in docs if "platforms" in d)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform
    for name, executor in platform.items():
        refs = [s for s in executor.get("secretAsEnv", [])
                if {k["envVar"] for k in s["keyToEnv"]} == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                                           "MLFLOW_TRACKING_TOKEN"}]
        assert len(refs) == 1, name
        ref = refs[0]
        assert ref["optional"] is True and all(k["secretKey"] == k["envVar"] for k in ref["keyToEnv"])
        named = ref["secretNameParameter"]
        # a pipeline parameter naming the secret, or the default name
        assert named.get("componentInputParameter", "").endswith("mlflow_secret") \
            or named.get("runtimeValue", {}).get("constant") == "paploss-mlflow", named


def test_reliability_doc_cites_tests_that_exist():
    import re

    root = Path(__file__).parents[1]
    doc = (root / "docs" / "reliability.md").read_text(encoding="utf-8")
    defined = set()
    for path in (root / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M))
    cited = set(re.findall(r"\b(test_\w+)\b", doc)) - {p.stem for p in (root / "tests").glob("test_*.py")}
    assert len(cited) > 20 and not cited - defined, sorted(cited - defined)
    for name in set(re.findall(r"tests/(test_\w+)\.py", doc)):
        assert (root / "tests" / f"{name}.py").exists(), name
