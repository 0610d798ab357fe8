"""``bench.eval_noise``: the bootstrap over search-val images, against a hand-built twin."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.eval_noise import bootstrap, resample
from paploss.evaluate import coco_ap
from tests.test_engine import learnable  # noqa: F401  (fixture: a small shapes set and its warm start)
from tests.test_evaluate import _random_case


def _by_hand(gt, dets, draw):
    """The twin of ``resample``: copy c of image i gets id 1000 * (c + 1) + i's id."""
    images, anns, out, copies = [], [], [], {}
    for i in draw:
        im = gt["images"][i]
        c = copies[i] = copies.get(i, 0) + 1
        new = 1000 * c + im["id"]
        images.append(dict(im, id=new))
        anns += [dict(a, id=10_000 * c + a["id"], image_id=new) for a in gt["annotations"] if a["image_id"] == im["id"]]
        out += [dict(d, image_id=new) for d in dets if d["image_id"] == im["id"]]
    return dict(gt, images=images, annotations=anns), out


@pytest.mark.parametrize("seed", range(6))
def test_resample_scores_like_the_images_copied_by_hand(seed):
    rng = np.random.default_rng(seed)
    gt, dets = _random_case(rng, 5, 2, 14, 40)
    for a in gt["annotations"]:
        a["area"] = a["bbox"][2] * a["bbox"][3]
    draw = rng.integers(0, 5, size=5)
    draw[1] = draw[0]  # at least one image twice
    g, out = resample(gt, {"m": dets}, draw)
    assert [im["id"] for im in g["images"]] == [1, 2, 3, 4, 5]
    assert len({a["id"] for a in g["annotations"]}) == len(g["annotations"])
    hand_gt, hand_dets = _by_hand(gt, dets, draw)
    assert len(g["annotations"]) == len(hand_gt["annotations"]) and len(out["m"]) == len(hand_dets)
    assert coco_ap(g, out["m"]) == pytest.approx(coco_ap(hand_gt, hand_dets), abs=1e-12)


def test_resample_of_every_image_once_is_the_plain_score():
    gt, dets = _random_case(np.random.default_rng(7), 4, 3, 12, 30)
    g, out = resample(gt, {"m": dets}, range(4))
    assert coco_ap(g, out["m"]) == pytest.approx(coco_ap(gt, dets), abs=1e-12)


def test_bootstrap_scores_every_model_on_the_same_draws():
    gt, dets = _random_case(np.random.default_rng(3), 6, 2, 16, 40)
    worse = [dict(d, score=d["score"] * (0.5 if i % 2 else 1.0)) for i, d in enumerate(dets)]
    boot = bootstrap(gt, {"a": dets, "a again": list(dets), "b": worse}, n=12, seed=1)
    assert boot["a"] == boot["a again"] and len(boot["a"]) == 12
    assert boot["a"] != boot["b"]
    assert len(set(boot["a"])) > 1  # the draws differ
    assert boot == bootstrap(gt, {"a": dets, "a again": list(dets), "b": worse}, n=12, seed=1)  # seeded


@pytest.mark.slow
def test_eval_noise_and_proxy_end_to_end(learnable, tmp_path):
    """Both scripts on real (tiny) trainings: bench.eval_noise rescored AP equals the
    training's own evaluation, and bench.proxy's report holds every trial."""
    from bench import eval_noise, proxy

    root, backbone = learnable
    common = ["--data", str(root), "--backbone", backbone, "--preset", "smoke", "--iterations", "30",
              "--seeds", "0", "1", "--losses", "square", "linear"]
    report = eval_noise.main(common + ["--boot", "4", "--out", str(tmp_path / "noise.json")])
    assert json.loads((tmp_path / "noise.json").read_text())["summary"] == report["summary"]
    assert all(t["metrics"]["AP"] > 0 for t in report["trials"])  # 30 iterations detect something
    for t in report["trials"]:
        assert t["rescored"]["AP"] == pytest.approx(t["metrics"]["AP"], abs=1e-9)
    gaps = report["summary"]["square - linear"]
    assert len(gaps["gaps"]) == 2 and gaps["image_se_rms"] > 0 and all(g != 0 for g in gaps["gaps"])
    for s in report["seeds"].values():
        assert s["gaps"]["square - linear"]["gap"] == pytest.approx(s["AP"]["square"] - s["AP"]["linear"], abs=1e-12)

    rep = proxy.main(common + ["--out", str(tmp_path / "proxy.json")])
    assert [(t["loss"], t["seed"]) for t in rep["trials"]] == [("square", 0), ("linear", 0), ("square", 1), ("linear", 1)]
    # the same trainings (checkpointed or not): the same AP
    assert [t["metrics"]["AP"] for t in rep["trials"]] == [t["metrics"]["AP"] for t in report["trials"]]
    with pytest.raises(SystemExit):
        eval_noise.main(common[:-2] + ["--losses", "square", "nonsense"])
