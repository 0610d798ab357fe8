"""Datasets: bundled generators, COCO validation errors, VOC conversion, the search split."""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from paploss.data import CocoFormatError, load_coco, make_dataset, search_split, split_image_ids, voc_to_coco
from paploss.data.cli import data as data_cli
from tests._servers import s3_server  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset("shapes", tmp_path_factory.mktemp("ds") / "shapes", n_train=24, n_val=8, image_size=64,
                        progress=False)


def _pixels(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / "images" / name))


# ----------------------------------------------------------------------------- bundled
@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_bundled_is_valid_coco_and_deterministic(name, tmp_path):
    a = make_dataset(name, tmp_path / "a", n_train=6, n_val=3, image_size=64, seed=3, progress=False)
    b = make_dataset(name, tmp_path / "b", n_train=9, n_val=3, image_size=64, seed=3, progress=False)
    c = make_dataset(name, tmp_path / "c", n_train=6, n_val=3, image_size=64, seed=4, progress=False)
    for split in ("train", "val"):
        coco = load_coco(a / "annotations" / f"{split}.json", images_dir=a / "images")
        assert coco["info"]["dropped_degenerate"] == 0
        assert len(coco["annotations"]) >= len(coco["images"])  # at least one object per image
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
    # the same seed gives the same pixels and boxes; the image count does not change image 0
    assert np.array_equal(_pixels(a, "train_000000.png"), _pixels(b, "train_000000.png"))
    ja, jb = (json.loads((r / "annotations" / "train.json").read_text()) for r in (a, b))
    assert [x["bbox"] for x in ja["annotations"] if x["image_id"] == 1] == \
        [x["bbox"] for x in jb["annotations"] if x["image_id"] == 1]
    assert not np.array_equal(_pixels(a, "train_000000.png"), _pixels(c, "train_000000.png"))
    n_cat = {"shapes": 5, "digits": 10}[name]
    assert len(ja["categories"]) == n_cat


def test_bundled_boxes_are_tight(tmp_path):
    """The box of a drawn shape touches the drawn pixels on all four sides: the
    object differs from the background in the box's border rows and columns."""
    root = make_dataset("shapes", tmp_path / "s", n_train=12, n_val=1, image_size=96, progress=False)
    coco = json.loads((root / "annotations" / "train.json").read_text())
    by_image = defaultdict(list)
    for a in coco["annotations"]:
        by_image[a["image_id"]].append(a)
    checked = 0
    for img in coco["images"]:
        anns = by_image[img["id"]]
        if len(anns) != 1:  # overlaps make single-object checks ambiguous
            continue
        x, y, w, h = (int(v) for v in anns[0]["bbox"])
        px = _pixels(root, img["file_name"]).astype(float)
        inside = px[y:y + h, x:x + w]
        ring = np.concatenate([px[max(y - 3, 0):y, x:x + w].reshape(-1, 3), px[y + h:y + h + 3, x:x + w].reshape(-1, 3)])
        if len(ring):
            assert np.abs(inside.mean((0, 1)) - ring.mean(0)).sum() > 0 or inside.std() > 0
        checked += 1
    assert checked > 0


def test_make_dataset_refuses_other_content(tmp_path, shapes):
    assert make_dataset("shapes", shapes, n_train=24, n_val=8, image_size=64, progress=False) == shapes  # idempotent
    with pytest.raises(FileExistsError, match="different dataset"):
        make_dataset("shapes", shapes, n_train=25, n_val=8, image_size=64, progress=False)
    with pytest.raises(ValueError, match="unknown dataset name 'cats'"):
        make_dataset("cats", tmp_path / "x")
    with pytest.raises(ValueError, match="n_train must be >= 1, got 0"):
        make_dataset("shapes", tmp_path / "y", n_train=0)



def _failing_render(monkeypatch, after: int, action):
    """Make the shapes generator run ``action`` at its ``after``-th image."""
    from paploss.data import bundled

    categories, render = bundled._generator("shapes")
    calls = []

    def patched(rng, size, split):
        calls.append(1)
        if len(calls) == after:
            action()
        return render(rng, size, split)

    monkeypatch.setattr(bundled, "_generator", lambda name: (categories, patched))


def test_make_dataset_crash_leaves_nothing(tmp_path, monkeypatch):
    """A crash mid-way leaves neither ``out`` nor the hidden folder it was built in;
    the next call starts afresh and succeeds."""
    def crash():
        raise RuntimeError("killed mid-way")

    _failing_render(monkeypatch, 5, crash)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        make_dataset("shapes", tmp_path / "out", n_train=6, n_val=2, image_size=64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    out = make_dataset("shapes", tmp_path / "out", n_train=6, n_val=2, image_size=64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "annotations" / "val.json").exists()


def test_make_dataset_into_an_empty_folder_and_one_filled_meanwhile(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_dataset("shapes", empty, n_train=2, n_val=1, image_size=64, progress=False) == empty
    assert (empty / "annotations" / "val.json").exists()

    out = tmp_path / "out"

    def someone_else_writes():
        out.mkdir()
        (out / "theirs.txt").write_text("not ours")

    _failing_render(monkeypatch, 2, someone_else_writes)
    with pytest.raises(FileExistsError, match="appeared meanwhile and is not empty"):
        make_dataset("shapes", out, n_train=2, n_val=1, image_size=64, progress=False)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no hidden folder left

# ----------------------------------------------------------------------------- bad input
def _write(tmp_path: Path, coco, name="ann.json") -> Path:
    p = tmp_path / name
    p.write_text(coco if isinstance(coco, str) else json.dumps(coco))
    return p


def _coco() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10]}],
        "categories": [{"id": 3, "name": "thing"}],
    }


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda c: c["annotations"][0].update(category_id=99), r"ann\.json: annotation id 7: unknown category_id 99"),
        (lambda c: c["annotations"][0].update(image_id=5), r"ann\.json: annotation id 7: unknown image_id 5"),
        (lambda c: c["annotations"][0].update(bbox=[45, 5, 10, 10]), r"ann\.json: annotation id 7: bbox .* outside"),
        (lambda c: c["annotations"][0].update(bbox=[-5, 5, 10, 10]), r"ann\.json: annotation id 7: bbox .* outside"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), r"ann\.json: annotation id 7: bbox must be 4"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, float("nan"), 3]), r"annotation id 7: bbox must be 4 finite"),
        (lambda c: c.pop("categories"), r"ann\.json: not a COCO annotation file: missing key\(s\) \['categories'\]"),
        (lambda c: c["images"][0].pop("width"), r"ann\.json: image id 1 has no 'width'"),
        (lambda c: c["annotations"].append(dict(c["annotations"][0])), r"duplicate annotation id 7"),
    ],
)
def test_bad_annotations_name_file_and_id(tmp_path, mutate, pattern):
    coco = _coco()
    mutate(coco)
    with pytest.raises(CocoFormatError, match=pattern):
        load_coco(_write(tmp_path, coco))


def test_truncated_and_non_coco_files(tmp_path):
    text = json.dumps(_coco())
    with pytest.raises(CocoFormatError, match=r"ann\.json: not valid JSON \(the file looks truncated\)"):
        load_coco(_write(tmp_path, text[: len(text) // 2]))
    with pytest.raises(CocoFormatError, match=r"list\.json: not a COCO annotation file \(top level is list"):
        load_coco(_write(tmp_path, [1, 2], "list.json"))
    with pytest.raises(CocoFormatError, match=r"empty\.json: empty file"):
        load_coco(_write(tmp_path, "", "empty.json"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(tmp_path / "nope.json")


def test_missing_image_names_file_and_image(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(CocoFormatError, match=r"ann\.json: image id 1: missing image file .*a\.png"):
        load_coco(_write(tmp_path, _coco()), images_dir=tmp_path / "images")
    Image.new("RGB", (50, 40)).save(tmp_path / "images" / "a.png")
    assert load_coco(_write(tmp_path, _coco()), images_dir=tmp_path / "images")["annotations"][0]["id"] == 7


def test_degenerate_boxes_dropped_with_warning_and_count(tmp_path):
    coco = _coco()
    coco["annotations"] += [
        {"id": 8, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10]},
        {"id": 9, "image_id": 1, "category_id": 3, "bbox": [5, 5, 4, -1]},
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [49.5, 5, 1.2, 3]},  # overshoot < 1 px: clipped
    ]
    with pytest.warns(UserWarning, match=r"ann\.json: dropped 2 degenerate box\(es\).*\[8, 9\]"):
        out = load_coco(_write(tmp_path, coco))
    assert [a["id"] for a in out["annotations"]] == [7, 10]
    assert out["info"]["dropped_degenerate"] == 2
    assert out["annotations"][1]["bbox"] == pytest.approx([49.5, 5, 0.5, 3])


# ----------------------------------------------------------------------------- VOC
def _voc_xml(name: str, objects: list) -> str:
    objs = "".join(
        f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for c, d, b in objects)
    return f"<annotation><filename>{name}.jpg</filename><size><width>100</width><height>80</height>" \
           f"<depth>3</depth></size>{objs}</annotation>"


def test_voc_to_coco(tmp_path):
    root = tmp_path / "VOC"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("0001\n0002\n")
    (root / "Annotations" / "0001.xml").write_text(_voc_xml("0001", [("dog", 0, (1, 1, 10, 20)), ("cat", 1, (50, 40, 100, 80))]))
    (root / "Annotations" / "0002.xml").write_text(_voc_xml("0002", [("person", 0, (11, 21, 30, 41))]))
    coco = voc_to_coco(root, "trainval", tmp_path / "out.json")
    checked = load_coco(tmp_path / "out.json")
    assert [a["bbox"] for a in checked["annotations"]] == [[0, 0, 10, 20], [49, 39, 51, 41], [10, 20, 20, 21]]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert [names[a["category_id"]] for a in coco["annotations"]] == ["dog", "cat", "person"]
    assert [a["iscrowd"] for a in coco["annotations"]] == [0, 1, 0]
    assert len(voc_to_coco(root, "trainval", tmp_path / "o2.json", keep_difficult=False)["annotations"]) == 2
    (root / "Annotations" / "0002.xml").write_text(_voc_xml("0002", [("unicorn", 0, (1, 1, 5, 5))]))
    with pytest.raises(ValueError, match=r"0002\.xml: object #0 has unknown class 'unicorn'"):
        voc_to_coco(root, "trainval", tmp_path / "o3.json")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        voc_to_coco(root, "test", tmp_path / "o4.json")


# ----------------------------------------------------------------------------- split
def _label_sets(draw_sets: list[list[int]], n_classes: int) -> dict:
    images = [{"id": i + 1, "file_name": f"{i}.png", "width": 10, "height": 10} for i in range(len(draw_sets))]
    anns = [{"id": k + 1, "image_id": i + 1, "category_id": c, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
            for k, (i, c) in enumerate((i, c) for i, s in enumerate(draw_sets) for c in s)]
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(1, n_classes + 1)]}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_classes=st.integers(1, 6),
    sets=st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=4), min_size=2, max_size=40),
    frac=st.floats(0.05, 0.95),
    seed=st.integers(0, 1000),
)
def test_split_properties(n_classes, sets, frac, seed):
    sets = [sorted({c for c in s if c <= n_classes}) for s in sets]
    counts = defaultdict(int)
    for s in sets:
        for c in s:
            counts[c] += 1
    coco = _label_sets(sets, n_classes)
    if any(n < 2 for n in counts.values()):
        with pytest.raises(ValueError, match="fewer than 2 images"):
            split_image_ids(coco, frac, seed)
        return
    try:
        a, b = split_image_ids(coco, frac, seed)
    except ValueError as exc:  # only when no arrangement can cover every class on both sides
        assert "cannot place class" in str(exc)
        return
    assert set(a).isdisjoint(b) and sorted(a + b) == [im["id"] for im in coco["images"]] and a and b
    for c in counts:
        assert any(c in sets[i - 1] for i in a) and any(c in sets[i - 1] for i in b)
    assert split_image_ids(coco, frac, seed) == (a, b)


def test_search_split_files_are_stratified_and_seeded(shapes):
    a, b = search_split(shapes, seed=1)
    tr, va = load_coco(a), load_coco(b)
    ids_tr, ids_va = {i["id"] for i in tr["images"]}, {i["id"] for i in va["images"]}
    assert ids_tr.isdisjoint(ids_va) and len(ids_tr) + len(ids_va) == 24
    assert abs(len(ids_va) - 0.2 * 24) <= 2
    for part in (tr, va):
        assert {x["category_id"] for x in part["annotations"]} == {c["id"] for c in part["categories"]}
    again = search_split(shapes, seed=1)
    assert load_coco(again[1])["images"] == va["images"]
    other = load_coco(search_split(shapes, seed=2)[1])
    assert other["images"] != va["images"]
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        search_split(shapes, val_fraction=1.5)


def test_search_split_on_s3(shapes, s3_server, monkeypatch):
    from paploss import storage

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.make_bucket("split-data")
    uri = storage.upload_dir(shapes, f"{bucket}/shapes")
    a, b = search_split(uri, seed=0)
    assert a == f"{bucket}/shapes/annotations/search_train.json"
    assert load_coco(b)["images"] == load_coco(search_split(shapes, seed=0)[1])["images"]


# ----------------------------------------------------------------------------- CLI
def test_data_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "d"
    r = runner.invoke(data_cli, ["make", "digits", "--out", str(out), "--n-train", "40", "--n-val", "4",
                                 "--image-size", "64"])
    assert r.exit_code == 0, r.output
    assert (out / "annotations" / "search_val.json").exists()
    r = runner.invoke(data_cli, ["split", "--data", str(out), "--val-fraction", "0.3", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert "search_val.json: 12 images" in r.output
    r = runner.invoke(data_cli, ["check", str(out / "annotations" / "val.json"), "--images", str(out / "images")])
    assert r.exit_code == 0 and "OK, 4 images" in r.output
    r = runner.invoke(data_cli, ["make", "cats", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "cats" in r.output
    assert "--n-train" in runner.invoke(data_cli, ["make", "--help"]).output
