"""Detectors and the PAP loss wiring: targets/qualities against a slow twin, the
gradient scale on the box branch, the loss switch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder

from paploss import LossSpec
from paploss.models import DETECTORS, build_detector
from paploss.models.targets import box_quality, dense_targets

CODER = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


def _giou_scalar(a, b) -> float:
    ix0, iy0, ix1, iy1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix1 - ix0) * max(0.0, iy1 - iy0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _boxes(g: torch.Generator, n: int) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 30 + 2
    return torch.cat([xy, xy + wh], dim=1).double()


def slow_targets(cls_logits, reg, anchors, matched, targets, kind):
    """Entry by entry, the definition of t and u (SPEC §1)."""
    N, A, K = cls_logits.shape
    t = [[[0.0] * K for _ in range(A)] for _ in range(N)]
    u = [[[torch.zeros((), dtype=reg.dtype)] * K for _ in range(A)] for _ in range(N)]
    for n in range(N):
        for a in range(A):
            m = int(matched[n][a])
            if m == -2:
                t[n][a] = [-1.0] * K
            elif m >= 0:
                k = int(targets[n]["labels"][m])
                t[n][a][k] = 1.0
                pred = CODER.decode_single(reg[n, a][None], anchors[n][a][None])[0]
                gt = targets[n]["boxes"][m]
                if kind == "giou":
                    ix0, iy0 = torch.max(pred[0], gt[0]), torch.max(pred[1], gt[1])
                    ix1, iy1 = torch.min(pred[2], gt[2]), torch.min(pred[3], gt[3])
                    inter = (ix1 - ix0).clamp(min=0) * (iy1 - iy0).clamp(min=0)
                    union = (pred[2] - pred[0]) * (pred[3] - pred[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1]) - inter
                    hull = (torch.max(pred[2], gt[2]) - torch.min(pred[0], gt[0])) * (
                        torch.max(pred[3], gt[3]) - torch.min(pred[1], gt[1]))
                    u[n][a][k] = ((inter / union - (hull - union) / hull) + 1) / 2
                else:
                    target_deltas = CODER.encode_single(gt[None], anchors[n][a][None])[0]
                    u[n][a][k] = (1 - (reg[n, a] - target_deltas).abs().mean()).clamp(0, 1)
    return torch.tensor(t, dtype=cls_logits.dtype), torch.stack([torch.stack(r) for row in u for r in row]).reshape(N, A, K)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), N=st.integers(1, 3), A=st.integers(1, 7), K=st.integers(1, 4),
       kind=st.sampled_from(["giou", "l1"]))
def test_dense_targets_match_slow_twin_in_value_and_gradient(seed, N, A, K, kind):
    g = torch.Generator().manual_seed(seed)
    cls_logits = torch.randn(N, A, K, generator=g, dtype=torch.float64)
    anchors = [_boxes(g, A) for _ in range(N)]
    targets, matched = [], []
    for _ in range(N):
        G = int(torch.randint(0, 4, (1,), generator=g))
        targets.append({"boxes": _boxes(g, G), "labels": torch.randint(0, K, (G,), generator=g)})
        matched.append(torch.randint(-2, G, (A,), generator=g))
    reg = (torch.randn(N, A, 4, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    t, u = dense_targets(cls_logits, reg, anchors, matched, targets, CODER, kind)
    t_ref, u_ref = slow_targets(cls_logits, reg, anchors, matched, targets, kind)
    assert torch.equal(t, t_ref)
    assert torch.allclose(u.double(), u_ref, atol=1e-6)
    w = torch.randn(N, A, K, generator=g, dtype=torch.float64)
    grad = torch.autograd.grad((u.double() * w).sum(), reg, allow_unused=True)[0] if u.requires_grad else None
    if u_ref.requires_grad:
        (grad_ref,) = torch.autograd.grad((u_ref * w).sum(), reg, allow_unused=True)
    else:
        grad_ref = None
    zero = torch.zeros_like(reg)
    torch.testing.assert_close(grad if grad is not None else zero, grad_ref if grad_ref is not None else zero,
                               atol=1e-5, rtol=1e-4)


def test_box_quality_giou_and_iou_values():
    g = torch.Generator().manual_seed(0)
    a, b = _boxes(g, 20), _boxes(g, 20)
    q = box_quality(a, b, "giou")
    ref = torch.tensor([(_giou_scalar(x.tolist(), y.tolist()) + 1) / 2 for x, y in zip(a, b)], dtype=q.dtype)
    torch.testing.assert_close(q, ref)
    assert torch.allclose(box_quality(a, a, "giou"), torch.ones(20, dtype=q.dtype))
    assert torch.allclose(box_quality(a, a, "iou"), torch.ones(20, dtype=q.dtype))
    with pytest.raises(ValueError, match="unknown quality 'dice'"):
        box_quality(a, b, "dice")


def _batch(size=64, n=2):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[8.0, 10.0, 30.0, 40.0], [30.0, 5.0, 60.0, 25.0]]), "labels": torch.tensor([0, 2])}
               for _ in range(n)]
    return images, targets


def _small(loss, spec=None, **kw):
    torch.manual_seed(0)
    return build_detector("retinanet_mobilenet_v3_small", 3, loss=loss, spec=spec, image_size=64, fpn_channels=16,
                          anchor_size=8.0, **kw)


def test_gradient_scale_multiplies_only_the_box_branch_gradient():
    images, targets = _batch()
    grads = {}
    for g in (1.0, 3.0):
        model = _small("paploss", LossSpec("linear", grad_scale=g))
        model.train()
        loss = sum(model(images, targets).values())
        loss.backward()
        grads[g] = (model.head.regression_head.bbox_reg.weight.grad.clone(),
                    model.head.classification_head.cls_logits.weight.grad.clone(),
                    float(loss.detach()))
    assert grads[1.0][2] == grads[3.0][2]  # the forward pass is unchanged
    assert grads[1.0][0].abs().sum() > 0
    torch.testing.assert_close(grads[3.0][0], 3.0 * grads[1.0][0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[3.0][1], grads[1.0][1])


@pytest.mark.parametrize("loss, spec, keys", [
    ("focal+l1", None, {"classification", "bbox_regression"}),
    ("focal+giou", None, {"classification", "bbox_regression"}),
    ("paploss", LossSpec.handcrafted("square"), {"paploss"}),
    ("paploss", LossSpec.from_theta([0.2, 0.2, 0.25, 0.25, 1 / 3, 1 / 3, 0.5, 0.5] * 5 + [0.5]), {"paploss"}),
])
def test_each_loss_trains_both_branches(loss, spec, keys):
    model = _small(loss, spec)
    model.train()
    losses = model(*_batch())
    assert set(losses) == keys
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.head.regression_head.bbox_reg.weight.grad.abs().sum() > 0
    assert model.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_focal_giou_differs_from_focal_l1():
    a = _small("focal+l1")(*_batch())["bbox_regression"]
    b = _small("focal+giou")(*_batch())["bbox_regression"]
    assert float(a.detach()) != float(b.detach())


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown loss 'ap'; known: \['focal\+l1', 'focal\+giou', 'paploss'\]"):
        _small("ap")
    with pytest.raises(ValueError, match="loss 'paploss' needs a LossSpec"):
        _small("paploss")
    with pytest.raises(ValueError, match="unknown detector 'yolo'"):
        build_detector("yolo", 3)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detectors_build_and_run(name):
    model = build_detector(name, 4, image_size=64, fpn_channels=32, anchor_size=8.0)
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape[1] == 4
