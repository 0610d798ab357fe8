"""Seconds per training iteration on CPU: focal+l1 vs paploss, side by side.

    python -m bench.train_step [--sizes 128 256] [--batch 8] [--iters 6] [--threads 1]

Both losses train the same model (by default the ``quick`` preset's RetinaNet,
MobileNetV3-Small FPN, 64 channels; ``--detector retinanet_mobilenet_v3`` for Large) on the same batches of the bundled ``shapes`` data; iterations alternate
between the two models so that the load of a shared machine hits both alike.  Each
number is the median over ``--iters`` timed iterations after one warm-up iteration.
Prints a markdown table and the ratio paploss / focal+l1 (target: <= 1.10).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--detector", default=None, help="default: the quick preset's detector")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from paploss import LossSpec
    from paploss.data import load_coco, make_dataset
    from paploss.data.dataset import CocoDetection
    from paploss.engine import PROXY_PRESETS

    quick = PROXY_PRESETS["quick"]
    args.detector = args.detector or quick["detector"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            root = make_dataset("shapes", f"{tmp}/s{size}", n_train=args.batch * 2, n_val=1, image_size=size,
                                progress=False)
            ds = CocoDetection(load_coco(root / "annotations" / "train.json"), root / "images")
            models, opts = {}, {}
            from paploss.models import build_detector

            for loss, spec in (("focal+l1", None), ("paploss", LossSpec.handcrafted("square"))):
                torch.manual_seed(0)
                m = build_detector(args.detector, ds.num_classes, loss=loss, spec=spec, image_size=size,
                                   fpn_channels=quick["fpn_channels"], anchor_size=quick["anchor_size"] * size / 128,
                                   head_norm=True)
                m.train()
                models[loss], opts[loss] = m, torch.optim.SGD(m.parameters(), lr=0.001, momentum=0.9)
            times: dict[str, list[float]] = {k: [] for k in models}
            for it in range(args.iters + 1):
                batch = [ds.get((it * args.batch + j) % len(ds)) for j in range(args.batch)]
                images = [b[0] for b in batch]
                targets = [{"boxes": b[1]["boxes"], "labels": b[1]["labels"]} for b in batch]
                for loss, m in models.items():
                    t0 = time.perf_counter()
                    total = sum(m(images, targets).values())
                    opts[loss].zero_grad()
                    total.backward()
                    opts[loss].step()
                    if it > 0:
                        times[loss].append(time.perf_counter() - t0)
            f, p = statistics.median(times["focal+l1"]), statistics.median(times["paploss"])
            rows.append({"size": size, "batch": args.batch, "focal+l1": f, "paploss": p, "ratio": p / f})
    print(f"| image size | batch | focal+l1 s/iter | paploss (square) s/iter | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['batch']} | {r['focal+l1']:.3f} | {r['paploss']:.3f} | {r['ratio']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
