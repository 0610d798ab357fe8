"""One line per error: every ``paploss`` command says an expected failure as
``Error: <file or option>: <what is wrong>`` on stderr, exit 2 for bad input and 1
for a failure while running; ``PAPLOSS_DEBUG=1`` keeps the traceback; anything
else is a bug and keeps its traceback. Bad options and unwritable outputs are found
before any work (nothing is written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from paploss import errors, storage
from paploss.cli import main

PAPLOSS = [sys.executable, "-m", "paploss.cli"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from paploss.data import make_dataset

    return Path(make_dataset("shapes", tmp_path_factory.mktemp("ds") / "shapes", n_train=6, n_val=3, image_size=48))


def _copy(dataset: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "data"
    shutil.copytree(dataset, out)
    return out


def _one_error_line(result, code: int, *needles: str) -> str:
    """The result failed with ``code`` and said so in exactly one ``Error:`` line holding every needle."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors_ = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors_) == 1 and lines[-1] == errors_[0], result.output
    for needle in needles:
        assert needle in errors_[0], (needle, errors_[0])
    return errors_[0]


# ----------------------------------------------------------------------------- the family


def test_the_family_and_its_exit_codes():
    from paploss.data.coco import CocoFormatError
    from paploss.steps.errors import SearchFailed, StepError

    assert issubclass(CocoFormatError, errors.InputError) and issubclass(CocoFormatError, ValueError)
    assert issubclass(StepError, errors.InputError) and issubclass(SearchFailed, errors.RunError)
    assert issubclass(storage.StorageError, errors.PaplossError) and issubclass(storage.StorageError, OSError)
    assert issubclass(storage.NotFound, errors.InputError) and issubclass(storage.NotFound, FileNotFoundError)
    assert (errors.InputError("x", "y").exit_code, errors.RunError("y").exit_code, storage.StorageError("z").exit_code) \
        == (2, 1, 1)
    assert str(errors.InputError("--out", "is a file")) == "--out: is a file"
    assert errors.one_line(ValueError("a\n  b\tc")) == "a b c"


def test_a_bug_keeps_its_traceback(monkeypatch):
    from paploss import cli

    monkeypatch.setitem(cli.COMMANDS, "boom", ("tests.test_errors:_boom", "a bug"))
    result = CliRunner().invoke(main, ["boom"])
    assert isinstance(result.exception, ZeroDivisionError)  # not turned into a one-liner


def _boom_fn():
    1 / 0


import click  # noqa: E402

_boom = click.Command("boom", callback=_boom_fn)


def test_foreign_expected_errors_are_one_line_too(monkeypatch):
    """TrackingError (paploss.tracking) is an expected failure while running: exit 1."""
    from paploss import cli

    monkeypatch.setitem(cli.COMMANDS, "fail", ("tests.test_errors:_fail", "fails"))
    line = _one_error_line(CliRunner().invoke(main, ["fail"]), 1, "HTTP 503 retry later", "me:***@host")
    assert "secret" not in line


def _fail_fn():
    from paploss.tracking import TrackingError

    raise TrackingError("MLflow store http://me:secret@host/: HTTP 503\nretry later")


_fail = click.Command("fail", callback=_fail_fn)


# ----------------------------------------------------------------------------- data


def test_data_check_bad_coco(dataset, tmp_path):
    data = _copy(dataset, tmp_path)
    ann = data / "annotations" / "train.json"
    coco = json.loads(ann.read_text())
    runner = CliRunner()

    missing = data / "images" / coco["images"][0]["file_name"]
    missing.rename(tmp_path / "moved.png")
    _one_error_line(runner.invoke(main, ["data", "check", str(ann), "--images", str(data / "images")]), 2,
                    str(ann), "missing image file", coco["images"][0]["file_name"])
    (tmp_path / "moved.png").rename(missing)

    bad = json.loads(ann.read_text())
    bad["annotations"][0]["category_id"] = 999
    ann.write_text(json.dumps(bad))
    _one_error_line(runner.invoke(main, ["data", "check", str(ann)]), 2, str(ann), "unknown category_id 999")

    ann.write_text(json.dumps(coco)[:200])
    _one_error_line(runner.invoke(main, ["data", "check", str(ann)]), 2, str(ann), "truncated")
    _one_error_line(runner.invoke(main, ["data", "check", str(tmp_path / "nope.json")]), 2,
                    "nope.json", "no such file")


def test_data_make_and_split_bad_input(dataset, tmp_path):
    runner = CliRunner()
    (tmp_path / "file").write_text("x")
    _one_error_line(runner.invoke(main, ["data", "make", "shapes", "--out", str(tmp_path / "file" / "ds")]), 2,
                    "--out", "is a file, not a folder")
    _one_error_line(runner.invoke(main, ["data", "make", "shapes", "--out", str(dataset), "--n-train", "3"]), 2,
                    "already holds a different dataset")
    _one_error_line(runner.invoke(main, ["data", "split", "--data", str(dataset), "--val-fraction", "1.5"]), 2,
                    "val_fraction")
    assert not (tmp_path / "file").is_dir()


# ----------------------------------------------------------------------------- train / pretrain / evaluate


def test_train_bad_coco_is_one_line(dataset, tmp_path):
    data = _copy(dataset, tmp_path)
    ann = data / "annotations" / "train.json"
    coco = json.loads(ann.read_text())
    bad = json.loads(ann.read_text())
    bad["annotations"][0]["category_id"] = 77
    ann.write_text(json.dumps(bad))
    args = ["train", "--data", str(data), "--iterations", "1", "--quiet", "--out", str(tmp_path / "run")]
    _one_error_line(CliRunner().invoke(main, args), 2, str(ann), "unknown category_id 77")
    ann.write_text(json.dumps(coco)[:300])
    _one_error_line(CliRunner().invoke(main, args), 2, str(ann), "not valid JSON")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_unwritable_outputs_are_found_before_work(dataset, tmp_path, monkeypatch):
    from paploss import engine

    def no_work(*args, **kwargs):
        raise AssertionError("trained although the output cannot be written")

    monkeypatch.setattr(engine, "train", no_work)
    monkeypatch.setattr(engine, "pretrain", no_work)
    monkeypatch.setattr(engine, "evaluate_checkpoint", no_work)
    x = tmp_path / "X"
    x.write_text("a file")
    runner = CliRunner()
    _one_error_line(runner.invoke(main, ["train", "--data", str(dataset), "--iterations", "1", "--out", str(x / "out")]),
                    2, "--out", f"{x} is a file")
    _one_error_line(runner.invoke(main, ["train", "--data", str(dataset), "--iterations", "1", "--out", str(x)]),
                    2, "--out", "is a file, not a folder")
    _one_error_line(runner.invoke(main, ["pretrain", "--data", str(dataset), "--out", str(x / "bb.pt")]),
                    2, "--out", f"{x} is a file")
    _one_error_line(runner.invoke(main, ["evaluate", str(tmp_path / "ck.pt"), "--out", str(x / "m.json")]),
                    2, "--out", f"{x} is a file")
    _one_error_line(runner.invoke(main, ["evaluate", str(tmp_path / "ck.pt"), "--out", str(tmp_path)]),
                    2, "--out", "is a folder, not a file")


def test_train_option_errors_name_flags(dataset, tmp_path, monkeypatch):
    runner = CliRunner()
    _one_error_line(runner.invoke(main, ["train", "--data", str(dataset), "--iterations", "0"]), 2, "--iterations:")
    _one_error_line(runner.invoke(main, ["train", "--data", str(dataset), "--lr", "-1", "--iterations", "1"]), 2,
                    "--lr:")
    _one_error_line(runner.invoke(main, ["train", "--data", str(dataset), "--spec", "s.json", "--form", "square"]), 2,
                    "--spec/--form: give --spec or --form, not both")
    (tmp_path / "s.json").write_text("{")
    line = _one_error_line(runner.invoke(main, ["train", "--data", str(dataset), "--spec", str(tmp_path / "s.json")]),
                           2, "--spec", "s.json")
    assert "LossSpec" not in line and "handcrafted(" not in line
    _one_error_line(runner.invoke(main, ["train", "--data", str(dataset), "--form", "square", "--loss", "focal+l1"]),
                    2, "--form")


def test_paploss_alone_trains_the_papers_retinanet_loss(dataset, tmp_path, monkeypatch):
    """``paploss train --loss paploss`` without --spec/--form: the documented default spec."""
    from paploss import engine
    from paploss.engine_cli import default_spec
    from paploss.spec import LossSpec

    seen = {}

    class Done(Exception):
        pass

    def capture(config, progress=True):
        seen["config"] = config
        raise Done

    monkeypatch.setattr(engine, "train", capture)
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--loss", "paploss", "--iterations", "1"])
    assert isinstance(result.exception, Done), result.output
    spec = seen["config"].spec
    assert spec == default_spec() and spec.form == "searched" and spec.grad_scale == pytest.approx(4.1231)
    # the same numbers as the mmdet config of the paper's RetinaNet
    cfg = (Path(__file__).parents[1] / "configs" / "mmdet" / "paploss_retinanet_r50_fpn_1x_coco.py").read_text()
    for points in spec.points:
        assert ", ".join(repr(v) for v in points) in cfg
    assert isinstance(spec, LossSpec) and "retinanet_paper.json" in CliRunner().invoke(main, ["train", "--help"]).output


# ----------------------------------------------------------------------------- search / run


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--controller", '{"sigma": -1}'], "sigma must be > 0"),
    (["--controller", '{"colour": 1}'], "unexpected keyword argument 'colour'"),
    (["--controller", "[1]"], "--controller: '[1]' must be a JSON object"),
    (["--proxy", "{"], "--proxy: '{' is not JSON"),
    (["--final", '{"lr": -1}'], "final options: lr must be > 0"),
    (["--proxy", '{"iterations": 0}'], "proxy options: iterations must be >= 1"),
    (["--tracking-uri", "postgresql://me:pw@db.invalid/x"], "postgresql database driver is not installed"),
    (["--tracking-uri", "ftp://host/x"], "unknown scheme 'ftp'"),
])
@pytest.mark.parametrize("command", ["run", "search"])
def test_bad_options_stop_before_any_work(cli_env, command, args, message):
    work = cli_env / "w"
    work.mkdir()
    line = _one_error_line(CliRunner().invoke(main, [command, "--preset", "smoke", "--work", str(work), *args]), 2,
                           message)
    assert "resume" not in line and ":pw@" not in line
    assert list(work.iterdir()) == [] and not (cli_env / "runs").exists() and not (cli_env / "mlflow.db").exists()


def test_pretrain_options_are_checked_before_any_work(cli_env, monkeypatch):
    from paploss import presets

    bad = presets.PRESETS["smoke"].with_overrides(pretrain={"iterations": 0, "batch_size": 8})
    monkeypatch.setitem(presets.PRESETS, "smoke", bad)
    _one_error_line(CliRunner().invoke(main, ["search", "--preset", "smoke", "--work", "w"]), 2,
                    "pretrain options: iterations=0")
    assert not (cli_env / "w").exists()


def test_an_existing_search_with_other_settings_is_refused_before_work(cli_env):
    from paploss.steps.update import init_search

    work = cli_env / "w"
    init_search(str(work), "s1", 2, 2, seed=0)
    state = work / "searches" / "s1" / "state" / "round-000.json"
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    runner = CliRunner()
    for args, needle in ((["--seed", "3"], "seed=0 there, 3 now"),
                         (["--controller", '{"sigma": 0.3}'], "starting sigma differs"),
                         (["--reward-seeds", "2"], "reward_seeds=1, not 2")):
        for command in ("run", "search"):
            line = _one_error_line(runner.invoke(main, [command, "--preset", "smoke", "--work", str(work),
                                                        "--search-name", "s1", *args]),
                                   2, "search 's1' already exists", needle)
            assert "resume" not in line
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
    state.write_text('{"controller": {trunc')
    _one_error_line(runner.invoke(main, ["search", "--preset", "smoke", "--work", str(work), "--search-name", "s1"]),
                    2, str(state), "not valid JSON")
    state.write_text('{"controller": {"format": "paploss.search.Controller", "version": 1}}')
    _one_error_line(runner.invoke(main, ["search", "--preset", "smoke", "--work", str(work), "--search-name", "s1"]),
                    2, str(state), "corrupt search state")
    assert not (cli_env / "mlflow.db").exists()


# ----------------------------------------------------------------------------- for real: stderr and exit codes


def _run(args, cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run(PAPLOSS + args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_subprocess_stderr_exit_code_and_debug(dataset, tmp_path):
    data = _copy(dataset, tmp_path)
    ann = data / "annotations" / "val.json"
    ann.write_text(ann.read_text()[:150])
    r = _run(["data", "check", str(ann)], tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"Error: {ann}: not valid JSON"), r.stderr
    x = tmp_path / "X"
    x.write_text("a file")
    r = _run(["train", "--data", str(data), "--iterations", "1", "--out", str(x / "out")], tmp_path)
    assert (r.returncode, r.stderr) == (2, f"Error: --out: {x / 'out'} cannot be created: {x} is a file, not a folder\n")
    r = _run(["data", "check", str(ann)], tmp_path, PAPLOSS_DEBUG="1")
    assert r.returncode == 1 and "Traceback" in r.stderr and "CocoFormatError" in r.stderr


# ----------------------------------------------------------------------------- compile / submit


def test_compile_and_submit_say_one_line(tmp_path):
    runner = CliRunner()
    (tmp_path / "F").write_text("a file")
    _one_error_line(runner.invoke(main, ["compile", "--preset", "smoke", "--out", str(tmp_path / "F" / "p.yaml")]),
                    2, str(tmp_path / "F"))
    _one_error_line(runner.invoke(main, ["submit", "--host", "http://127.0.0.1:1", "--package",
                                         str(tmp_path / "x.yaml")]), 2, "x.yaml", "does not exist")


def test_os_errors_naming_a_file_are_expected_failures():
    import errno as errno_

    from paploss.cli import exit_code_of

    assert exit_code_of(FileNotFoundError(errno_.ENOENT, "No such file or directory", "/x")) == 2
    assert exit_code_of(PermissionError(errno_.EACCES, "Permission denied", "/x")) == 2
    assert exit_code_of(OSError(errno_.ENOSPC, "No space left on device", "/x")) == 1
    assert exit_code_of(OSError("no file named")) is None  # not about a file: a bug
    assert exit_code_of(KeyError("x")) is None


def test_retrain_says_one_line_and_masks_the_tracking_uri(tmp_path):
    r = _run(["retrain", "--host", "http://127.0.0.1:1", "--dataset", "s3://x/y", "--tracking-uri",
              "http://me:pw@127.0.0.1:1"], tmp_path)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ") and "127.0.0.1:1" in r.stderr, r.stderr
    assert "me:pw" not in r.stderr
