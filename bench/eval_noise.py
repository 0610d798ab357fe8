"""Is the search's reward computed on too few images?  How much of a proxy reward's
noise comes from which search-val images it is measured on, and how much from
the training run.

    python -m bench.eval_noise --data DIR --backbone FILE [--iterations 400] [--set FIELD=JSON ...]
                               --losses searched square [--spec NAME=FILE ...] [--seeds 0 1 2]
                               [--boot 200] [--out results.json]

For each loss and seed, one proxy trial as in :mod:`bench.proxy` (same options, same
losses and ``--spec`` files), checkpointed; its detections on search-val are kept.
Then a bootstrap over the search-val *images*: ``--boot`` times, draw as many images
as search-val holds, with replacement, and score every model on that same draw.
Per model that gives the standard error of its AP from image sampling alone; per
seed and pair of losses, the standard error of the paired gap (both models scored
on the same draw, as the losses of one search round are).  Set against the
seed-to-seed spread of the same gap, it says whether more search-val images would
make the reward better at telling losses apart: the image part of a gap's noise
shrinks as 1 / sqrt(images), the training part does not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.proxy import add_trial_args, trial_setup

__all__ = ["resample", "bootstrap", "main"]


def _by_image(items: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for x in items:
        out.setdefault(x["image_id"], []).append(x)
    return out


def resample(gt: dict, detections: dict[str, list[dict]], draw) -> tuple[dict, dict[str, list[dict]]]:
    """The ground truth and each model's detections on a draw of images (indices
    into ``gt["images"]``, repeats allowed): the k-th drawn image becomes image
    ``k + 1``, with copies of its annotations and detections."""
    return _resample(gt, _by_image(gt["annotations"]), {name: _by_image(d) for name, d in detections.items()}, draw)


def _resample(gt: dict, anns_of: dict[int, list[dict]], dets_of: dict[str, dict[int, list[dict]]], draw):
    """:func:`resample` with the annotations and detections already grouped by image."""
    images, anns = [], []
    out: dict[str, list[dict]] = {name: [] for name in dets_of}
    for k, i in enumerate(draw):
        im = gt["images"][int(i)]
        images.append({**im, "id": k + 1})
        for a in anns_of.get(im["id"], []):
            anns.append({**a, "id": len(anns) + 1, "image_id": k + 1})
        for name, by_image in dets_of.items():
            out[name] += [{**d, "image_id": k + 1} for d in by_image.get(im["id"], [])]
    return {**gt, "images": images, "annotations": anns}, out


def bootstrap(gt: dict, detections: dict[str, list[dict]], n: int, seed: int = 0, metric: str = "AP") -> dict[str, list[float]]:
    """``metric`` of every model (``detections``: name -> COCO results on ``gt``'s
    images) on ``n`` bootstrap draws of the images; the same draws for all models."""
    from paploss.evaluate import coco_ap

    rng = np.random.default_rng(seed)
    m = len(gt["images"])
    anns_of, dets_of = _by_image(gt["annotations"]), {name: _by_image(d) for name, d in detections.items()}
    out: dict[str, list[float]] = {name: [] for name in detections}
    for _ in range(n):
        g, dets = _resample(gt, anns_of, dets_of, rng.integers(0, m, size=m))
        for name, d in dets.items():
            out[name].append(coco_ap(g, d)[metric])
    return out


def _sd(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else float("nan")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trial_args(ap, ["square", "linear"])
    ap.add_argument("--backbone", required=True, help="warm-start file (the benchmark's pretrain/<key>/backbone.pt)")
    ap.add_argument("--boot", type=int, default=200, help="bootstrap draws of the search-val images")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if len(args.losses) < 2:
        ap.error("--losses: give at least two, their paired gaps are the point")
    preset, loss_specs = trial_setup(ap, args)

    from paploss.data.dataset import CocoDetection
    from paploss.engine import TrainConfig, load_checkpoint, load_split, train
    from paploss.evaluate import coco_ap, model_detections

    root = Path(args.data)
    gt = load_split(root, preset["val_ann"])
    val = CocoDetection(gt, root / "images")
    report: dict = {"config": preset, "backbone": args.backbone, "images": len(gt["images"]), "boot": args.boot,
                    "trials": [], "seeds": {}}

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))

    for seed in args.seeds:
        dets: dict[str, list[dict]] = {}
        ap: dict[str, float] = {}  # each model's AP on the whole search-val
        for name in args.losses:
            loss, spec = loss_specs[name]
            with tempfile.TemporaryDirectory(prefix="paploss-eval-noise-") as tmp:
                r = train(TrainConfig(data=str(root), init=args.backbone, loss=loss, spec=spec, seed=seed,
                                      out_dir=tmp, **preset), progress=False)
                model = load_checkpoint(r.checkpoint)[0]
            dets[name] = model_detections(model, val)
            full = coco_ap(gt, dets[name])
            ap[name] = full["AP"]
            report["trials"].append({"loss": name, "seed": seed, "metrics": r.metrics, "rescored": full,
                                     "seconds": r.seconds})
            print(f"{name:10s} seed {seed}: AP {full['AP']:.4f} (training's own evaluation {r.metrics['AP']:.4f}, "
                  f"{r.seconds:.0f} s)", flush=True)
            save()
        t0 = time.time()
        boot = bootstrap(gt, dets, args.boot, seed=seed)
        report["seeds"][str(seed)] = {
            "AP": ap,
            "boot_se": {name: _sd(v) for name, v in boot.items()},
            "gaps": {f"{a} - {b}": {"gap": ap[a] - ap[b],
                                    "boot_se": _sd([x - y for x, y in zip(boot[a], boot[b])])}
                     for a, b in itertools.combinations(args.losses, 2)},
            "boot_seconds": time.time() - t0,
        }
        print(json.dumps(report["seeds"][str(seed)], indent=1), flush=True)
        save()

    summary = {}
    for pair in next(iter(report["seeds"].values()))["gaps"]:
        gaps = [s["gaps"][pair]["gap"] for s in report["seeds"].values()]
        ses = [s["gaps"][pair]["boot_se"] for s in report["seeds"].values()]
        summary[pair] = {"gaps": gaps, "seed_sd": _sd(gaps), "image_se_rms": float(np.sqrt(np.mean(np.square(ses))))}
    report["summary"] = summary
    print("\n| pair | gap per seed (AP x 100) | SD over seeds | image-sampling SE (rms over seeds) |")
    print("|---|---|---|---|")
    for pair, s in summary.items():
        print(f"| {pair} | {', '.join(f'{100 * g:+.2f}' for g in s['gaps'])} | {100 * s['seed_sd']:.2f} | "
              f"{100 * s['image_se_rms']:.2f} |")
    save()
    return report


if __name__ == "__main__":
    main()
