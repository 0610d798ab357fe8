"""``bench.eval_noise``: the bootstrap over search-val images, against a hand-built twin."""

from __future__ import annotations

import numpy as np
import pytest

from bench.eval_noise import bootstrap, resample
from paploss.evaluate import coco_ap
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
