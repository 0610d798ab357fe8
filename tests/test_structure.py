"""The long functions split into named helpers still compute what they computed.

``engine._train``, ``engine.pretrain``, ``data.coco.validate_coco`` and
``search.Controller.from_state_dict`` were each split into helpers that hold one idea.
Every reference value below (the REF_* literals) was recorded from the code *before*
that split (engine.py at d765a3c^, data/coco.py at 4275095^, search.py at 7bf819b^), run
on this repository's CPU with one thread; the split versions gave the same values bit for
bit there. Floats are compared to 1e-5 relative so that another CPU's float kernels do not
fail the test, while a changed step order, batch or random draw (which moves these values
by far more) does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from paploss.data import CocoFormatError, load_coco, make_dataset, search_split, validate_coco
from paploss.engine import TrainConfig, pretrain, train
from paploss.search import Controller
from paploss.spec import LossSpec

TINY = dict(train_ann="search_train", val_ann="search_val", detector="retinanet_mobilenet_v3_small", image_size=64,
            fpn_channels=16, anchor_size=8.0, batch_size=4, warmup_iters=2, num_threads=1, eval_batch_size=8,
            max_val_images=4)
REL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = make_dataset("shapes", tmp_path_factory.mktemp("structure") / "shapes", n_train=30, n_val=8, image_size=64,
                        progress=False)
    search_split(root)
    return root


# ----------------------------------------------------------------------------- engine.train
# recorded from engine.py at d765a3c^ (before _train was split)
REF_FOCAL_LOSSES = [1.9976893663406372, 1.8950694799423218, 1.8299789428710938]
REF_FOCAL_METRICS = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": -1.0, "APl": -1.0}
REF_PAP_LOSSES = [0.9995326399803162, 0.9988834857940674]
REF_PAP_QUALITY = [0.7338272333145142, 0.7381179332733154]
REF_RESUMED_LOSSES = [1.6701123714447021, 1.6418852806091309, 1.6066910028457642, 1.6457080841064453,
                      1.6682398319244385]
REF_RESUMED_WEIGHT_SUM = 11905.605918388243  # sum of every float tensor of the final checkpoint's model


def test_train_losses_and_metrics_are_those_of_the_unsplit_loop(tiny):
    r = train(TrainConfig(data=str(tiny), loss="focal+l1", iterations=3, **TINY), progress=False)
    assert r.losses == pytest.approx(REF_FOCAL_LOSSES, rel=REL, abs=0)
    assert r.metrics == REF_FOCAL_METRICS and r.iterations == 3 and not r.diverged


def test_box_collapse_stop_is_that_of_the_unsplit_loop(tiny):
    cfg = TrainConfig(data=str(tiny), loss="paploss", spec=LossSpec.handcrafted("square"), iterations=3,
                      box_collapse=0.9, diverge_patience=1, **TINY)
    r = train(cfg, progress=False)
    assert r.box_collapsed and r.iterations == 2  # u < 0.9 twice: past the patience of 1
    assert r.losses == pytest.approx(REF_PAP_LOSSES, rel=REL, abs=0)
    assert r.box_quality == pytest.approx(REF_PAP_QUALITY, rel=REL, abs=0)


def test_a_resumed_run_is_that_of_the_unsplit_loop(tiny, tmp_path):
    cfg = dict(TINY, loss="focal+giou", iterations=5, checkpoint_every=2, out_dir=str(tmp_path / "cut"),
               optimizer="adamw", lr=1e-3)

    class Stop(Exception):
        pass

    def crash(it, loss):
        if it == 3:  # after the checkpoint of iteration 2
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(data=str(tiny), **cfg), on_step=crash, progress=False)
    r = train(TrainConfig(data=str(tiny), **cfg), progress=False)
    assert r.losses == pytest.approx(REF_RESUMED_LOSSES, rel=REL, abs=0)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 5 and state["done"]
    total = float(sum(v.double().sum() for v in state["model"].values() if v.is_floating_point()))
    assert total == pytest.approx(REF_RESUMED_WEIGHT_SUM, rel=REL, abs=0)
    metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert metrics["iterations"] == 5 and metrics["final_loss"] == r.losses[-1]


# ----------------------------------------------------------------------------- engine.pretrain
# recorded from engine.py at d765a3c^ (before pretrain was split): training accuracy, and
# sums over the body's batch-norm running means, running variances (both set by the crops
# themselves) and |weights|
REF_PRETRAIN = (0.15, -0.18182218590901061, 5878.56449753046, 79526.56628830715)


def test_pretrain_crops_and_steps_are_those_of_the_unsplit_loop(tiny, tmp_path):
    out = pretrain(str(tiny), str(tmp_path / "bb.pt"), ann="search_train", iterations=5, image_size=64, crop_size=32,
                   batch_size=8, num_threads=1, progress=False)
    blob = torch.load(out, weights_only=True)
    body = blob["state_dict"]
    got = (blob["train_accuracy"],
           float(sum(v.double().sum() for k, v in body.items() if k.endswith("running_mean"))),
           float(sum(v.double().sum() for k, v in body.items() if k.endswith("running_var"))),
           float(sum(v.double().abs().sum() for k, v in body.items() if k.endswith("weight"))))
    assert got[0] == REF_PRETRAIN[0]
    assert got[1:] == pytest.approx(REF_PRETRAIN[1:], rel=REL, abs=0)


# ----------------------------------------------------------------------------- validate_coco
def _coco() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10]}],
        "categories": [{"id": 3, "name": "thing"}],
    }


def _ann(**kw) -> dict:
    return {"id": 7, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], **kw}


# each bad input and its error, recorded from data/coco.py at 4275095^ (before validate_coco was split)
REF_COCO_ERRORS = [
    (lambda c: [1], "ann.json: not a COCO annotation file (top level is list, expected an object)"),
    (lambda c: {k: v for k, v in c.items() if k != "categories"},
     "ann.json: not a COCO annotation file: missing key(s) ['categories'] (has ['annotations', 'images'])"),
    (lambda c: {**c, "images": {}}, "ann.json: 'images' must be a list, got dict"),
    (lambda c: {**c, "categories": [{"id": "x"}]},
     "ann.json: category #0 must have an integer 'id' and a 'name', got {'id': 'x'}"),
    (lambda c: {**c, "categories": c["categories"] * 2}, "ann.json: duplicate category id 3"),
    (lambda c: {**c, "categories": []}, "ann.json: no categories"),
    (lambda c: {**c, "images": [3]}, "ann.json: image #0 is not an object: 3"),
    (lambda c: {**c, "images": [{"id": 1}]}, "ann.json: image id 1 has no 'file_name'"),
    (lambda c: {**c, "images": [{"id": "1", "file_name": "a", "width": 1, "height": 1}]},
     "ann.json: image #0 has a non-integer id '1'"),
    (lambda c: {**c, "images": c["images"] * 2}, "ann.json: duplicate image id 1"),
    (lambda c: {**c, "images": [{"id": 1, "file_name": "a", "width": 0, "height": 1}]},
     "ann.json: image id 1 has invalid size width=0 height=1"),
    (lambda c: {**c, "annotations": [5]}, "ann.json: annotation #0 is not an object: 5"),
    (lambda c: {**c, "annotations": [{"id": None}]}, "ann.json: annotation #0 has no integer 'id' (got None)"),
    (lambda c: {**c, "annotations": c["annotations"] * 2}, "ann.json: duplicate annotation id 7"),
    (lambda c: {**c, "annotations": [_ann(image_id=9)]}, "ann.json: annotation id 7: unknown image_id 9"),
    (lambda c: {**c, "annotations": [_ann(category_id=9)]},
     "ann.json: annotation id 7: unknown category_id 9 (known: [3])"),
    (lambda c: {**c, "annotations": [_ann(bbox=[1, 2, 3])]},
     "ann.json: annotation id 7: bbox must be 4 finite numbers [x, y, w, h], got [1, 2, 3]"),
    (lambda c: {**c, "annotations": [_ann(bbox=[45, 5, 10, 10])]},
     "ann.json: annotation id 7: bbox [45, 5, 10, 10] lies outside its image id 1 (50x40, file a.png)"),
]


@pytest.mark.parametrize("mutate, message", REF_COCO_ERRORS)
def test_validate_coco_errors_are_those_of_the_unsplit_function(mutate, message):
    with pytest.raises(CocoFormatError) as err:
        validate_coco(mutate(_coco()), "ann.json")
    assert str(err.value) == message


def test_missing_image_file_error_is_that_of_the_unsplit_function(tmp_path):
    with pytest.raises(CocoFormatError) as err:
        validate_coco(_coco(), "ann.json", images_dir=tmp_path / "noimages")
    assert str(err.value) == f"ann.json: image id 1: missing image file {tmp_path / 'noimages' / 'a.png'} (file_name 'a.png')"


# the cleaned dict and the warning, recorded from data/coco.py at 4275095^
REF_CLEAN = {
    "annotations": [
        {"area": 100.0, "bbox": [5.0, 5.0, 10.0, 10.0], "category_id": 3, "id": 7, "image_id": 1, "iscrowd": 0},
        {"area": 2.0, "bbox": [49.5, 5.0, 0.5, 3.0], "category_id": 3, "id": 30, "image_id": 1, "iscrowd": 0},
    ],
    "categories": [{"id": 3, "name": "thing", "supercategory": ""}],
    "images": [{"file_name": "a.png", "height": 40, "id": 1, "width": 50}],
    "info": {"dropped_degenerate": 13, "x": 1},
}
REF_WARNING = ("ann.json: dropped 13 degenerate box(es) with non-positive width or height "
               "(annotation ids [8, 9, 10, 11, 12, 13, 14, 15, 16, 17] ...)")


def test_cleaning_and_its_warning_are_those_of_the_unsplit_function(tmp_path):
    coco = _coco()
    coco["info"] = {"x": 1}
    coco["annotations"] += [_ann(id=8 + i, bbox=[5, 5, 0, 10]) for i in range(12)]  # degenerate: dropped
    coco["annotations"] += [_ann(id=30, bbox=[49.5, 5, 1.2, 3], area=2, iscrowd=None),  # clipped, area kept
                            _ann(id=31, bbox=[-0.5, -0.9, 0.4, 3])]  # empty once clipped: dropped
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    with pytest.warns(UserWarning) as caught:
        clean = load_coco(path)
    assert clean == REF_CLEAN
    assert [str(w.message) for w in caught] == [REF_WARNING.replace("ann.json", str(path))]
    assert caught[0].filename == __file__  # the warning points at load_coco's caller
    with pytest.warns(UserWarning, match="dropped 13"):
        assert validate_coco(copy.deepcopy(coco), "ann.json", tolerance=1.0) == REF_CLEAN


# ----------------------------------------------------------------------------- Controller.from_state_dict
def _state() -> dict:
    c = Controller(rounds=3, steps=5, seed=2)
    for _ in range(2):
        c.update(c.sample(4), [0.1, 0.3, 0.2, 0.5])
    return json.loads(json.dumps(c.state_dict()))


def _edit(change):
    """A corruption that edits the state in place and returns it."""
    return lambda s: (change(s), s)[1]


def _set(key, value):
    return _edit(lambda s: s.update({key: value}))


# each corrupt state and its error, recorded from search.py at 7bf819b^ (before from_state_dict was split)
REF_STATE_ERRORS = [
    (lambda s: [1], "controller state must be a JSON object, got list"),
    (_set("format", "x"), "controller state has format='x', expected 'paploss.search.Controller'"),
    (_set("version", 2), "controller state has version=2; this paploss reads version 1"),
    (_edit(lambda s: s.pop("mu")), "controller state lacks the field(s) ['mu']"),
    (_set("options", [1]), "controller state: options must be a JSON object, got list"),
    (_edit(lambda s: s["options"].update(zzz=1)), "controller state: unknown option(s) ['zzz']"),
    (_edit(lambda s: s["options"].pop("lr")), "controller state: option(s) ['lr'] missing"),
    (_set("functions", ["H2"]),
     "controller state is inconsistent: functions=['H2'] but options.functions=['H2', 'I2', 'I3', 'I1', 'H1']"),
    (_edit(lambda s: s["options"].update(rounds=-1)), "controller state: bad options: rounds must be >= 1, got -1"),
    (_edit(lambda s: s["mu"].__setitem__(0, 0.123)), "controller state is inconsistent: mu is not sigmoid(logits)"),
    (_set("logits", [0.0]), "controller state: logits must have D=41 numbers, got 1"),
    (_edit(lambda s: s["sigma"].__setitem__(0, -1.0)), 
     "controller state: sigma must be > 0, got [-1.0, " + ", ".join(["0.06666666666666667"] * 40) + "]"),
    (_set("round", 9), "controller state: round=9 is beyond rounds=3"),
    (_set("round", -1), "controller state: round must be >= 0, got -1"),
    (_edit(lambda s: s.update(history=s["history"][:1])), "controller state: round=2 but history has 1 rounds"),
    (_edit(lambda s: s["history"][0].pop("rewards")), "controller state: history[0] lacks the field(s) ['rewards']"),
    (_edit(lambda s: s["history"][-1].update(sigma_after=[9.0] * len(s["sigma"]))),
     "controller state is inconsistent: mu/sigma differ from the last round's mu_after/sigma_after"),
]


@pytest.mark.parametrize("corrupt, message", REF_STATE_ERRORS)
def test_state_errors_are_those_of_the_unsplit_reader(corrupt, message):
    with pytest.raises(ValueError) as err:
        Controller.from_state_dict(corrupt(_state()))
    assert str(err.value) == message


@pytest.mark.parametrize("expect, message", [
    ({"functions": ("H2",)}, "controller state is for functions=['H2', 'I2', 'I3', 'I1', 'H1'], not ['H2']"),
    ({"shared": True}, "controller state has shared=False, not True"),
    ({"grad_scale": False}, "controller state has grad_scale=True, not False"),
])
def test_state_for_another_search_is_refused_as_before(expect, message):
    with pytest.raises(ValueError) as err:
        Controller.from_state_dict(_state(), **expect)
    assert str(err.value) == message


def test_a_good_state_round_trips():
    state = _state()
    c = Controller.from_state_dict(state, functions=("H2", "I2", "I3", "I1", "H1"), shared=False, grad_scale=True)
    assert c.state_dict() == state and repr(c) == "Controller(functions=H2,I2,I3,I1,H1, grad_scale=True, D=41, round=2/3)"
