"""The training engine: schedule, data plan, resume, divergence stop, bad input,
real short trainings with every loss, CLI and S3 data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from paploss import LossSpec
from paploss.data import CocoFormatError, make_dataset, search_split
from paploss.engine import (PROXY_PRESETS, TrainConfig, batch_plan, evaluate_checkpoint, load_checkpoint, lr_at,
                            pretrain, train)
from tests._servers import s3_server  # noqa: F401  (fixture)

IDENTITY = [0.2, 0.2, 0.25, 0.25, 1 / 3, 1 / 3, 0.5, 0.5] * 5 + [0.5]
TINY = dict(train_ann="search_train", val_ann="search_val", detector="retinanet_mobilenet_v3_small", image_size=64,
            fpn_channels=16, anchor_size=8.0, batch_size=4, warmup_iters=2, num_threads=1, eval_batch_size=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = make_dataset("shapes", tmp_path_factory.mktemp("eng") / "shapes", n_train=30, n_val=8, image_size=64,
                        progress=False)
    search_split(root)
    return root


def test_lr_schedule_warmup_and_steps():
    cfg = TrainConfig(data="x", iterations=100, lr=0.1, warmup_iters=10, warmup_factor=0.001, lr_steps=(0.5, 0.8))
    assert lr_at(cfg, 0, 100) == pytest.approx(0.1 * 0.001)
    assert lr_at(cfg, 5, 100) == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))
    assert lr_at(cfg, 10, 100) == pytest.approx(0.1)
    assert lr_at(cfg, 49, 100) == pytest.approx(0.1)
    assert lr_at(cfg, 50, 100) == pytest.approx(0.01)
    assert lr_at(cfg, 80, 100) == pytest.approx(0.001)


def test_batch_plan_is_seeded_and_covers_each_epoch():
    n, b = 10, 4
    seen = [i for it in range(5) for i in batch_plan(3, it, b, n)[0]]  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_plan(3, 2, b, n) == batch_plan(3, 2, b, n)
    assert batch_plan(3, 2, b, n) != batch_plan(4, 2, b, n)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"unknown loss 'ap'; known: \['focal\+l1', 'focal\+giou', 'paploss'\]"):
        TrainConfig(data="x", loss="ap", iterations=1)
    with pytest.raises(ValueError, match="exactly one of iterations and epochs"):
        TrainConfig(data="x")
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adamw', got 'lion'"):
        TrainConfig(data="x", iterations=1, optimizer="lion")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        TrainConfig.preset("huge", data="x")
    spec = LossSpec.handcrafted("square")
    cfg = TrainConfig(data="x", loss="paploss", spec=spec.to_dict(), iterations=3)
    assert cfg.spec == spec and TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert set(PROXY_PRESETS) == {"smoke", "quick", "paper"}
    for name in PROXY_PRESETS:
        TrainConfig.preset(name, data="x")


def test_bad_dataset_fails_before_training(tiny, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "images" / "train_000003.png").unlink()
    steps = []
    with pytest.raises(CocoFormatError, match=r"search_train\.json: image id 4: missing image file .*train_000003\.png"):
        train(TrainConfig(data=str(broken), iterations=2, **TINY), on_step=lambda i, v: steps.append(i), progress=False)
    assert steps == []
    with pytest.raises(FileNotFoundError, match=r"no split 'nope'.*splits here: \['search_train', 'search_val', 'train', 'val'\]"):
        train(TrainConfig(data=str(tiny), iterations=2, **{**TINY, "train_ann": "nope"}), progress=False)


def test_resume_gives_the_same_final_weights(tiny, tmp_path):
    cfg = dict(TINY, iterations=6, checkpoint_every=2, max_val_images=4)
    full = train(TrainConfig(data=str(tiny), out_dir=str(tmp_path / "full"), **cfg), progress=False)

    def crash(it, loss):
        if it == 3:  # after the checkpoint of iteration 2 was written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data=str(tiny), out_dir=str(tmp_path / "cut"), **cfg), on_step=crash, progress=False)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["iteration"] == 2
    resumed = train(TrainConfig(data=str(tiny), out_dir=str(tmp_path / "cut"), **cfg), progress=False)
    a, b = (load_checkpoint(str(p / "checkpoint.pt"))[0].state_dict() for p in (tmp_path / "full", tmp_path / "cut"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.losses == full.losses and resumed.metrics == full.metrics
    # a finished run is not trained again; a different config in the same folder is refused
    again = train(TrainConfig(data=str(tiny), out_dir=str(tmp_path / "full"), **cfg), progress=False)
    assert again.losses == full.losses
    with pytest.raises(ValueError, match="different config"):
        train(TrainConfig(data=str(tiny), out_dir=str(tmp_path / "full"), **{**cfg, "lr": 0.5}), progress=False)
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["metrics"] == full.metrics and metrics["iterations"] == 6


def test_divergence_stops_early_with_reward_zero(tiny):
    cfg = TrainConfig(data=str(tiny), iterations=40, diverge_patience=3, lr=1e8, grad_clip=None, warmup_iters=0,
                      **{k: v for k, v in TINY.items() if k != "warmup_iters"})
    seen = []
    result = train(cfg, on_step=lambda i, v: seen.append(v), progress=False)
    assert result.diverged
    assert result.iterations < 40
    assert result.metrics == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    bad = [v for v in seen if not (v == v and abs(v) != float("inf")) or abs(v - 1.0) <= 1e-6]
    assert len(bad) == 4  # stopped on the first iteration past the patience


def _pts(*xy):
    return [0.0, 0.0, *xy, 1.0, 1.0]


# A separate PAP loss that worse boxes lower (BENCHMARKS.md, issue 8, finding 26): H2 high and
# H1 low in the middle (the ranking ratio R well above 1), I3 steep where I1 is flat, a large
# gradient scale. (1 - I1(u)) + R * I3(u) is smallest at u = 0.
BOX_COLLAPSING = LossSpec.searched([
    _pts(0.1, 0.6, 0.3, 0.8, 0.6, 0.9, 0.8, 0.95),  # H2
    _pts(0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8),  # I2
    _pts(0.1, 0.3, 0.3, 0.7, 0.5, 0.9, 0.7, 0.95),  # I3
    _pts(0.2, 0.0, 0.4, 0.01, 0.6, 0.02, 0.9, 0.05),  # I1
    _pts(0.2, 0.0, 0.4, 0.01, 0.6, 0.02, 0.9, 0.1),  # H1
], 10.0)


def test_box_collapse_stop_ends_a_run_whose_boxes_the_loss_makes_worse(tiny):
    """box_collapse=q: more than diverge_patience iterations whose positives' mean box
    quality u is below q stop the run, not as a divergence: the model is evaluated as it
    is and the checkpoint records the stop. Square, whose loss falls as u rises, runs its
    full schedule with the same setting; without the setting the collapsing loss does too."""
    base = dict(data=str(tiny), iterations=40, diverge_patience=3, loss="paploss", max_val_images=4,
                **{k: v for k, v in TINY.items()})
    stopped = train(TrainConfig(spec=BOX_COLLAPSING, box_collapse=0.5, **base), progress=False)
    assert stopped.box_collapsed and not stopped.diverged
    assert stopped.iterations < 40
    assert set(stopped.metrics) >= {"AP", "AP50"}
    square = train(TrainConfig(spec=LossSpec.handcrafted("square"), box_collapse=0.5, **base), progress=False)
    assert not square.box_collapsed and square.iterations == 40
    assert train(TrainConfig(spec=BOX_COLLAPSING, **base), progress=False).iterations == 40
    # detach_i3: the same loss without the gradient that trains the boxes worse runs its schedule
    assert not train(TrainConfig(spec=BOX_COLLAPSING, box_collapse=0.5, detach_i3=True, **base),
                     progress=False).box_collapsed


def test_box_quality_is_recorded_per_iteration_and_survives_a_resume(tiny, tmp_path):
    """With the PAP loss a run records the positives' mean box quality u of every
    iteration, as pap_loss saw it (checked against a recording wrapper), and a run resumed
    from its checkpoint has the same record as an uninterrupted one; other losses record none."""
    import paploss.loss as L

    cfg = dict(TINY, iterations=6, checkpoint_every=2, max_val_images=4, loss="paploss",
               spec=LossSpec.handcrafted("square"), box_collapse=0.1)
    seen, real = [], L.pap_loss

    def recording(logits, targets, qualities, spec, top_k=None, **kw):
        seen.append(float(qualities.detach()[targets == 1].mean()))
        return real(logits, targets, qualities, spec, top_k=top_k, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(L, "pap_loss", recording)
        full = train(TrainConfig(data=str(tiny), out_dir=str(tmp_path / "full"), **cfg), progress=False)
    assert full.box_quality == pytest.approx(seen) and len(seen) == 6
    assert all(0.0 < q < 1.0 for q in full.box_quality)

    def crash(it, loss):
        if it == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data=str(tiny), out_dir=str(tmp_path / "cut"), **cfg), on_step=crash, progress=False)
    resumed = train(TrainConfig(data=str(tiny), out_dir=str(tmp_path / "cut"), **cfg), progress=False)
    assert resumed.box_quality == full.box_quality and not resumed.box_collapsed
    # a checkpoint written before box_collapse and detach_i3 existed resumes under their defaults
    ckpt = tmp_path / "full" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    for name in ("box_collapse", "detach_i3"):
        del state["config"][name]
    torch.save(state, ckpt)
    old = {k: v for k, v in cfg.items() if k != "box_collapse"}
    assert train(TrainConfig(data=str(tiny), out_dir=str(tmp_path / "full"), **old), progress=False).losses == full.losses
    with pytest.raises(ValueError, match="different config"):
        train(TrainConfig(data=str(tiny), out_dir=str(tmp_path / "full"), detach_i3=True, **old), progress=False)
    assert train(TrainConfig(data=str(tiny), iterations=2, max_val_images=4, **TINY), progress=False).box_quality == []


def test_box_collapse_and_detach_i3_need_the_pap_loss():
    for kwargs, message in [({"box_collapse": 1.5, "loss": "paploss", "spec": BOX_COLLAPSING}, "in (0, 1), got 1.5"),
                            ({"box_collapse": 0.5}, "box_collapse needs the PAP loss"),
                            ({"detach_i3": True}, "detach_i3 needs the PAP loss")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            TrainConfig(data="x", iterations=1, **kwargs)


def test_repeatable_on_cpu(tiny):
    cfg = TrainConfig(data=str(tiny), iterations=3, max_val_images=4, **TINY)
    assert train(cfg, progress=False).losses == train(cfg, progress=False).losses


def test_train_from_s3(tiny, s3_server, monkeypatch):
    from paploss import storage

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.make_bucket("train-data")
    uri = storage.upload_dir(tiny, f"{bucket}/shapes")
    out = f"{bucket}/runs/one"
    r = train(TrainConfig(data=uri, out_dir=out, iterations=2, max_val_images=4, **TINY), progress=False)
    assert r.checkpoint == f"{out}/checkpoint.pt"
    assert storage.read_json(f"{out}/metrics.json")["iterations"] == 2
    assert set(evaluate_checkpoint(r.checkpoint, ann="search_val", progress=False, max_images=4)) >= {"AP", "AP50"}


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> tuple[Path, str]:
    """A small shapes set and a backbone pre-trained on its object crops, built once per
    test session (per xdist worker) in its temp folder: tests/test_bench_eval_noise.py and
    tests/test_bench_reeval.py import this fixture, and a module-scoped fixture alone would
    pre-train it again for each module (20 s each). The tests that take it only read it."""
    import shutil

    folder = tmp_path_factory.getbasetemp() / "learnable"
    root, backbone = folder / "shapes", folder / "backbone.pt"
    if not (folder / "done").is_file():  # "done" is written last: a half-built folder is built again
        shutil.rmtree(folder, ignore_errors=True)
        make_dataset("shapes", root, n_train=50, n_val=10, image_size=64, progress=False)
        search_split(root)
        pretrain(str(root), str(backbone), ann="search_train", detector="retinanet_mobilenet_v3_small",
                 iterations=100, image_size=64, crop_size=48, batch_size=32, num_threads=1, progress=False)
        (folder / "done").write_text("")
    return root, str(backbone)


@pytest.mark.slow
@pytest.mark.parametrize("loss, spec", [
    ("focal+l1", None),
    ("focal+giou", None),
    ("paploss", LossSpec.from_theta(IDENTITY)),
    ("paploss", LossSpec.handcrafted("square")),
])
def test_short_training_beats_an_untrained_model(learnable, loss, spec):
    """100 iterations (10 epochs of the 40 search-train images) from the warm start:
    AP50 on the training images far above the untrained model's (which is 0).  (Evaluated on the
    images trained on: this checks that each loss trains the detector, in a budget
    of seconds; generalisation is what bench/proxy.py measures.)"""
    root, backbone = learnable
    cfg = dict(TINY, fpn_channels=32, iterations=100, warmup_iters=10, lr=0.02, init=backbone, eval_batch_size=16,
               val_ann="search_train")
    trained = train(TrainConfig(data=str(root), loss=loss, spec=spec, **cfg), progress=False)
    untrained = train(TrainConfig(data=str(root), loss=loss, spec=spec, **{**cfg, "iterations": 1, "lr": 1e-9}),
                      progress=False)
    assert not trained.diverged
    assert untrained.metrics["AP50"] < 0.005
    # measured (CPU, torch 2.14): AP50 0.040 focal+l1, 0.044 focal+giou, 0.044 identity θ, > 0.1 square
    assert trained.metrics["AP50"] > untrained.metrics["AP50"] + 0.02, (trained.metrics, untrained.metrics)
    assert sum(trained.losses[-10:]) < sum(trained.losses[:10])


@pytest.mark.slow
def test_cli_pretrain_train_evaluate(tiny, tmp_path):
    from paploss.cli import main

    runner = CliRunner()
    bb = tmp_path / "bb.pt"
    r = runner.invoke(main, ["pretrain", "--data", str(tiny), "--out", str(bb), "--ann", "search_train",
                             "--detector", "retinanet_mobilenet_v3_small", "--iterations", "3", "--batch-size", "8",
                             "--crop-size", "32", "--image-size", "64", "--threads", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["train", "--data", str(tiny), "--preset", "smoke", "--form", "square", "--init", str(bb),
                             "--out", str(tmp_path / "run"), "--iterations", "2", "--quiet", "--detach-i3"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["iterations"] == 2 and not result["diverged"]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["config"]["detach_i3"] is True
    r = runner.invoke(main, ["train", "--data", str(tiny), "--detach-i3", "--iterations", "1"])  # focal+l1
    assert r.exit_code != 0 and "detach_i3 needs the PAP loss" in r.output
    r = runner.invoke(main, ["evaluate", str(tmp_path / "run" / "checkpoint.pt"), "--ann", "search_val",
                             "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text()).keys() == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    r = runner.invoke(main, ["train", "--data", str(tiny), "--loss", "focal+dice", "--iterations", "1"])
    assert r.exit_code != 0 and "known: ['focal+l1', 'focal+giou', 'paploss']" in r.output
    assert "--init" in runner.invoke(main, ["train", "--help"]).output


def test_a_failed_training_is_seen_per_pap_head():
    """SPEC §3's stop (loss NaN or exactly 1.0): with two PAP-loss heads (Faster R-CNN)
    a collapse sums to 2.0, so each head's loss is checked; one head at 1.0 is not a
    collapse of the training, and a single head is checked as the whole loss."""
    from paploss.engine import _is_bad

    assert _is_bad(float("nan")) and _is_bad(1.0) and _is_bad(1.0 + 5e-7) and not _is_bad(0.7)
    assert _is_bad(2.0, (1.0, 1.0)) and not _is_bad(1.7, (1.0, 0.7)) and not _is_bad(2.0, (1.2, 0.8))
    assert not _is_bad(0.9, (0.9,)) and _is_bad(1.0, (1.0,))
