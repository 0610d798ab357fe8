"""Is a proxy trial's reward usable?  AP50 on search-val after the proxy, per loss and seed.

    python -m bench.proxy --data DIR [--backbone FILE] [--preset quick] [--seeds 0 1 2]
                          [--losses focal+l1 linear square sigmoid] [--iterations N] [--out results.json]
                          [--spec NAME=FILE ...]

For each loss and seed, one proxy trial (``TrainConfig.preset(preset)``, warm-started
from ``--backbone``; pre-trained first with ``paploss pretrain`` defaults if the file
does not exist) and, once, "the start": the same model after 1 iteration at a
vanishing learning rate (pre-trained backbone, fresh head).  Prints per loss the mean
and the seed-to-seed standard deviation of AP50 and AP, and the mean trial time.
The reward is usable when every mean is clearly above the start and the std is
small next to the differences between the means.  ``--spec NAME=FILE`` adds a loss
``NAME`` (usable in ``--losses``) from a loss-spec JSON or a search's state file
(``steps.state_uri``: its current mean μ, the loss the search returns).  Results (every trial) go to
``--out`` as JSON, written after each trial so that a long run can be read early.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

LOSSES = {
    "focal+l1": ("focal+l1", None),
    "focal+giou": ("focal+giou", None),
    "linear": ("paploss", "linear"),
    "square": ("paploss", "square"),
    "sigmoid": ("paploss", "sigmoid"),
    "sqrt": ("paploss", "sqrt"),
    "identity": ("paploss", "identity"),
}


def _spec(form):
    from paploss import LossSpec

    if form is None:
        return None
    if form == "identity":
        return LossSpec.from_theta([0.2, 0.2, 0.25, 0.25, 1 / 3, 1 / 3, 0.5, 0.5] * 5 + [0.5])
    return LossSpec.handcrafted(form)


def _spec_file(path: str):
    """A LossSpec from a loss-spec JSON file, or the μ of a search state file."""
    from paploss import LossSpec, storage

    doc = json.loads(storage.read_text(path))
    if "controller" in doc:
        from paploss.search import Controller

        return Controller.from_state_dict(doc["controller"]).spec()
    return LossSpec.from_dict(doc)


def add_trial_args(ap: argparse.ArgumentParser, losses: list[str]) -> None:
    """The options of a run of proxy trials (also :mod:`bench.eval_noise`'s)."""
    ap.add_argument("--data", required=True, help="dataset folder with search_train / search_val splits")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--losses", nargs="+", default=losses, help=f"of {sorted(LOSSES)} and the names given with --spec")
    ap.add_argument("--spec", nargs="*", default=[], metavar="NAME=FILE",
                    help="more losses: a loss-spec JSON or a search state file (its μ)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=None, help="override the preset's iterations")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="more TrainConfig overrides")


def trial_setup(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict, dict]:
    """(the proxy's TrainConfig fields, loss name -> (``loss``, ``spec``)) from
    :func:`add_trial_args`' options; an unknown loss name is a usage error."""
    from paploss.engine import PROXY_PRESETS

    files = dict(s.split("=", 1) for s in args.spec)
    unknown = sorted(set(args.losses) - set(LOSSES) - set(files))
    if unknown:
        ap.error(f"--losses {unknown} are unknown; known: {sorted(LOSSES)} and the --spec names {sorted(files)}")
    losses = {name: ("paploss", _spec_file(files[name])) if name in files else (LOSSES[name][0], _spec(LOSSES[name][1]))
              for name in args.losses}
    preset = dict(PROXY_PRESETS[args.preset])
    preset.update({k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)})
    if args.iterations:
        preset["iterations"], preset["epochs"] = args.iterations, None
    return preset, losses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trial_args(ap, ["focal+l1", "linear", "square", "sigmoid"])
    ap.add_argument("--backbone", default=None, help="warm-start file (default: DATA/../backbone_<detector>.pt)")
    ap.add_argument("--pretrain-iterations", type=int, default=600)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    preset, loss_specs = trial_setup(ap, args)

    from paploss.engine import TrainConfig, pretrain, train

    backbone = args.backbone or str(Path(args.data).parent / f"backbone_{preset['detector']}.pt")
    t0 = time.time()
    if not Path(backbone).exists():
        pretrain(args.data, backbone, ann=preset["train_ann"], detector=preset["detector"],
                 iterations=args.pretrain_iterations, image_size=preset["image_size"], num_threads=preset.get("num_threads"))
    report: dict = {"preset": args.preset, "config": preset, "backbone": backbone,
                    "pretrain_seconds": time.time() - t0, "trials": []}

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))

    start = train(TrainConfig(data=args.data, init=backbone, **{**preset, "iterations": 1, "epochs": None,
                                                                "lr": 1e-12}), progress=False)
    report["start"] = start.metrics
    print(f"start (pre-trained backbone, fresh head): AP50 {start.metrics['AP50']:.3f} AP {start.metrics['AP']:.3f}",
          flush=True)
    save()
    for seed in args.seeds:
        for name in args.losses:
            loss, spec = loss_specs[name]
            r = train(TrainConfig(data=args.data, init=backbone, loss=loss, spec=spec, seed=seed, **preset),
                      progress=False)
            report["trials"].append({"loss": name, "seed": seed, "metrics": r.metrics, "seconds": r.seconds,
                                     "diverged": r.diverged, "final_loss": r.losses[-1]})
            print(f"{name:10s} seed {seed}: AP50 {r.metrics['AP50']:.3f} AP {r.metrics['AP']:.3f} "
                  f"({r.seconds:.0f} s{', diverged' if r.diverged else ''})", flush=True)
            save()
    print("\n| loss | AP50 mean | AP50 std (seeds) | AP mean | AP std | s / trial |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name in args.losses:
        rs = [t for t in report["trials"] if t["loss"] == name]
        a50 = [t["metrics"]["AP50"] for t in rs]
        a = [t["metrics"]["AP"] for t in rs]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
        summary[name] = {"AP50_mean": statistics.mean(a50), "AP50_std": sd(a50), "AP_mean": statistics.mean(a),
                         "AP_std": sd(a), "seconds": statistics.mean(t["seconds"] for t in rs)}
        s = summary[name]
        print(f"| {name} | {s['AP50_mean']:.3f} | {s['AP50_std']:.3f} | {s['AP_mean']:.3f} | {s['AP_std']:.3f} | "
              f"{s['seconds']:.0f} |")
    print(f"| start | {start.metrics['AP50']:.3f} | | {start.metrics['AP']:.3f} | | |")
    report["summary"] = summary
    save()
    return report


if __name__ == "__main__":
    main()
