"""Nothing we load runs code: crafted pickles are refused before their payload runs,
and broken files give one line naming the file.

The crafted file is a real torch file whose pickle calls ``os.system`` when
unpickled (the attack of a planted warm start). A control load with
``weights_only=False`` proves the payload does run when allowed to, so the checks
below can fail."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from paploss import checkpoints, presets, steps
from paploss.cli import main
from paploss.data import make_dataset, search_split
from paploss.errors import InputError


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path, fmt: str) -> Path:
    """A torch file of format ``fmt`` with a payload hidden among its tensors."""
    torch.save({"format": fmt, "backbone": "mobilenet_v3_small", "state_dict": {"w": torch.zeros(1)},
                "model": {}, "config": _Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = make_dataset("shapes", tmp_path_factory.mktemp("ck") / "shapes", n_train=12, n_val=4, image_size=64,
                        progress=False)
    search_split(root)
    return root


def test_the_payload_runs_when_allowed_so_the_checks_below_can_fail(tmp_path):
    marker = tmp_path / "ran"
    evil = _crafted(tmp_path / "evil.pt", marker, checkpoints.CHECKPOINT)
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", [checkpoints.CHECKPOINT, checkpoints.BACKBONE])
def test_load_refuses_a_crafted_pickle_before_it_runs(tmp_path, fmt):
    marker = tmp_path / "ran"
    evil = _crafted(tmp_path / "evil.pt", marker, fmt)
    with pytest.raises(InputError, match="refused to load: it holds more than data") as err:
        checkpoints.load(str(evil), fmt)
    assert not marker.exists()
    assert str(evil) in str(err.value) and "\n" not in str(err.value)


def test_broken_files_name_the_file_and_the_problem(tmp_path):
    fmt = checkpoints.CHECKPOINT
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "text.pt"
    text.write_text("not a torch file")
    good = tmp_path / "good.pt"
    checkpoints.save(str(good), {"format": fmt, "model": {"w": torch.ones(2)}})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    other = tmp_path / "other.pt"
    checkpoints.save(str(other), {"format": checkpoints.BACKBONE, "state_dict": {}})
    cases = {
        tmp_path / "missing.pt": "no such file",
        tmp_path: "is a folder",
        empty: "the file is empty",
        text: "not a readable torch file",
        cut: "not a readable torch file",
        other: "format 'paploss-backbone/1', expected a checkpoint",
    }
    for path, what in cases.items():
        with pytest.raises(InputError, match=what) as err:
            checkpoints.load(str(path), fmt)
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    with pytest.raises(InputError, match="without 'optimizer'"):
        checkpoints.load(str(good), fmt, keys=("model", "optimizer"))
    assert torch.equal(checkpoints.load(str(good), fmt)["model"]["w"], torch.ones(2))


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_evaluate_and_train_init_refuse_a_crafted_file_with_one_line(tiny, tmp_path):
    marker = tmp_path / "ran"
    evil_ckpt = _crafted(tmp_path / "ckpt.pt", marker, checkpoints.CHECKPOINT)
    r = _cli("evaluate", str(evil_ckpt), "--data", str(tiny), "--ann", "search_val")
    assert r.exit_code == 2 and not marker.exists()
    assert r.output.strip().splitlines() == [f"Error: {evil_ckpt}: " + r.output.split(f"{evil_ckpt}: ", 1)[1].strip()]

    evil_bb = _crafted(tmp_path / "bb.pt", marker, checkpoints.BACKBONE)
    r = _cli("train", "--data", str(tiny), "--preset", "smoke", "--init", str(evil_bb), "--iterations", "1",
             "--out", str(tmp_path / "run"), "--quiet")
    assert r.exit_code == 2 and not marker.exists(), r.output
    assert "refused to load" in r.output and len(r.output.strip().splitlines()) == 1


def test_resume_refuses_a_planted_checkpoint(tiny, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "run").mkdir()
    _crafted(tmp_path / "run" / "checkpoint.pt", marker, checkpoints.CHECKPOINT)
    r = _cli("train", "--data", str(tiny), "--preset", "smoke", "--iterations", "1", "--out", str(tmp_path / "run"),
             "--quiet")
    assert r.exit_code == 2 and not marker.exists(), r.output
    assert "checkpoint.pt: refused to load" in r.output


def test_a_pipeline_trial_with_a_planted_warm_start_runs_no_code(tiny, tmp_path):
    marker = tmp_path / "ran"
    work = tmp_path / "work"
    evil = _crafted(tmp_path / "warm.pt", marker, checkpoints.BACKBONE)
    out = steps.init_search(str(work), "s", rounds=1, samples=2, seed=0)
    proxy = steps.train_options(dict(presets.get_preset("smoke").proxy), "retinanet_mobilenet_v3_small")
    result = json.loads(steps.proxy_trial(str(tiny), str(evil), out["trials"][0], proxy, str(work), "s",
                                          state=out["state"], attempts=1))
    assert not marker.exists()
    assert result["failed"] and result["reward"] is None and "refused to load" in result["error"]
