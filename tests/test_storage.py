"""paploss.storage's local folder publishing: atomic_dir and download_dir (local to local).

S3 round trips (upload_dir, download_dir through localize) run against a real
moto_server in test_data.py, test_engine.py and test_pipeline.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from paploss import storage


def _entries(folder: Path) -> list[str]:
    """Every name in a folder, hidden ones (the temporary siblings) included."""
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- atomic_dir
def test_atomic_dir_publishes_on_success(tmp_path):
    dest = tmp_path / "parent" / "out"  # the parent is created
    with storage.atomic_dir(dest) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        assert tmp.parent == dest.parent and tmp.name.startswith(".out.")  # a hidden sibling: same filesystem
        assert not dest.exists()  # nothing visible until the block ends
        (tmp / "a").mkdir()
        (tmp / "a" / "f.txt").write_text("hello")
    assert (dest / "a" / "f.txt").read_text() == "hello"
    assert _entries(dest.parent) == ["out"]  # no temporary folder left


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_error_leaves_no_dest_and_no_temporary(tmp_path, exc):
    dest = tmp_path / "out"
    with pytest.raises(type(exc)):
        with storage.atomic_dir(dest) as tmp:
            (tmp / "half.txt").write_text("half-written")
            raise exc
    assert not dest.exists() and not tmp.exists()
    assert _entries(tmp_path) == []


def test_atomic_dir_error_keeps_the_old_dest(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with storage.atomic_dir(dest, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash before publishing")
    assert _entries(dest) == ["old.txt"] and _entries(tmp_path) == ["out"]


def test_atomic_dir_replace_removes_what_was_there(tmp_path):
    dest = tmp_path / "out"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "old.txt").write_text("old")
    with storage.atomic_dir(dest, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _entries(dest) == ["new.txt"] and _entries(tmp_path) == ["out"]


def test_atomic_dir_without_replace_takes_an_empty_dest_only(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with storage.atomic_dir(empty) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _entries(empty) == ["new.txt"]

    # a dest filled while the folder was being built is left as it is
    dest = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared meanwhile and is not empty"):
        with storage.atomic_dir(dest) as tmp:
            (tmp / "new.txt").write_text("new")
            dest.mkdir()
            (dest / "theirs.txt").write_text("someone else's")
    assert _entries(dest) == ["theirs.txt"] and not tmp.exists()
    assert _entries(tmp_path) == ["empty", "out"]


def test_atomic_dir_refuses_s3(tmp_path):
    with pytest.raises(ValueError, match="local folder"):
        with storage.atomic_dir("s3://bucket/prefix"):
            pass


# ----------------------------------------------------------------------------- download_dir
@pytest.fixture()
def source(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.png").write_bytes(b"\x89PNG a")
    (src / "annotations").mkdir()
    (src / "annotations" / "val.json").write_text("{}")
    return src


def test_download_dir_copies_and_replaces(source, tmp_path):
    dest = tmp_path / "cache" / "data"
    assert storage.download_dir(str(source), dest) == dest
    assert list(storage.list_files(dest)) == ["annotations/val.json", "images/a.png"]
    assert (dest / "images" / "a.png").read_bytes() == b"\x89PNG a"
    # a second download replaces the folder (a stale file does not survive)
    (dest / "stale.txt").write_text("stale")
    storage.download_dir(str(source), dest)
    assert list(storage.list_files(dest)) == ["annotations/val.json", "images/a.png"]
    assert _entries(dest.parent) == ["data"]


def test_download_dir_failure_keeps_the_old_copy(source, tmp_path, monkeypatch):
    dest = tmp_path / "data"
    storage.download_dir(str(source), dest)
    (source / "images" / "b.png").write_bytes(b"b")
    copied = []

    def failing_copy(src, dst):
        if copied:
            raise OSError("disk full")
        copied.append(dst)
        return shutil.copyfile(src, dst)

    monkeypatch.setattr(storage.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        storage.download_dir(str(source), dest)
    assert list(storage.list_files(dest)) == ["annotations/val.json", "images/a.png"]  # the old copy, whole
    assert _entries(tmp_path) == ["data", "src"]


def test_download_dir_of_nothing_creates_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no files under"):
        storage.download_dir(str(tmp_path / "empty"), tmp_path / "out" / "data")
    assert _entries(tmp_path) == ["empty"]


# ----------------------------------------------------------------------------- location_id
def test_location_id_is_the_place_in_work_however_work_is_spelled(tmp_path, monkeypatch):
    """A file inside the work folder gets one id whether the folder is given relative,
    absolute, with ``..`` or through a symlink, and keeps it when the folder is moved;
    a file elsewhere gets its absolute path; S3 URIs are placed in an S3 work folder
    and kept as given otherwise."""
    work = tmp_path / "runs" / "b"
    (work / "data").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    spellings = [("runs/b", "runs/b/data/x"), (str(work), str(work / "data" / "x")),
                 ("runs/../runs/b/", "runs/b/data/x"), ("link/b", str(tmp_path / "link" / "b" / "data" / "x"))]
    assert {storage.location_id(uri, w) for w, uri in spellings} == {"<work>/data/x"}
    (tmp_path / "runs").rename(tmp_path / "moved")
    assert storage.location_id("moved/b/data/x", "moved/b") == "<work>/data/x"
    assert storage.location_id("<work>/data/x", "anywhere") == "<work>/data/x"  # an id already
    assert storage.location_id("other/y", "moved/b") == str(tmp_path / "other" / "y")
    assert storage.location_id("moved/bb/x", "moved/b") == str(tmp_path / "moved" / "bb" / "x")  # not inside b
    assert storage.location_id("s3://k/w/data/x", "s3://k/w/") == "<work>/data/x"
    assert storage.location_id("s3://k/w2/x", "s3://k/w") == "s3://k/w2/x"
    assert storage.location_id("s3://k/w/x", "runs/b") == "s3://k/w/x"
    assert storage.location_id("", "runs/b") == "" and storage.location_id(None, "runs/b") is None


def test_at_location_places_an_id_in_the_work_folder_it_is_given():
    """:func:`storage.at_location` undoes :func:`storage.location_id` in whichever work
    folder the id is read: ids of places inside it land under it, others come back as given."""
    assert storage.at_location("<work>/data/x", "moved/b") == str(Path("moved/b/data/x"))
    assert storage.at_location("<work>/data/x", "s3://k/w/") == "s3://k/w/data/x"
    for other in ("/abs/y", "s3://k/w2/x", "", None):
        assert storage.at_location(other, "moved/b") == other
    for work, uri in (("/r/b", "/r/b/pretrain/k/backbone.pt"), ("s3://k/w", "s3://k/w/data/x")):
        assert storage.at_location(storage.location_id(uri, work), work) == uri
