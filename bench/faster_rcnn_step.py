"""Seconds per training iteration of Faster R-CNN on CPU: focal+l1 (torchvision's CE + smooth L1) vs paploss.

    python -m bench.faster_rcnn_step [--size 128] [--batch 8] [--iters 8] [--threads 1]
                                     [--detector faster_rcnn_mobilenet_v3]

Three models train side by side on the same batches of the bundled ``shapes`` data
(iterations alternate between them, so the load of a shared machine hits all alike):

- ``focal+l1``: the baseline as built by default (RPN: 256 sampled anchors per image;
  RoI head: ``box_batch_size_per_image`` = 128 proposals per image sampled from the
  RPN's training proposals, :func:`~paploss.models.faster_rcnn.training_proposals`
  = 128 at 128 px, plus the gt boxes);
- ``focal+l1 all RoIs``: the same losses with the RoI sampler replaced by
  :class:`~paploss.models.two_stage_targets.KeepAll`, so the box head runs on every
  proposal as the PAP loss's does;
- ``paploss`` (square, both heads): every anchor and every proposal × class ranked.

``paploss / focal+l1`` is the whole cost of the method on a step; ``paploss / focal+l1
all RoIs`` the cost of the loss itself (the same RoIs through the same layers).
Each number is the median over ``--iters`` timed iterations after two warm-up ones;
"paired" is the median over iterations of the ratio within one iteration (the models
run back to back on the same batch, so a load change between iterations cancels).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--detector", default="faster_rcnn_mobilenet_v3")
    ap.add_argument("--fpn-channels", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from paploss import LossSpec
    from paploss.data import load_coco, make_dataset
    from paploss.data.dataset import CocoDetection
    from paploss.models import build_detector
    from paploss.models.two_stage_targets import KeepAll

    variants = {  # name: (loss, spec, keep every proposal in the RoI head's loss)
        "focal+l1": ("focal+l1", None, False),
        "focal+l1 all RoIs": ("focal+l1", None, True),
        "paploss": ("paploss", LossSpec.handcrafted("square"), False),  # KeepAll by construction
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset("shapes", f"{tmp}/shapes", n_train=args.batch * 3, n_val=1, image_size=args.size,
                            progress=False)
        ds = CocoDetection(load_coco(root / "annotations" / "train.json"), root / "images")
        models, opts = {}, {}
        for name, (loss, spec, keep_all) in variants.items():
            torch.manual_seed(0)
            m = build_detector(args.detector, ds.num_classes, loss=loss, spec=spec, image_size=args.size,
                               fpn_channels=args.fpn_channels, anchor_size=16.0 * args.size / 128, head_norm=True)
            if keep_all:
                m.roi_heads.fg_bg_sampler = KeepAll()
            m.train()
            models[name], opts[name] = m, torch.optim.SGD(m.parameters(), lr=0.001, momentum=0.9)
        times: dict[str, list[float]] = {k: [] for k in models}
        for it in range(args.iters + 2):
            batch = [ds.get((it * args.batch + j) % len(ds)) for j in range(args.batch)]
            images = [b[0] for b in batch]
            targets = [{"boxes": b[1]["boxes"], "labels": b[1]["labels"]} for b in batch]
            for name, m in models.items():
                t0 = time.perf_counter()
                total = sum(m(images, targets).values())
                opts[name].zero_grad()
                total.backward()
                opts[name].step()
                if it > 1:
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(a / b for a, b in zip(v, times["focal+l1"])) for k, v in times.items()}
    rpn, roi = models["paploss"].rpn, models["paploss"].roi_heads
    print(f"{args.detector}, {args.size} px, batch {args.batch}, {args.threads} thread(s), median of {args.iters}; "
          f"training proposals per image {rpn._post_nms_top_n['training']}, RoI sampler batch "
          f"{models['focal+l1'].roi_heads.fg_bg_sampler.batch_size_per_image}; last paploss step ranked "
          f"{roi.ranked['ranked']} RoI entries:")
    print("| model | s/iter | ratio to focal+l1 | paired ratio |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['focal+l1']:.3f} | {paired[k]:.3f} |")
    print(f"paploss / focal+l1 all RoIs (the loss itself): {med['paploss'] / med['focal+l1 all RoIs']:.3f}")
    return {"median": med, "paired": paired}


if __name__ == "__main__":
    main()
