"""Deformable DETR with the PAP loss in MMDetection 3.3: the deformable attention op in
plain torch, PAPLossDeformableDETRHead, the tiny shapes config.

These run the real MMDetection (``pip install -e '.[mmdet]'``); without it they are
skipped with the reason. ``pytest -k deformable_detr`` selects them all.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mmdet", reason="MMDetection is an optional extra: pip install -e '.[mmdet]'")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import paploss.integrations.mmdet_detr as pd  # noqa: E402  (installs the mmcv.ops replacement first)
from paploss import LossSpec, pap_loss  # noqa: E402
from paploss.integrations import mmcv_ops  # noqa: E402

from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402
from mmdet.registry import DATASETS, MODELS  # noqa: E402

pytestmark = pytest.mark.mmdet

ROOT = Path(__file__).resolve().parents[1]
DETR = "deformable_detr_tiny"
DETR_CFG = ROOT / "paploss" / "configs" / "mmdet" / "paploss_deformable_detr_tiny_shapes.py"  # package data
RETINA_CFG = ROOT / "configs" / "mmdet" / "paploss_retinanet_tiny_shapes.py"

init_default_scope("mmdet")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, loaded CPU two threads made a training step 12x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    from paploss.data import make_dataset

    return make_dataset("shapes", tmp_path_factory.mktemp("shapes"), n_train=8, n_val=4, image_size=128, seed=0, progress=False)


def detr_cfg(root: Path | None = None) -> Config:
    cfg = Config.fromfile(str(DETR_CFG))
    if root is not None:
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
            cfg[loader].dataset.data_root = str(root) + "/"
    return cfg


def head_cfg(**overrides) -> dict:
    cfg = detr_cfg()
    head = cfg.model.bbox_head.to_dict()
    head.update(train_cfg=cfg.model.train_cfg.to_dict(), test_cfg=cfg.model.test_cfg.to_dict(), num_pred_layer=2,
                share_pred_layer=True, as_two_stage=False)
    head.update(overrides)
    return head


# ------------------------------------------------- multi-scale deformable attention
def slow_msda(value, shapes, locations, weights):
    """The twin of ``multi_scale_deformable_attn_pytorch``: one sample at a time, bilinear
    interpolation written out (pixel centres at integers, 0 outside the map).

    value [B, S, M, D]; shapes list of (h, w); locations [B, Q, M, L, P, 2] (x, y in [0, 1]
    of the map); weights [B, Q, M, L, P]. Returns [B, Q, M·D]."""
    B, _, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes]).tolist()
    rows = []
    for b in range(B):
        per_query = []
        for q in range(Q):
            heads = []
            for m in range(M):
                acc = value.new_zeros(D)
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(P):
                        x = locations[b, q, m, lvl, p, 0] * w - 0.5
                        y = locations[b, q, m, lvl, p, 1] * h - 0.5
                        x0, y0 = math.floor(float(x)), math.floor(float(y))
                        fx, fy = x - x0, y - y0
                        sample = value.new_zeros(D)
                        for xi, yi, c in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                                          (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
                            if 0 <= xi < w and 0 <= yi < h:
                                sample = sample + c * value[b, starts[lvl] + yi * w + xi, m]
                        acc = acc + weights[b, q, m, lvl, p] * sample
                heads.append(acc)
            per_query.append(torch.cat(heads))
        rows.append(torch.stack(per_query))
    return torch.stack(rows)


@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    dims=st.integers(1, 3),
    queries=st.integers(1, 3),
    points=st.integers(1, 3),
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
)
def test_deformable_detr_attention_op_equals_slow_twin(seed, batch, heads, dims, queries, points, shapes):
    """Value and gradient (value, sampling locations, attention weights), locations
    also outside the maps (zero padding), float64."""
    gen = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    keys = sum(h * w for h, w in shapes)
    value = torch.randn(batch, keys, heads, dims, generator=gen, dtype=torch.float64, requires_grad=True)
    loc = (torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2)
    loc.requires_grad_()
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(batch, queries, heads * dims, generator=gen, dtype=torch.float64)

    fast = mmcv_ops.multi_scale_deformable_attn_pytorch(value, torch.tensor(shapes), loc, weights)
    slow = slow_msda(value, shapes, loc, weights)
    assert fast.shape == (batch, queries, heads * dims)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    g_fast = torch.autograd.grad((fast * cot).sum(), (value, loc, weights))
    g_slow = torch.autograd.grad((slow * cot).sum(), (value, loc, weights))
    for name, a, b in zip(("value", "locations", "weights"), g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"d/d{n}: {m}")


def test_deformable_detr_attention_op_rejects_bad_shapes():
    value = torch.zeros(1, 7, 2, 3)
    loc = torch.zeros(1, 4, 2, 2, 1, 2)
    w = torch.zeros(1, 4, 2, 2, 1)
    with pytest.raises(ValueError, match=r"value has 7 keys but the levels \[\(2, 2\), \(2, 2\)\] hold 8 pixels"):
        mmcv_ops.multi_scale_deformable_attn_pytorch(value, torch.tensor([[2, 2], [2, 2]]), loc, w)
    with pytest.raises(ValueError, match="shapes do not agree"):
        mmcv_ops.multi_scale_deformable_attn_pytorch(value, torch.tensor([[7, 1]]), loc, w)


def _mmcv_source_module():
    """mmcv 2.1's own ``mmcv/ops/multi_scale_deform_attn.py`` (its Python, CPU path), loaded
    with the compiled-extension loader stubbed out and without touching the registry."""
    import mmcv
    from mmcv.utils import ext_loader
    from mmengine.registry import MODELS as ENGINE_MODELS

    path = Path(mmcv.__file__).parent / "ops" / "multi_scale_deform_attn.py"
    spec = importlib.util.spec_from_file_location("mmcv.ops._mmcv_source_msda", path)
    module = importlib.util.module_from_spec(spec)
    saved_load, saved_entry = ext_loader.load_ext, ENGINE_MODELS._module_dict.pop("MultiScaleDeformableAttention", None)
    ext_loader.load_ext = lambda *a, **k: None
    try:
        spec.loader.exec_module(module)
    finally:
        ext_loader.load_ext = saved_load
        ENGINE_MODELS._module_dict["MultiScaleDeformableAttention"] = saved_entry
    return module


@pytest.mark.parametrize("ref_dims", [2, 4])
def test_deformable_detr_attention_layer_equals_mmcv_python_source(ref_dims):
    """Our layer against mmcv's own layer (its torch path), same weights: init, value, gradients."""
    src = _mmcv_source_module()
    torch.manual_seed(0)
    ours = mmcv_ops.MultiScaleDeformableAttention(embed_dims=16, num_heads=4, num_levels=2, num_points=3,
                                                  dropout=0.0, batch_first=True)
    theirs = src.MultiScaleDeformableAttention(embed_dims=16, num_heads=4, num_levels=2, num_points=3,
                                              dropout=0.0, batch_first=True)
    torch.testing.assert_close(ours.sampling_offsets.bias, theirs.sampling_offsets.bias)  # same initial grid
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    theirs.load_state_dict(ours.state_dict())
    shapes = torch.tensor([[4, 5], [2, 3]])
    query = torch.randn(2, 6, 16, requires_grad=True)
    value = torch.randn(2, 26, 16, requires_grad=True)
    ref = torch.rand(2, 6, 2, ref_dims)
    mask = torch.zeros(2, 26, dtype=torch.bool)
    mask[1, -4:] = True
    kw = dict(value=value, reference_points=ref, spatial_shapes=shapes, key_padding_mask=mask,
              level_start_index=torch.tensor([0, 20]), query_pos=torch.randn(2, 6, 16))
    a, b = ours(query, **kw), theirs(query, **kw)
    torch.testing.assert_close(a, b)
    inputs = [query, value, *ours.parameters()]
    ga = torch.autograd.grad(a.square().sum(), inputs)
    gb = torch.autograd.grad(b.square().sum(), [query, value, *theirs.parameters()])
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_deformable_detr_modules_use_the_replacement_attention():
    from mmcv.cnn.bricks.transformer import MultiScaleDeformableAttention as from_bricks
    from mmcv.ops import MultiScaleDeformableAttention as from_ops
    from mmdet.models.layers.transformer import deformable_detr_layers
    from mmengine.registry import MODELS as ENGINE_MODELS

    assert from_bricks is from_ops is deformable_detr_layers.MultiScaleDeformableAttention
    assert from_ops is mmcv_ops.MultiScaleDeformableAttention
    assert ENGINE_MODELS.get("MultiScaleDeformableAttention") is from_ops
    with pytest.raises(ValueError, match="embed_dims 10 must be divisible by num_heads 4"):
        from_ops(embed_dims=10, num_heads=4)


# ------------------------------------------------------------------ the head
def _known_matching(gen, n_gts, queries, img=128):
    """Ground truths and predicted boxes whose Hungarian matching is forced: query
    ``perm[i]`` holds ground truth i's box plus small noise, every other query a 0.04-wide
    box. Returns (gt InstanceData, boxes [Q, 4] sigmoid-space cxcywh, perm)."""
    xy = torch.tensor([[8.0, 8.0], [70.0, 10.0], [10.0, 70.0], [72.0, 72.0]])[:n_gts]
    wh = 24 + torch.rand(n_gts, 2, generator=gen) * 28
    gt_xyxy = torch.cat([xy, xy + wh], 1)
    labels = torch.randint(0, 5, (n_gts,), generator=gen)
    target = torch.cat([(gt_xyxy[:, :2] + gt_xyxy[:, 2:]) / 2, wh], 1) / img
    boxes = torch.cat([torch.rand(queries, 2, generator=gen) * 0.9 + 0.05, torch.full((queries, 2), 0.04)], 1)
    perm = torch.randperm(queries, generator=gen)[:n_gts]
    boxes[perm] = (target + 0.04 * (torch.rand(n_gts, 4, generator=gen) - 0.5)).clamp(0.01, 0.99)
    return InstanceData(bboxes=gt_xyxy, labels=labels), boxes, perm, target


def _hand_quality(pred, target, kind):
    """(GIoU + 1) / 2 or IoU of two (cx, cy, w, h) boxes, from the definitions."""
    px1, py1, px2, py2 = pred[0] - pred[2] / 2, pred[1] - pred[3] / 2, pred[0] + pred[2] / 2, pred[1] + pred[3] / 2
    tx1, ty1, tx2, ty2 = (float(target[0] - target[2] / 2), float(target[1] - target[3] / 2),
                          float(target[0] + target[2] / 2), float(target[1] + target[3] / 2))
    iw = torch.clamp(torch.minimum(px2, torch.tensor(tx2)) - torch.maximum(px1, torch.tensor(tx1)), min=0)
    ih = torch.clamp(torch.minimum(py2, torch.tensor(ty2)) - torch.maximum(py1, torch.tensor(ty1)), min=0)
    inter = iw * ih
    union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter
    iou = inter / union
    if kind == "iou":
        return iou
    hull = (torch.maximum(px2, torch.tensor(tx2)) - torch.minimum(px1, torch.tensor(tx1))) * \
        (torch.maximum(py2, torch.tensor(ty2)) - torch.minimum(py1, torch.tensor(ty1)))
    return (iou - (hull - union) / hull + 1) / 2


@pytest.mark.parametrize("seed, g, quality, detach_i3", [(0, 1.0, "giou", False), (1, 0.3, "giou", False),
                                                    (2, 4.0, "iou", False), (3, 2.0, "giou", False),
                                                    (4, 1.0, "giou", True), (5, 2.5, "iou", True)])
def test_deformable_detr_head_loss_equals_pap_loss_on_the_same_entries(seed, g, quality, detach_i3, monkeypatch):
    """Per decoder layer: every query x class entry of the batch ranked once by pap_loss
    (targets from the forced matching, qualities by hand); value and gradient, the box
    branch's gradient times the spec's grad_scale. With ``detach_i3`` the head's loss is
    ``pap_loss(..., detach_i3=True)`` in value and gradient (and its box gradient is not
    the undetached one: the switch reaches the loss)."""
    gen = torch.Generator().manual_seed(seed)
    spec = LossSpec.searched(LossSpec.from_theta(torch.rand(40, generator=gen).tolist()).points, g)
    head = MODELS.build(head_cfg(spec=spec, quality=quality, detach_i3=detach_i3))
    L, B, Q, C = 2, 2, 12, 5
    n_gts = [3, 1]
    metas = [dict(img_shape=(128, 128), pad_shape=(128, 128), batch_input_shape=(128, 128)) for _ in range(B)]
    cls = (torch.rand(L, B, Q, C, generator=gen) * 2 - 1).requires_grad_()
    layouts = [[_known_matching(gen, n_gts[b], Q) for b in range(B)] for _ in range(L)]
    gts = [layouts[0][b][0] for b in range(B)]
    for lay in layouts[1:]:  # the same ground truths, other queries matched in the later layer
        for b in range(B):
            gt, boxes, perm, target = lay[b]
            boxes[perm] = (layouts[0][b][3] + 0.04 * (torch.rand(n_gts[b], 4, generator=gen) - 0.5)).clamp(0.01, 0.99)
            lay[b] = (gts[b], boxes, perm, layouts[0][b][3])
    boxes = torch.stack([torch.stack([lay[b][1] for b in range(B)]) for lay in layouts]).requires_grad_()

    calls = []

    def recording(logits, targets, qualities, spec_, **kw):
        calls.append((logits.shape, targets.detach().clone()))
        return pap_loss(logits, targets, qualities, spec_, **kw)

    monkeypatch.setattr(pd, "pap_loss", recording)
    losses = head.loss_by_feat(cls, boxes, None, None, gts, metas)
    assert set(losses) == {"loss_pap", "d0.loss_pap"}
    ours = losses["loss_pap"] + losses["d0.loss_pap"]

    # the ranked entries: queries x classes x images, per decoder layer, none ignored
    assert len(calls) == L
    for shape, targets in calls:
        assert shape.numel() == Q * C * B and targets.numel() == Q * C * B
        assert set(targets.unique().tolist()) <= {0.0, 1.0} and int(targets.sum()) == sum(n_gts)

    def reference(detach: bool):
        ref = 0.0
        for lvl in range(L):
            t = torch.zeros(B, Q, C)
            u = [[[torch.zeros(()) for _ in range(C)] for _ in range(Q)] for _ in range(B)]
            for b in range(B):
                _gt, _bx, perm, target = layouts[lvl][b]
                for i, q in enumerate(perm.tolist()):
                    c = int(gts[b].labels[i])
                    t[b, q, c] = 1.0
                    u[b][q][c] = _hand_quality(boxes[lvl, b, q], target[i], quality)
            u_flat = torch.stack([u[b][q][c] for b in range(B) for q in range(Q) for c in range(C)])
            ref = ref + pap_loss(cls[lvl].reshape(-1), t.reshape(-1), u_flat, spec, detach_i3=detach)
        return ref

    ref = reference(detach_i3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(ours, (cls, boxes))
    g_ref = torch.autograd.grad(ref, (cls, boxes))
    torch.testing.assert_close(g_ours[0], g_ref[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_ours[1], g * g_ref[1], rtol=1e-4, atol=1e-6)  # the searched gradient scale
    assert g_ours[1].abs().sum() > 0, "the box branch gets no gradient"
    if detach_i3:  # the switch changes the box gradient (I3's share of it is gone), not the value
        other = reference(False)
        torch.testing.assert_close(other, ref, rtol=1e-6, atol=1e-7)
        g_other = torch.autograd.grad(other, boxes)[0]
        assert not torch.allclose(g * g_other, g_ours[1], rtol=1e-3, atol=1e-6), "detach_i3 did not reach the loss"


def test_deformable_detr_head_without_ground_truth_is_zero_and_connected():
    head = MODELS.build(head_cfg(spec=LossSpec.handcrafted("linear")))
    metas = [dict(img_shape=(64, 64), pad_shape=(64, 64), batch_input_shape=(64, 64))]
    cls = torch.randn(2, 1, 7, 5, requires_grad=True)
    boxes = torch.rand(2, 1, 7, 4).requires_grad_()
    empty = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
    losses = head.loss_by_feat(cls, boxes, None, None, [empty], metas)
    total = sum(losses.values())
    assert float(total) == 0.0
    gc, gb = torch.autograd.grad(total, (cls, boxes))
    assert torch.equal(gc, torch.zeros_like(gc)) and torch.equal(gb, torch.zeros_like(gb))


def test_deformable_detr_targets_and_quality():
    t = pd.detr_targets(torch.tensor([2, 5, 0, 5]), 5)
    assert t.tolist() == [[0, 0, 1, 0, 0], [0] * 5, [1, 0, 0, 0, 0], [0] * 5]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\]"):
        pd.detr_targets(torch.tensor([6]), 5)
    box = torch.rand(20, 4) * 0.5 + 0.1
    for kind in ("giou", "iou", "l1"):
        torch.testing.assert_close(pd.detr_box_quality(box, box, kind), torch.ones(20))
    far = torch.tensor([[0.9, 0.9, 0.05, 0.05]])
    near = torch.tensor([[0.1, 0.1, 0.05, 0.05]])
    assert float(pd.detr_box_quality(far, near, "iou")) == 0.0
    assert 0.0 < float(pd.detr_box_quality(far, near, "giou")) < 0.1  # still a gradient where IoU has none
    with pytest.raises(ValueError, match="quality must be one of"):
        pd.detr_box_quality(box, box, "dice")


def test_deformable_detr_head_rejects_bad_options():
    with pytest.raises(ValueError, match="model.bbox_head.quality"):
        MODELS.build(head_cfg(quality="dice"))
    with pytest.raises(ValueError, match="model.bbox_head.top_k"):
        MODELS.build(head_cfg(top_k=0))
    with pytest.raises(ValueError, match="use_sigmoid"):
        MODELS.build(head_cfg(loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False)))
    with pytest.raises(ValueError, match="model.bbox_head.spec: required"):
        MODELS.build(head_cfg(spec=None))


def test_deformable_detr_loss_switch(shapes_root, tmp_path):
    from paploss.engine import TrainConfig
    from paploss.integrations.mmdet_train import build_config

    base = dict(data=str(shapes_root), detector=f"mmdet:{DETR_CFG}", iterations=2, batch_size=2)
    mm, _ = build_config(DETR_CFG, TrainConfig(loss="paploss", spec=LossSpec.handcrafted("square"), **base), str(tmp_path))
    head = mm.model.bbox_head
    assert head.type == "PAPLossDeformableDETRHead" and head.spec["form"] == "square" and head.num_classes == 5
    assert mm.optim_wrapper.paramwise_cfg.custom_keys.sampling_offsets.lr_mult == 0.1  # the config's groups stay
    mm, _ = build_config(DETR_CFG, TrainConfig(loss="focal+l1", **base), str(tmp_path))
    head = mm.model.bbox_head
    assert head.type == "DeformableDETRHead" and "spec" not in head
    assert (head.loss_cls.type, head.loss_bbox.loss_weight, head.loss_iou.loss_weight) == ("FocalLoss", 5.0, 0.0)
    mm, _ = build_config(DETR_CFG, TrainConfig(loss="focal+giou", **base), str(tmp_path))
    assert mm.model.bbox_head.loss_iou.loss_weight == 2.0 and mm.model.bbox_head.loss_bbox.loss_weight == 5.0
    with pytest.raises(ValueError, match="model.bbox_head.type"):
        pd.switch_head(dict(type="RetinaHead"), TrainConfig(**base))


# ------------------------------------------------------------------ training
def test_deformable_detr_training_on_shapes_lowers_the_loss_and_predicts(shapes_root):
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = detr_cfg(shapes_root)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    model = MODELS.build(cfg.model)
    model.init_weights()
    batch = pseudo_collate([dataset[i] for i in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    model.train()
    for _ in range(30):
        data = model.data_preprocessor(batch, True)
        out = model(**data, mode="loss")
        assert set(out) == {"loss_pap", "d0.loss_pap"}
        loss = out["loss_pap"] + out["d0.loss_pap"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05, losses

    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(batch, False), mode="predict")
    assert len(results) == 4
    for res in results:
        boxes, scores = res.pred_instances.bboxes, res.pred_instances.scores
        assert boxes.shape == (100, 4) and bool(((scores >= 0) & (scores <= 1)).all())
        assert bool((boxes[:, 2:] >= boxes[:, :2]).all()) and float(boxes.max()) <= 128.0


@pytest.mark.slow
def test_deformable_detr_cli_train_reports_coco_ap(tmp_path):
    """``paploss train --detector deformable_detr_tiny --iterations 300`` prints COCO AP (64-pixel
    images through ``--image-size``, batch 1, 8 validation images: the run, not the detector's
    quality, is what is checked). From another folder: the name finds the installed package's config."""
    from paploss.data import make_dataset

    root = make_dataset("shapes", tmp_path / "shapes", n_train=32, n_val=8, image_size=64, seed=0, progress=False)
    cmd = [sys.executable, "-m", "paploss.cli", "train", "--data", str(root), "--detector", DETR,
           "--loss", "paploss", "--form", "linear", "--optimizer", "adamw", "--lr", "0.002", "--iterations", "300",
           "--batch-size", "1", "--image-size", "64", "--warmup-iters", "50", "--threads", "1", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = result["metrics"]
    assert not result["diverged"] and result["iterations"] == 300
    assert set(metrics) >= {"AP", "AP50", "AP75"} and all(0.0 <= metrics[k] <= 1.0 for k in ("AP", "AP50", "AP75"))
    print("deformable_detr_tiny, 300 iterations:", metrics)


def test_deformable_detr_tiny_names_the_packaged_config(shapes_root, monkeypatch):
    """``deformable_detr_tiny`` (paploss.spec_set) names the config the paploss package ships
    (package data), has one PAP-loss head (θ of 41), and a TrainConfig keeps the *name*
    (what a pipeline or a TrainJob sends): the engine finds the file when it trains."""
    import paploss
    import paploss.integrations.mmdet_train as mt
    from paploss.engine import TrainConfig, train
    from paploss.spec_set import detector_names, head_names, is_mmdet, mmdet_config, resolve_detector, theta_dim

    assert DETR in detector_names() and is_mmdet(DETR) and is_mmdet(f"mmdet:{RETINA_CFG}")
    assert not is_mmdet("retinanet_mobilenet_v3") and not is_mmdet("")
    assert Path(mmdet_config(DETR)) == DETR_CFG == Path(paploss.__file__).parent / "configs" / "mmdet" / DETR_CFG.name
    assert mmdet_config(f"mmdet:{RETINA_CFG}") == str(RETINA_CFG)  # a user's own config: as given
    assert resolve_detector(DETR) == f"mmdet:{DETR_CFG}" and resolve_detector("retinanet_mobilenet_v3") == "retinanet_mobilenet_v3"
    assert head_names(DETR) == () and theta_dim(DETR) == 41
    with pytest.raises(ValueError, match="'retinanet_mobilenet_v3' is not an MMDetection one"):
        mmdet_config("retinanet_mobilenet_v3")
    cfg = TrainConfig(data=str(shapes_root), detector=DETR, loss="paploss", spec=LossSpec.handcrafted("linear"),
                      iterations=2)
    sent = json.loads(json.dumps(cfg.to_dict()))
    assert sent["detector"] == DETR and TrainConfig.from_dict(sent).detector == DETR
    seen = []
    monkeypatch.setattr(mt, "train", lambda config_file, cfg, on_step=None: seen.append(Path(config_file)) or "ran")
    assert train(TrainConfig.from_dict(sent)) == "ran" and seen == [DETR_CFG]
    with pytest.raises(ValueError, match=r"unknown detector 'yolo'; known: .*'deformable_detr_tiny'.* or mmdet:<config file>"):
        TrainConfig(data=str(shapes_root), detector="yolo", iterations=2)


def test_deformable_detr_tiny_resolves_on_the_machine_that_trains(shapes_root, tmp_path, monkeypatch):
    """Another installation (a wheel in an image: its own package folder) trains the same
    TrainConfig JSON from its own copy of the config; one without the file says so."""
    import importlib.resources

    import paploss.integrations.mmdet_train as mt
    from paploss.engine import TrainConfig, train
    from paploss.spec_set import mmdet_config

    sent = json.dumps(TrainConfig(data=str(shapes_root), detector=DETR, loss="paploss",
                                  spec=LossSpec.handcrafted("linear"), iterations=2).to_dict())
    other = tmp_path / "site-packages" / "paploss"
    copy = other / "configs" / "mmdet" / DETR_CFG.name
    copy.parent.mkdir(parents=True)
    copy.write_text(DETR_CFG.read_text())
    real_files = importlib.resources.files
    monkeypatch.setattr(importlib.resources, "files", lambda pkg: other if pkg == "paploss" else real_files(pkg))
    seen = []
    monkeypatch.setattr(mt, "train", lambda config_file, cfg, on_step=None: seen.append(Path(config_file)) or "ran")
    assert mmdet_config(DETR) == str(copy)
    assert train(TrainConfig.from_dict(json.loads(sent))) == "ran" and seen == [copy]
    copy.unlink()
    with pytest.raises(ValueError, match=r"deformable_detr_tiny: its MMDetection config paploss/configs/mmdet/"
                                         r"paploss_deformable_detr_tiny_shapes.py is missing from the installed package"):
        train(TrainConfig.from_dict(json.loads(sent)))
    assert seen == [copy]


def test_deformable_detr_tiny_in_paploss_train(shapes_root, monkeypatch):
    """``paploss train --detector deformable_detr_tiny`` hands the engine the name (no path of
    this machine), ``--detach-i3`` included."""
    from click.testing import CliRunner

    import paploss.engine
    from paploss.engine_cli import train as train_cmd

    seen = []

    def fake_train(cfg, on_step=None, progress=True):
        seen.append((cfg.detector, cfg.detach_i3))
        return paploss.engine.TrainResult(metrics={"AP": 0.0}, diverged=False, losses=[], checkpoint=None,
                                          seconds=0.0, iterations=0)

    monkeypatch.setattr(paploss.engine, "train", fake_train)
    for extra, detach in (([], False), (["--detach-i3"], True)):
        result = CliRunner().invoke(train_cmd, ["--data", str(shapes_root), "--detector", DETR, "--form", "linear",
                                                "--iterations", "2", "--quiet", *extra])
        assert result.exit_code == 0, result.output
        assert seen[-1] == (DETR, detach)
    result = CliRunner().invoke(train_cmd, ["--data", str(shapes_root), "--detector", "yolo", "--iterations", "2"])
    message = str(result.exception)  # InputError: the CLI's main prints it as a usage error
    assert result.exit_code != 0 and message.startswith("--detector: unknown detector 'yolo'") and DETR in message


def test_deformable_detr_detach_i3_reaches_the_head_and_is_refused_where_there_is_none(shapes_root, tmp_path):
    """``detach_i3`` trains a Deformable DETR (its head's switch); a RetinaNet MMDetection
    head has none: one clear error. Never with a baseline loss, nor the box-collapse stop."""
    from paploss.engine import TrainConfig
    from paploss.integrations.mmdet_train import build_config

    base = dict(data=str(shapes_root), iterations=2, batch_size=2, loss="paploss", spec=LossSpec.handcrafted("sqrt"))
    for detach in (True, False):
        mm, _ = build_config(DETR_CFG, TrainConfig(detector=DETR, detach_i3=detach, **base), str(tmp_path))
        assert mm.model.bbox_head.type == "PAPLossDeformableDETRHead" and mm.model.bbox_head.detach_i3 is detach
    cfg = TrainConfig(detector=f"mmdet:{RETINA_CFG}", detach_i3=True, **base)
    with pytest.raises(ValueError, match=r"^detach_i3: the MMDetection head 'PAPLossRetinaHead' has no such switch"):
        build_config(RETINA_CFG, cfg, str(tmp_path))
    with pytest.raises(ValueError, match=r"detach_i3 needs the PAP loss \(loss='focal\+giou'\)"):
        TrainConfig(data=str(shapes_root), iterations=2, detector=DETR, loss="focal+giou", detach_i3=True)
    with pytest.raises(ValueError, match="box_collapse needs the PAP loss on a paploss detector"):
        TrainConfig(detector=DETR, box_collapse=0.3, **base)


def test_deformable_detr_tiny_takes_the_image_size_of_its_training(shapes_root, tmp_path):
    """A config paploss ships (a detector name) is sized by the TrainConfig: every Resize of
    both pipelines at image_size (``paploss train --image-size``); a user's own config
    (``mmdet:<file>``, the same file here) keeps its sizes."""
    from paploss.engine import TrainConfig
    from paploss.integrations.mmdet_train import build_config

    def scales(mm):
        return [tuple(step["scale"]) for loader in (mm.train_dataloader, mm.val_dataloader)
                for step in loader["dataset"]["pipeline"] if step["type"] == "Resize"]

    base = dict(data=str(shapes_root), iterations=2, loss="paploss", spec=LossSpec.handcrafted("linear"))
    mm, _ = build_config(DETR_CFG, TrainConfig(detector=DETR, image_size=64, **base), str(tmp_path))
    assert scales(mm) == [(64, 64), (64, 64)]
    mm, _ = build_config(DETR_CFG, TrainConfig(detector=f"mmdet:{DETR_CFG}", image_size=64, **base), str(tmp_path))
    assert scales(mm) == [(128, 128), (128, 128)] == [tuple(s) for s in (detr_cfg().train_pipeline[2]["scale"],
                                                                          detr_cfg().test_pipeline[1]["scale"])]


@pytest.mark.parametrize("optimizer", [dict(type="AdamW", lr=5e-3, weight_decay=1e-2, foreach=True),
                                       dict(type="SGD", lr=5e-2, momentum=0.9, weight_decay=1e-3, foreach=True)])
def test_deformable_detr_merged_optimizer_groups_update_as_mmengines_own(optimizer):
    """The tiny DETR's paramwise_cfg (sampling offsets and reference points at 0.1x lr): mmengine
    gives every parameter a group; the merged groups (a few) make the same updates, parameter
    by parameter, over steps with random gradients (the slow twin: mmengine's constructor)."""
    import copy

    from mmengine.optim import DefaultOptimWrapperConstructor

    from paploss.integrations.mmdet_train import GroupedOptimWrapperConstructor, merge_param_groups

    torch.manual_seed(0)
    cfg = detr_cfg()
    model = MODELS.build(cfg.model)
    model.init_weights()
    twin = copy.deepcopy(model)
    wrapper_cfg = dict(type="OptimWrapper", optimizer=optimizer)
    paramwise = cfg.optim_wrapper.paramwise_cfg.to_dict()
    ours = GroupedOptimWrapperConstructor(copy.deepcopy(wrapper_cfg), copy.deepcopy(paramwise))(model)
    theirs = DefaultOptimWrapperConstructor(copy.deepcopy(wrapper_cfg), copy.deepcopy(paramwise))(twin)
    n_params = len(list(model.parameters()))
    assert len(theirs.optimizer.param_groups) == n_params > 100
    assert len(ours.optimizer.param_groups) == 2  # the 0.1x lr group and the rest
    assert sum(len(g["params"]) for g in ours.optimizer.param_groups) == n_params
    lr = {id(p): g["lr"] for g in ours.optimizer.param_groups for p in g["params"]}
    assert {v for k, v in lr.items()} == {optimizer["lr"], optimizer["lr"] * 0.1}
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert lr[id(p)] == optimizer["lr"] * (0.1 if "sampling_offsets" in name or "reference_points" in name else 1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    groups = [{"params": [1], "lr": 0.1, "betas": (0.9, 0.99)}, {"params": [2], "lr": 0.2, "betas": (0.9, 0.99)},
              {"params": [3], "lr": 0.1, "betas": (0.9, 0.99)}]
    assert merge_param_groups(groups) == [{"params": [1, 3], "lr": 0.1, "betas": (0.9, 0.99)},
                                          {"params": [2], "lr": 0.2, "betas": (0.9, 0.99)}]
    assert groups[0]["params"] == [1]  # the caller's groups are not changed


def test_deformable_detr_two_stage_proposals_get_the_loss_with_one_class(monkeypatch):
    """With ``as_two_stage`` the encoder's proposals are ranked too: every ground truth
    relabelled class 0, every proposal x class entry ranked (``enc_loss_pap``)."""
    gen = torch.Generator().manual_seed(5)
    head = MODELS.build(head_cfg(spec=LossSpec.handcrafted("square"), num_pred_layer=3, as_two_stage=True))
    metas = [dict(img_shape=(128, 128), pad_shape=(128, 128), batch_input_shape=(128, 128))]
    gt, boxes, _perm, _t = _known_matching(gen, 3, 20)
    gt.labels = torch.tensor([4, 2, 3])
    calls = []

    def recording(logits, targets, qualities, spec_, **kw):
        calls.append(targets.detach().clone())
        return pap_loss(logits, targets, qualities, spec_, **kw)

    monkeypatch.setattr(pd, "pap_loss", recording)
    cls = torch.randn(2, 1, 12, 5, generator=gen)
    dec_boxes = torch.rand(2, 1, 12, 4, generator=gen) * 0.5 + 0.25
    enc_cls = torch.randn(1, 20, 5, generator=gen, requires_grad=True)
    losses = head.loss_by_feat(cls, dec_boxes, enc_cls, boxes[None].clone().requires_grad_(), [gt], metas)
    assert set(losses) == {"loss_pap", "d0.loss_pap", "enc_loss_pap"} and len(calls) == 3
    enc_targets = calls[-1].view(20, 5)
    assert enc_targets.numel() == 20 * 5 and int(enc_targets[:, 0].sum()) == 3 and int(enc_targets[:, 1:].sum()) == 0
    assert gt.labels.tolist() == [4, 2, 3]  # the caller's ground truths are not relabelled
    assert torch.autograd.grad(losses["enc_loss_pap"], enc_cls)[0].abs().sum() > 0


@pytest.mark.slow
def test_deformable_detr_mmdet_train_tool_with_custom_imports(shapes_root, tmp_path):
    """The user's path: MMDetection's own tools/train.py; custom_imports loads the head
    and, before it, the deformable attention."""
    import os

    import mmdet

    tool = Path(mmdet.__file__).parent / ".mim" / "tools" / "train.py"
    root = str(shapes_root) + "/"
    ann = root + "annotations/val.json"
    opts = [
        f"train_dataloader.dataset.data_root={root}", f"val_dataloader.dataset.data_root={root}",
        f"test_dataloader.dataset.data_root={root}", f"val_evaluator.ann_file={ann}", f"test_evaluator.ann_file={ann}",
        "train_cfg.max_epochs=1", "train_cfg.val_interval=1", "train_dataloader.batch_size=4",
        "default_hooks.logger.interval=1", "default_hooks.checkpoint.interval=1",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(tool), str(DETR_CFG), "--work-dir", str(tmp_path), "--cfg-options", *opts],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "epoch_1.pth").exists()
    log = "\n".join(p.read_text() for p in tmp_path.rglob("*.log"))
    assert "PAPLossDeformableDETRHead: loss = pap_loss per decoder layer" in log
    assert "loss_pap:" in log and "d0.loss_pap:" in log and "bbox_mAP" in log


def test_deformable_detr_collapse_is_seen_by_the_divergence_stop():
    """A Deformable DETR's total sums a PAP loss per decoder layer (2.0 when both collapse):
    the divergence stop reads the last layer's ``loss_pap``, which is 1.0 then (SPEC §3)."""
    from types import SimpleNamespace

    from paploss.integrations.mmdet_train import Diverged, DivergenceHook

    seen = []
    hook = DivergenceHook(patience=1, on_step=lambda i, v: seen.append(v))
    collapsed = {"loss": torch.tensor(2.0), "loss_pap": torch.tensor(1.0), "d0.loss_pap": torch.tensor(1.0)}
    hook.after_train_iter(SimpleNamespace(iter=0), 0, outputs=collapsed)
    with pytest.raises(Diverged, match="2 iterations"):
        hook.after_train_iter(SimpleNamespace(iter=1), 1, outputs=collapsed)
    hook = DivergenceHook(patience=0, on_step=lambda i, v: seen.append(v))
    hook.after_train_iter(SimpleNamespace(iter=0), 0, outputs={"loss": torch.tensor(1.7), "loss_cls": torch.tensor(1.0)})
    assert seen == [1.0, 1.0, pytest.approx(1.7)] and hook.bad == 0  # a baseline: its total, not a part
