"""Benchmark: an MMDetection training step with PAPLossRetinaHead vs RetinaHead (Focal + L1).

Both detectors come from ``configs/mmdet/paploss_retinanet_tiny_shapes.py`` (same
layers and weights, only the loss differs) and train on the same batch of the
bundled ``shapes`` dataset, interleaved step by step so that machine load hits both
alike. Prints the median seconds of a full step (forward, loss, backward, SGD) and
of the head's loss alone (``loss_by_feat`` + backward), and their ratios::

    python -m bench.mmdet_step --steps 10 --batch 8
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mmdet" / "paploss_retinanet_tiny_shapes.py"


def _models(data_root: str, batch: int, seed: int):
    import torch
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    import paploss.integrations.mmdet  # noqa: F401
    from mmdet.registry import DATASETS, MODELS

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(CONFIG))
    cfg.train_dataloader.dataset.data_root = data_root
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    data = pseudo_collate([dataset[i % len(dataset)] for i in range(batch)])
    focal = cfg.model.deepcopy()
    head = focal.bbox_head.to_dict()
    for key in ("spec", "top_k", "quality"):
        head.pop(key)
    head.update(type="RetinaHead", loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0))
    focal.bbox_head = head
    models = {}
    for name, model_cfg in (("paploss", cfg.model), ("focal+l1", focal)):
        torch.manual_seed(seed)
        model = MODELS.build(model_cfg)
        model.init_weights()
        models[name] = model
    return models, data


def _step(model, data, optimizer) -> tuple[float, float]:
    import torch

    t0 = time.perf_counter()
    batch = model.data_preprocessor(data, True)
    feats = model.extract_feat(batch["inputs"])
    outs = model.bbox_head(feats)
    t1 = time.perf_counter()
    from mmdet.models.utils import unpack_gt_instances

    gt, ignore, metas = unpack_gt_instances(batch["data_samples"])
    losses = model.bbox_head.loss_by_feat(*outs, gt, metas, ignore)
    loss = sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v) for v in losses.values())
    t2 = time.perf_counter()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    t3 = time.perf_counter()
    return t3 - t0, (t2 - t1)


@click.command()
@click.option("--steps", default=10, show_default=True, help="Timed steps per detector (after 2 warm-up steps).")
@click.option("--batch", default=8, show_default=True, help="Images per step (128x128 shapes).")
@click.option("--threads", default=1, show_default=True, help="torch CPU threads (1: steadier on a shared machine).")
@click.option("--seed", default=0, show_default=True)
def main(steps: int, batch: int, threads: int, seed: int) -> None:
    """Time a training step of the tiny shapes RetinaNet with the PAP loss and with Focal + L1."""
    import torch

    from paploss.data import make_dataset

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset("shapes", Path(tmp, "shapes"), n_train=max(batch, 8), n_val=4, image_size=128, seed=seed,
                            progress=False)
        models, data = _models(str(root) + "/", batch, seed)
        optims = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
        times = {k: [] for k in models}
        loss_times = {k: [] for k in models}
        for i in range(steps + 2):
            for name, model in models.items():
                total, loss_t = _step(model, data, optims[name])
                if i >= 2:
                    times[name].append(total)
                    loss_times[name].append(loss_t)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_loss = {k: statistics.median(v) for k, v in loss_times.items()}
    print(f"batch {batch} x 128x128, {steps} steps each, {threads} thread(s), torch {torch.__version__}")
    for name in models:
        print(f"{name:9s} step {med[name] * 1e3:8.1f} ms   loss forward {med_loss[name] * 1e3:7.1f} ms")
    print(f"ratio paploss / focal+l1: step {med['paploss'] / med['focal+l1']:.2f}x, "
          f"loss forward {med_loss['paploss'] / med_loss['focal+l1']:.2f}x")


if __name__ == "__main__":
    main()
