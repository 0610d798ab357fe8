"""Mixed precision: bfloat16 autocast on CUDA with the PAP loss in float32; CPU unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from paploss.engine import amp_enabled
from paploss.models.retinanet import build_retinanet
from paploss.spec import LossSpec


def test_amp_only_on_a_cuda_device_with_bfloat16():
    assert not amp_enabled(True, torch.device("cpu"))
    assert not amp_enabled(False, torch.device("cpu"))
    if torch.cuda.is_available():
        assert amp_enabled(True, torch.device("cuda")) == torch.cuda.is_bf16_supported()
        assert not amp_enabled(False, torch.device("cuda"))


def _captured_loss_inputs(device: str):
    """A tiny RetinaNet with the PAP loss, one training forward; the arguments its head's
    ``compute_loss`` was called with, and the model."""
    torch.manual_seed(0)
    # a searched spec whose I1 and I3 differ: the loss depends on the box qualities u
    spec = LossSpec.from_theta(torch.rand(41, generator=torch.Generator().manual_seed(11)).tolist())
    model = build_retinanet(3, backbone="mobilenet_v3_small", loss="paploss", spec=spec,
                            image_size=64, fpn_channels=16, anchor_size=8.0, top_k=500).to(device)
    images = [torch.rand(3, 64, 64, device=device) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 20.0, 60.0, 50.0]], device=device),
                "labels": torch.tensor([0, 2], device=device)}] * 2
    seen = {}
    real = model.head.compute_loss

    def capture(*args):
        seen["args"] = args
        return real(*args)

    model.head.compute_loss = capture
    model.train()
    model(images, targets)
    model.head.compute_loss = real
    return model, seen["args"]


def _loss_in_bf16_autocast(device: str):
    model, (targets, outputs, anchors, matched) = _captured_loss_inputs(device)
    low = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in outputs.items()}
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = model.head.compute_loss(targets, low, anchors, matched)["paploss"]
    # the twin: the same bfloat16 numbers as float32, no autocast anywhere
    high = {k: v.detach().float().requires_grad_() for k, v in low.items()}
    ref = model.head.compute_loss(targets, high, anchors, matched)["paploss"]
    return loss, ref, low, high


def test_pap_loss_runs_in_float32_outside_autocast_on_cpu():
    """Under (CPU) bfloat16 autocast the head computes the loss from float32 copies of its
    outputs with autocast off: the same value and gradients as without autocast."""
    loss, ref, low, high = _loss_in_bf16_autocast("cpu")
    assert loss.dtype == torch.float32 and torch.equal(loss.detach(), ref.detach())
    loss.backward()
    ref.backward()
    for k in low:
        assert low[k].grad.dtype == torch.bfloat16
        assert torch.equal(low[k].grad, high[k].grad.to(torch.bfloat16)), k


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
                    reason="needs a CUDA GPU with bfloat16")
def test_pap_loss_runs_in_float32_under_cuda_autocast():
    loss, ref, _low, _high = _loss_in_bf16_autocast("cuda")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
                    reason="needs a CUDA GPU with bfloat16")
def test_engine_trains_in_bf16_on_cuda_close_to_float32(tmp_path):
    from paploss.data import make_dataset, search_split
    from paploss.engine import TrainConfig, train

    root = make_dataset("shapes", tmp_path / "shapes", n_train=16, n_val=4, image_size=64, progress=False)
    search_split(root)
    base = dict(data=str(root), train_ann="search_train", val_ann="search_val", loss="paploss",
                spec={"form": "square"}, image_size=64, fpn_channels=16, anchor_size=8.0, batch_size=4, iterations=5,
                warmup_iters=0, device="cuda", max_val_images=4)
    bf16 = train(TrainConfig(**base, amp=True), progress=False)
    fp32 = train(TrainConfig(**base, amp=False), progress=False)
    assert not bf16.diverged and all(math.isfinite(x) for x in bf16.losses)
    # the first step starts from the same weights: bfloat16 activations move the loss only a little
    assert abs(bf16.losses[0] - fp32.losses[0]) < 0.02, (bf16.losses, fp32.losses)
