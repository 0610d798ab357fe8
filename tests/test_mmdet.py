"""MMDetection 3.3 integration: PAPLossRetinaHead, spec resolution, mmcv.ops from torchvision.

These run the real MMDetection (``pip install -e '.[mmdet]'``); without it they are
skipped with the reason. Sizes are tiny so the module stays around a minute on 2 CPUs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mmdet", reason="MMDetection is an optional extra: pip install -e '.[mmdet]'")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import paploss.integrations.mmdet as pm  # noqa: E402  (installs the mmcv.ops replacement first)
from paploss import LossSpec, pap_loss  # noqa: E402
from paploss.integrations import mmcv_ops  # noqa: E402

from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402
from mmdet.registry import DATASETS, MODELS  # noqa: E402

pytestmark = pytest.mark.mmdet

ROOT = Path(__file__).resolve().parents[1]
SHAPES_CFG = ROOT / "configs" / "mmdet" / "paploss_retinanet_tiny_shapes.py"
R50_CFG = ROOT / "configs" / "mmdet" / "paploss_retinanet_r50_fpn_1x_coco.py"
IDENTITY = [0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0]

init_default_scope("mmdet")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    from paploss.data import make_dataset

    return make_dataset("shapes", tmp_path_factory.mktemp("shapes"), n_train=8, n_val=4, image_size=128, seed=0, progress=False)


def shapes_cfg(root: Path | None = None) -> Config:
    cfg = Config.fromfile(str(SHAPES_CFG))
    if root is not None:
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
            cfg[loader].dataset.data_root = str(root) + "/"
    return cfg


def head_cfg(**overrides) -> dict:
    cfg = shapes_cfg().model.bbox_head.to_dict()
    cfg.update(train_cfg=shapes_cfg().model.train_cfg.to_dict(), test_cfg=shapes_cfg().model.test_cfg.to_dict())
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------ mmcv.ops replacement
def greedy_nms(boxes: np.ndarray, scores: np.ndarray, thr: float, offset: int = 0) -> list[int]:
    """Textbook greedy NMS, one pair at a time (the slow twin of mmcv_ops.nms)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            iw = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]) + offset
            ih = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]) + offset
            inter = max(iw, 0.0) * max(ih, 0.0)
            area = lambda b: (b[2] - b[0] + offset) * (b[3] - b[1] + offset)  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def random_boxes(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 50, (n, 2))
    wh = rng.uniform(2, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float64)
    scores = rng.permutation(n).astype(np.float64) / n  # distinct scores: a unique greedy order
    return boxes, scores


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 30), thr=st.floats(0.1, 0.9), offset=st.sampled_from([0, 1]))
def test_nms_equals_greedy_nms(seed, n, thr, offset):
    boxes, scores = random_boxes(seed, n)
    dets, inds = mmcv_ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr, offset=offset)
    assert inds.tolist() == greedy_nms(boxes, scores, thr, offset)
    assert torch.equal(dets[:, :4], torch.from_numpy(boxes)[inds]) and torch.equal(dets[:, 4], torch.from_numpy(scores)[inds])
    dets_np, inds_np = mmcv_ops.nms(boxes, scores, thr, offset=offset)  # numpy in, numpy out
    assert isinstance(inds_np, np.ndarray) and inds_np.tolist() == inds.tolist()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), split=st.sampled_from([10000, 1]))
def test_batched_nms_is_nms_per_class(seed, n, split):
    boxes, scores = random_boxes(seed, n)
    classes = np.random.default_rng(seed + 1).integers(0, 3, n)
    dets, keep = mmcv_ops.batched_nms(
        torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), torch.from_numpy(classes),
        dict(type="nms", iou_threshold=0.5, split_thr=split),
    )
    expected = [i for c in range(3) for i in greedy_nms(boxes[classes == c], scores[classes == c], 0.5)
                for i in [np.flatnonzero(classes == c)[i]]]
    expected = sorted(expected, key=lambda i: -scores[i])
    assert keep.tolist() == expected
    assert torch.allclose(dets[:, 4], torch.from_numpy(scores[expected]).float())


def test_mmdet_uses_the_replacement_ops():
    import mmcv.ops
    from mmdet.models.layers import bbox_nms

    assert mmcv_ops.installed()
    assert bbox_nms.batched_nms is mmcv_ops.batched_nms
    assert mmcv.ops.RoIAlign is mmcv_ops.RoIAlign


def test_unavailable_op_names_itself():
    from mmcv.ops import DeformConv2d

    with pytest.raises(mmcv_ops.MmcvOpUnavailable, match="DeformConv2d"):
        DeformConv2d(4, 4, 3)
    with pytest.raises(mmcv_ops.MmcvOpUnavailable, match="softnms"):
        mmcv_ops.batched_nms(torch.zeros(1, 4), torch.zeros(1), torch.zeros(1), dict(type="softnms"))


def test_sigmoid_focal_loss_equals_mmdet_python_version():
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (20,), generator=g)  # 4 = background
    weight = torch.rand(20, generator=g)
    ours = mmcv_ops.sigmoid_focal_loss(logits, labels, 2.0, 0.25, None, "none") * weight[:, None]
    theirs = py_sigmoid_focal_loss(logits, torch.nn.functional.one_hot(labels, 5)[:, :4], weight[:, None], 2.0, 0.25, "none")
    assert torch.allclose(ours, theirs, atol=1e-6)
    (ga,) = torch.autograd.grad(ours.sum(), logits)
    (gb,) = torch.autograd.grad(theirs.sum(), logits)
    assert torch.allclose(ga, gb, atol=1e-6)


def test_roi_align_of_a_linear_ramp_is_the_bin_centre():
    # f(x, y) = x: bilinear sampling is exact, so each bin's average is f at the bin centre.
    feat = torch.arange(32.0).repeat(1, 1, 32, 1)  # [1, 1, 32, 32], value = column index
    rois = torch.tensor([[0.0, 4.0, 4.0, 20.0, 12.0]])
    out = mmcv_ops.RoIAlign(output_size=(2, 4), spatial_scale=1.0, sampling_ratio=2, aligned=True)(feat, rois)
    centres = 4.0 + (torch.arange(4) + 0.5) * 4.0 - 0.5  # aligned=True shifts by half a pixel
    assert torch.allclose(out[0, 0], centres.expand(2, 4), atol=1e-4)


# ------------------------------------------------------------------- the spec
def test_resolve_spec_forms(tmp_path):
    searched = LossSpec.from_theta([0.3] * 41)
    path = tmp_path / "loss_spec.json"
    path.write_text(searched.to_json())
    assert pm.resolve_spec(str(path)) == searched
    assert pm.resolve_spec(path) == searched
    assert pm.resolve_spec(searched.to_dict()) == searched
    assert pm.resolve_spec({"theta": [0.3] * 41}) == searched
    inline = pm.resolve_spec({"points": [list(p) for p in searched.points], "grad_scale": searched.grad_scale})
    assert inline == searched
    assert pm.resolve_spec({"points": [IDENTITY]}).form == "shared"
    assert pm.resolve_spec([IDENTITY] * 4) == LossSpec.searched([IDENTITY] * 4)
    assert pm.resolve_spec({"form": "linear"}) == LossSpec.handcrafted("linear")


@pytest.mark.parametrize(
    "spec, error, detail",
    [
        ("/no/such/dir/loss_spec.json", FileNotFoundError, "no loss-spec file at '/no/such/dir/loss_spec.json'"),
        ("NOT_JSON", ValueError, "is not a loss spec"),
        ("NOT_A_SPEC", ValueError, "unknown field"),
        ({"points": [IDENTITY[:11]] * 5, "grad_scale": 2.0}, ValueError, "must be 12 numbers"),
        ({"points": [IDENTITY] * 3}, ValueError, "4 or 5 functions"),
        ({"points": IDENTITY}, ValueError, "points[0]"),
        ({"theta": [0.5] * 7}, ValueError, "theta must have"),
        ({"ctrl_points": [IDENTITY] * 5}, ValueError, "got fields ['ctrl_points']"),
        (None, ValueError, "required"),
        (3.5, ValueError, "got float"),
    ],
)
def test_bad_spec_fails_when_the_config_is_built(tmp_path, spec, error, detail):
    if spec == "NOT_JSON":
        spec = str(tmp_path / "notes.txt")
        Path(spec).write_text("this is not json\n")
    elif spec == "NOT_A_SPEC":
        spec = str(tmp_path / "metrics.json")
        Path(spec).write_text(json.dumps({"AP": 0.3}))
    cfg = shapes_cfg()
    cfg.model.bbox_head.spec = spec
    with pytest.raises(error) as info:
        MODELS.build(cfg.model)
    message = str(info.value)
    assert "model.bbox_head.spec" in message and detail in message, message


@pytest.mark.slow
def test_spec_from_mlflow_registry(tmp_path, monkeypatch):
    """``models:/<name>@champion`` and ``models:/<name>/<version>`` read the version's loss_spec.json."""
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(None)  # read the environment again
    spec = LossSpec.from_theta([0.7] * 41)
    client = MlflowClient()
    exp = client.create_experiment("mmdet-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "loss_spec.json").write_text(spec.to_json())
    (model_dir / "checkpoint.pt").write_bytes(b"weights")
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.create_registered_model("paploss-retinanet")
    version = client.create_model_version("paploss-retinanet", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("paploss-retinanet", "champion", version.version)
    try:
        assert pm.resolve_spec("models:/paploss-retinanet@champion") == spec
        assert pm.resolve_spec(f"models:/paploss-retinanet/{version.version}") == spec
        with pytest.raises(ValueError, match="model.bbox_head.spec: no model version 'models:/paploss-retinanet/7'"):
            pm.resolve_spec("models:/paploss-retinanet/7")
        with pytest.raises(ValueError, match="model.bbox_head.spec: 'models:/x/y/z' is not an MLflow model URI"):
            pm.resolve_spec("models:/x/y/z")
    finally:
        mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------- the head
def reference_loss(head, cls_scores, bbox_preds, gt, metas, spec):
    """The loss built entry by entry with explicit loops (the slow twin of loss_by_feat).

    Every (image, level, y, x, anchor, class) entry gets its logit, its SPEC §1 target
    and quality; the quality decodes boxes on the real anchors (image coordinates) and
    measures GIoU with torchvision. Then one pap_loss over all entries of the batch.
    """
    sizes = [s.shape[-2:] for s in cls_scores]
    anchors, valid = head.get_anchors(sizes, metas, device="cpu")
    labels, weights, box_targets, _, _ = head.get_targets(anchors, valid, gt, metas)
    K, C = head.num_base_priors, head.cls_out_channels
    logits, targets, qualities = [], [], []
    for b in range(len(metas)):
        for lvl, (H, W) in enumerate(sizes):
            for y in range(H):
                for x in range(W):
                    for k in range(K):
                        a = (y * W + x) * K + k
                        label, w = int(labels[lvl][b, a]), float(weights[lvl][b, a])
                        u = torch.zeros(())
                        if label < C:
                            anchor = anchors[b][lvl][a : a + 1]
                            delta = bbox_preds[lvl][b, 4 * k : 4 * k + 4, y, x][None]
                            pred = head.bbox_coder.decode(anchor, delta)
                            target = head.bbox_coder.decode(anchor, box_targets[lvl][b, a][None])
                            u = (torchvision.ops.generalized_box_iou(pred, target)[0, 0] + 1) / 2
                        for c in range(C):
                            logits.append(cls_scores[lvl][b, k * C + c, y, x])
                            targets.append(-1.0 if w == 0 else float(label == c))
                            qualities.append(u if label == c else torch.zeros(()))
    return pap_loss(torch.stack(logits), torch.tensor(targets), torch.stack(qualities), spec, top_k=head.top_k)


@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no slow shrinking
@given(seed=st.integers(0, 1000), g=st.floats(0.1, 10.0), top_k=st.sampled_from([None, 100_000, 40]))
def test_head_loss_equals_pap_loss_on_the_same_entries(seed, g, top_k):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.rand(40, generator=gen).tolist()
    spec = LossSpec.searched(LossSpec.from_theta(theta).points, g)
    head = MODELS.build(head_cfg(num_classes=3, spec=spec, top_k=top_k, anchor_generator=dict(
        type="AnchorGenerator", octave_base_scale=4, scales_per_octave=1, ratios=[0.5, 1.0, 2.0], strides=[8, 16])))
    metas = [dict(img_shape=(48, 48), pad_shape=(48, 48), batch_input_shape=(48, 48)) for _ in range(2)]
    gt = []
    for _ in metas:
        xy = torch.rand(3, 2, generator=gen) * 24
        wh = 8 + torch.rand(3, 2, generator=gen) * 24
        gt.append(InstanceData(bboxes=torch.cat([xy, (xy + wh).clamp(max=48)], 1), labels=torch.randint(0, 3, (3,), generator=gen)))
    cls_scores = [torch.randn(2, 9, s, s, generator=gen, requires_grad=True) for s in (6, 3)]
    bbox_preds = [(0.5 * torch.randn(2, 12, s, s, generator=gen)).requires_grad_() for s in (6, 3)]

    ours = head.loss_by_feat(cls_scores, bbox_preds, gt, metas)["loss_pap"]
    ref = reference_loss(head, cls_scores, bbox_preds, gt, metas, spec)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours, ref)
    inputs = cls_scores + bbox_preds
    g_ours = torch.autograd.grad(ours, inputs)
    g_ref = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, torch.autograd.grad(ref, inputs, allow_unused=True))]
    for i, (a, b) in enumerate(zip(g_ours, g_ref)):
        scale = g if i >= len(cls_scores) else 1.0  # the searched gradient scale on the box branch
        assert torch.allclose(a, scale * b, rtol=1e-4, atol=1e-6), (i, (a - scale * b).abs().max())
    assert any(x.abs().sum() > 0 for x in g_ours[len(cls_scores):]), "the box branch gets no gradient"


def test_head_without_positives_is_zero_and_connected():
    head = MODELS.build(head_cfg(num_classes=5))
    metas = [dict(img_shape=(64, 64), pad_shape=(64, 64), batch_input_shape=(64, 64))]
    cls_scores = [torch.randn(1, 30, 64 // s, 64 // s, requires_grad=True) for s in (4, 8, 16, 32)]
    bbox_preds = [torch.randn(1, 24, 64 // s, 64 // s, requires_grad=True) for s in (4, 8, 16, 32)]
    empty = [InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    loss = head.loss_by_feat(cls_scores, bbox_preds, empty, metas)["loss_pap"]
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, cls_scores + bbox_preds)
    assert all(gr is not None and gr.abs().sum() == 0 for gr in grads)


def test_head_rejects_bad_options():
    with pytest.raises(ValueError, match="model.bbox_head.quality"):
        MODELS.build(head_cfg(quality="dice"))
    with pytest.raises(ValueError, match="model.bbox_head.top_k"):
        MODELS.build(head_cfg(top_k=0))
    with pytest.raises(ValueError, match="model.bbox_head.loss_cls.use_sigmoid"):
        MODELS.build(head_cfg(loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False)))


@pytest.mark.parametrize("kind", pm.QUALITIES)
def test_box_quality_in_unit_range_and_exact_for_perfect_boxes(kind):
    from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder

    coder = DeltaXYWHBBoxCoder(target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2])
    deltas = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    u = pm.box_quality(deltas, deltas + torch.randn(50, 4) * 0.3, coder, kind)
    assert u.shape == (50,) and bool(((u >= 0) & (u <= 1)).all())
    assert torch.allclose(pm.box_quality(deltas, deltas, coder, kind), torch.ones(50), atol=1e-5)


# ------------------------------------------------------------------ training
def test_training_on_shapes_lowers_the_loss_and_predicts(shapes_root):
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = shapes_cfg(shapes_root)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    model = MODELS.build(cfg.model)
    model.init_weights()
    batch = pseudo_collate([dataset[i] for i in range(2)])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    model.train()
    for _ in range(5):
        data = model.data_preprocessor(batch, True)
        loss = model(**data, mode="loss")["loss_pap"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] - 1e-3, losses

    # inference goes through batched_nms from torchvision
    model.eval()
    model.bbox_head.test_cfg.score_thr = 0.0
    with torch.no_grad():
        results = model(**model.data_preprocessor(batch, False), mode="predict")
    assert len(results) == 2
    for res in results:
        boxes, labels = res.pred_instances.bboxes, res.pred_instances.labels
        assert 0 < len(boxes) <= 100 and boxes.shape[1] == 4
        for c in labels.unique():
            same = boxes[labels == c]
            iou = torchvision.ops.box_iou(same, same) - torch.eye(len(same))
            assert float(iou.max()) <= 0.5 + 1e-5, "NMS left overlapping boxes of one class"


@pytest.mark.slow
def test_mmdet_train_tool_with_custom_imports(shapes_root, tmp_path):
    """The user's path: MMDetection's own tools/train.py; custom_imports loads the head."""
    import mmdet

    tool = Path(mmdet.__file__).parent / ".mim" / "tools" / "train.py"
    root = str(shapes_root) + "/"
    ann = root + "annotations/val.json"
    opts = [
        f"train_dataloader.dataset.data_root={root}", f"val_dataloader.dataset.data_root={root}",
        f"test_dataloader.dataset.data_root={root}", f"val_evaluator.ann_file={ann}", f"test_evaluator.ann_file={ann}",
        "train_cfg.max_epochs=1", "train_cfg.val_interval=1", "train_dataloader.batch_size=4",
        "default_hooks.logger.interval=1",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(tool), str(SHAPES_CFG), "--work-dir", str(tmp_path), "--cfg-options", *opts],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "epoch_1.pth").exists()
    log = "\n".join(p.read_text() for p in tmp_path.rglob("*.log"))
    assert "PAPLossRetinaHead: loss = pap_loss" in log and "loss_pap:" in log
    assert "bbox_mAP" in log or "testing results of the whole dataset is empty" in log


def test_r50_config_builds_the_papers_searched_loss():
    cfg = Config.fromfile(str(R50_CFG))
    assert cfg.custom_imports.imports == ["paploss.integrations.mmdet"]
    assert cfg.model.backbone.init_cfg is None  # no weight download at run time
    model = MODELS.build(cfg.model)
    head = model.bbox_head
    assert type(head).__name__ == "PAPLossRetinaHead" and head.num_classes == 80
    assert head.spec.form == "searched" and len(head.spec.points) == 5 and head.spec.grad_scale == pytest.approx(4.1231)
    assert type(model.backbone).__name__ == "ResNet" and model.backbone.depth == 50
    assert type(model.neck).__name__ == "FPN"


@pytest.mark.parametrize("cfg_file", [SHAPES_CFG, R50_CFG], ids=["tiny_shapes", "r50_coco"])
def test_configs_resolve_through_the_shared_local_base(cfg_file, tmp_path, monkeypatch):
    """Both example configs inherit configs/mmdet/_base_/paploss_retinanet.py by a
    relative path, which mmengine resolves without pkg_resources (the reason
    MMDetection's own `mmdet::` bases are not used)."""
    assert "_base_ = ['./_base_/paploss_retinanet.py']" in cfg_file.read_text()
    # a copy of the configs whose base sets one extra key: both configs see it
    copy = tmp_path / "mmdet"
    shutil.copytree(cfg_file.parent, copy)
    base = copy / "_base_" / "paploss_retinanet.py"
    base.write_text(base.read_text() + "\nonly_in_the_base = 'shared'\n")
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # importing it would fail
    cfg = Config.fromfile(str(copy / cfg_file.name))
    assert cfg.only_in_the_base == "shared"
    # keys set only in the base, merged with the config's own
    assert cfg.custom_imports.imports == ["paploss.integrations.mmdet"] and cfg.default_scope == "mmdet"
    assert cfg.model.type == "RetinaNet" and cfg.model.train_cfg.assigner.type == "MaxIoUAssigner"
    head = cfg.model.bbox_head
    assert head.type == "PAPLossRetinaHead" and head.anchor_generator.scales_per_octave == 2 and "strides" in head.anchor_generator
    assert cfg.val_cfg == dict(type="ValLoop") and set(cfg.default_hooks) >= {"timer", "logger", "checkpoint"}


# ------------------------------------------- an MMDetection config as the pipeline's detector
def tiny_train_config(data: Path, tmp_path: Path, **overrides):
    from paploss.engine import TrainConfig

    fields = dict(data=str(data), train_ann="train", val_ann="val", loss="paploss", spec=LossSpec.searched([IDENTITY] * 5),
                  iterations=3, batch_size=2, warmup_iters=1, lr=0.01, eval_batch_size=4, out_dir=str(tmp_path / "run"))
    fields.update(overrides)
    return TrainConfig(**fields)


def test_divergence_hook_stops_after_patience():
    from paploss.integrations.mmdet_train import Diverged, DivergenceHook

    seen = []
    hook = DivergenceHook(patience=2, on_step=lambda i, v: seen.append(i))
    for i, v in enumerate([0.9, 1.0, float("nan"), 0.8]):  # two bad ones: still within patience
        hook.observe(i, v)
    with pytest.raises(Diverged, match="3 iterations"):
        hook.observe(4, 1.0 + 1e-7)  # 1.0 to 1e-6 counts as bad
    assert seen == [0, 1, 2, 3, 4] and hook.bad == 3


@pytest.mark.filterwarnings("ignore:Detected call of `scheduler.step\\(\\)` before")
@pytest.mark.parametrize("steps, warmup", [(20, 5), (7, 0), (3, 1)])
def test_mmdet_schedule_equals_engine_lr_at(shapes_root, tmp_path, steps, warmup):
    """The learning rates MMDetection's schedulers give per iteration are the engine's lr_at."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    from paploss.engine import lr_at
    from paploss.integrations.mmdet_train import build_config

    cfg = tiny_train_config(shapes_root, tmp_path, iterations=steps, warmup_iters=warmup, lr=0.02)
    mm, total = build_config(SHAPES_CFG, cfg, str(tmp_path))
    assert total == steps
    wrapper = build_optim_wrapper(torch.nn.Linear(1, 1), mm.optim_wrapper)
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in mm.param_scheduler]
    for it in range(total):
        assert wrapper.get_lr()["lr"][0] == pytest.approx(lr_at(cfg, it, total), rel=1e-9), it
        for s in schedulers:
            s.step()


def test_mmdet_run_config_errors(shapes_root, tmp_path):
    from paploss.integrations.mmdet_train import build_config

    with pytest.raises(FileNotFoundError, match="no MMDetection config at '/no/such.py'"):
        build_config("/no/such.py", tiny_train_config(shapes_root, tmp_path), str(tmp_path))
    with pytest.raises(ValueError, match="init='/x/backbone.pt'"):
        build_config(SHAPES_CFG, tiny_train_config(shapes_root, tmp_path, init="/x/backbone.pt"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no annotation file .*search_val.json"):
        build_config(SHAPES_CFG, tiny_train_config(shapes_root, tmp_path, val_ann="search_val"), str(tmp_path))
    mm, _ = build_config(SHAPES_CFG, tiny_train_config(shapes_root, tmp_path, loss="focal+giou", spec=None), str(tmp_path))
    assert mm.model.bbox_head.type == "RetinaHead" and mm.model.bbox_head.loss_bbox.type == "GIoULoss"
    assert "spec" not in mm.model.bbox_head and mm.model.bbox_head.reg_decoded_bbox


@pytest.mark.slow
def test_mmdet_config_as_the_trial_detector(shapes_root, tmp_path):
    """``engine.train`` with ``detector="mmdet:<config>"`` (what a pipeline trial calls)
    trains the MMDetection config and returns a proxy trial's result."""
    import dataclasses

    from paploss.engine import TrainResult, train
    from paploss.evaluate import METRICS

    steps = []
    cfg = dataclasses.replace(tiny_train_config(shapes_root, tmp_path), detector=f"mmdet:{SHAPES_CFG}")
    res = train(cfg, on_step=lambda i, v: steps.append(i))
    assert isinstance(res, TrainResult) and not res.diverged
    assert steps == [0, 1, 2] and len(res.losses) == 3 and all(math.isfinite(v) for v in res.losses)
    assert set(res.metrics) == set(METRICS) and all(0.0 <= v <= 1.0 for v in res.metrics.values())
    assert res.checkpoint is not None and Path(res.checkpoint).exists()


def test_mmdet_detector_name_needs_a_config(shapes_root, tmp_path):
    import dataclasses

    with pytest.raises(ValueError, match="names no MMDetection config"):
        dataclasses.replace(tiny_train_config(shapes_root, tmp_path), detector="mmdet:")


@pytest.mark.slow
def test_mmdet_trial_that_diverges_reports_zero_metrics(shapes_root, tmp_path):
    """A run stopped by the divergence check (here raised from on_step at iteration 1) gives reward 0."""
    from paploss.integrations.mmdet_train import Diverged, train

    def stop(it, loss):
        if it == 1:
            raise Diverged("stopped by the test")

    res = train(SHAPES_CFG, tiny_train_config(shapes_root, tmp_path, iterations=4), on_step=stop)
    assert res.diverged and res.iterations == 2 and res.checkpoint is None
    assert set(res.metrics.values()) == {0.0}


@pytest.mark.slow
def test_r50_config_trains_one_step():
    """The R-50 config's head, with the paper's searched loss, gives a finite loss and gradients to both branches."""
    from mmdet.structures import DetDataSample

    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(R50_CFG)).model)  # torch's default init: enough for one step
    sample = DetDataSample(metainfo=dict(img_shape=(128, 128), pad_shape=(128, 128), batch_input_shape=(128, 128)))
    sample.gt_instances = InstanceData(bboxes=torch.tensor([[20.0, 30.0, 90.0, 100.0]]), labels=torch.tensor([7]))
    losses = model(torch.randn(1, 3, 128, 128), [sample], mode="loss")
    assert set(losses) == {"loss_pap"} and math.isfinite(losses["loss_pap"].item())
    losses["loss_pap"].backward()
    head = model.bbox_head
    assert head.retina_cls.weight.grad.abs().sum() > 0 and head.retina_reg.weight.grad.abs().sum() > 0
