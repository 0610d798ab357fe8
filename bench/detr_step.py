"""Benchmark: a Deformable DETR training step with the PAP loss vs MMDetection's losses.

All detectors come from ``paploss/configs/mmdet/paploss_deformable_detr_tiny_shapes.py`` (``deformable_detr_tiny``)
(the same layers and initial weights; only ``model.bbox_head``'s loss differs, switched
by :func:`paploss.integrations.mmdet_detr.switch_head`, as ``paploss train`` does)
and train on the same batch of the bundled ``shapes`` dataset, interleaved step by
step so that machine load hits them alike. Prints the median seconds of a full step
(forward, loss, backward, AdamW step) and of the head's ``loss_by_feat`` alone (Hungarian
matching of every decoder layer + the loss), and the ratios to each baseline::

    .venv/bin/python -m bench.detr_step --steps 20 --batch 8

Baselines: ``focal+giou`` is MMDetection's Deformable DETR loss (Focal 2 + L1 5 +
GIoU 2), ``focal+l1`` the same without the GIoU term.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click

from paploss.spec_set import mmdet_config

CONFIG = mmdet_config("deformable_detr_tiny")  # the config the installed package ships
LOSSES = ("paploss", "focal+giou", "focal+l1")


def _models(data_root: str, batch: int, seed: int, form: str):
    import torch
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    from paploss import LossSpec
    from paploss.integrations import mmdet_detr
    from mmdet.registry import DATASETS, MODELS

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(CONFIG))
    cfg.train_dataloader.dataset.data_root = data_root
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    data = pseudo_collate([dataset[i % len(dataset)] for i in range(batch)])
    models = {}
    for loss in LOSSES:
        run = SimpleNamespace(loss=loss, spec=LossSpec.handcrafted(form), top_k=100_000, quality="giou", detach_i3=False)
        model_cfg = cfg.model.deepcopy()
        model_cfg.bbox_head = mmdet_detr.switch_head(model_cfg.bbox_head.to_dict(), run)
        torch.manual_seed(seed)
        model = MODELS.build(model_cfg)
        model.init_weights()
        models[loss] = model
    return models, data


def _timed_loss(head, sink: list):
    """Wrap ``head.loss_by_feat`` so that each call's seconds go to ``sink``."""
    inner = head.loss_by_feat

    def loss_by_feat(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        sink.append(time.perf_counter() - t0)
        return out

    head.loss_by_feat = loss_by_feat


def _step(model, data, optimizer) -> float:
    t0 = time.perf_counter()
    losses = model(**model.data_preprocessor(data, True), mode="loss")
    loss = sum(v for k, v in losses.items() if "loss" in k)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


@click.command()
@click.option("--steps", default=20, show_default=True, help="Timed steps per detector (after 2 warm-up steps).")
@click.option("--batch", default=8, show_default=True, help="Images per step (128x128 shapes).")
@click.option("--threads", default=1, show_default=True, help="torch CPU threads (1: steadier on a shared machine).")
@click.option("--form", default="square", show_default=True, help="PAP loss form timed (the cost does not depend on θ).")
@click.option("--seed", default=0, show_default=True)
def main(steps: int, batch: int, threads: int, form: str, seed: int) -> None:
    """Time a training step of the tiny shapes Deformable DETR with the PAP loss and the baselines."""
    import torch

    from paploss.data import make_dataset

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset("shapes", Path(tmp, "shapes"), n_train=max(batch, 8), n_val=4, image_size=128, seed=seed,
                            progress=False)
        models, data = _models(str(root) + "/", batch, seed, form)
        optims = {k: torch.optim.AdamW(m.parameters(), lr=2e-4, weight_decay=1e-4) for k, m in models.items()}
        times = {k: [] for k in models}
        loss_times = {k: [] for k in models}
        for name, model in models.items():
            model.train()
            _timed_loss(model.bbox_head, loss_times[name])
        for i in range(steps + 2):
            for name, model in models.items():
                t = _step(model, data, optims[name])
                if i >= 2:
                    times[name].append(t)
                else:
                    loss_times[name].clear()
    med = {k: statistics.median(v) for k, v in times.items()}
    med_loss = {k: statistics.median(v) for k, v in loss_times.items()}
    print(f"Deformable DETR tiny (2+2 layers, 40 queries, 5 classes), batch {batch} x 128x128, {steps} steps each, "
          f"{threads} thread(s), torch {torch.__version__}")
    for name in models:
        print(f"{name:10s} step {med[name] * 1e3:8.1f} ms   loss_by_feat {med_loss[name] * 1e3:7.1f} ms")
    for base in LOSSES[1:]:
        print(f"ratio paploss / {base}: step {med['paploss'] / med[base]:.3f}x, "
              f"loss_by_feat {med_loss['paploss'] / med_loss[base]:.2f}x")


if __name__ == "__main__":
    main()
