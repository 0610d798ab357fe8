"""Table 1 and Figure 1 on ``shapes``: each detector with its focal/CE baseline and the PAP loss with and without a blocked gradient, and a short search per detector.

The seed's Table 1 trains RetinaNet, Faster R-CNN and Deformable DETR with the
Parameterized AP Loss with and without "blocking the gradient of the denominator", and
its Figure 1 shows that each detector's search finds a different loss. Here, per
detector of :data:`DETECTORS`, on the bundled ``shapes`` (train, scored on val):

* ``focal+giou``: the detector's own focal/CE classification loss and GIoU box loss
  (RetinaNet: focal; Faster R-CNN: cross-entropy in the RPN and the RoI head; DETR:
  MMDetection's focal + L1 + GIoU);
* ``pap``: the PAP loss of the handcrafted form :data:`PAP_FORM` (SPEC §1), whose
  denominator H1 is always detached (``paploss.loss``: the loss has no switch for the
  paper's "unblocked" row; SPEC §1 records that it collapses to about 1 AP);
* ``pap+detach_i3``: the same loss with the one gradient block the loss does expose,
  ``detach_i3`` (no gradient into the box quality ``u_i`` through ``I3(u_i)``, not SPEC
  §1) -- the Table 1 analogue of "with / without a blocked gradient";
* ``searched``: the loss a short search on search-train / search-val found (one spec per
  head for Faster R-CNN: RPN and RoI head, 82 numbers), trained as the others.

The CNNs train with :data:`CNN_SEEDS` seeds from one warm start each
(``steps.pretrain``), Deformable DETR with one seed (it converges slowly on a CPU; the
table says so) from the MMDetection config's own initialisation. A row counts only when
its ``focal+giou`` baseline reaches :data:`AP_FLOOR` AP on val; below it every cell of
the row reads "not converged" (the numbers stay in the JSON).

Every training's result is cached in ``--work`` (``table1/<detector>/<row>-s<seed>.json``)
so that a stopped run resumes. Writes ``table1.json``, ``table1.md`` and
``figure1.png`` (the searched functions, a column per detector and head) to ``--out``.

    .venv/bin/python -m bench.table1 --preset medium --work runs/table1-medium --out runs/table1   # make bench-table1
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import click

DETECTORS = ("retinanet_mobilenet_v3", "faster_rcnn_mobilenet_v3", "deformable_detr_tiny")
ROWS = ("focal+giou", "pap", "pap+detach_i3", "searched")
BASELINE = "focal+giou"
PAP_FORM = "square"
AP_FLOOR = 5.0  # AP x 100 on val that a detector's focal/CE baseline must reach for its row to count
NOT_CONVERGED = "not converged"
CNN_SEEDS = (0, 1, 2)
DETR_SEEDS = (0,)
MMDET = ("deformable_detr_tiny",)
PRETRAIN_THREADS = 2  # the warm start's threads (the demo's); in its cache key, so not --jobs


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each part trains: data, warm start, trainings, the search."""

    n_train: int
    n_val: int
    image_size: int
    pretrain_iterations: int
    cnn_iterations: int
    detr_iterations: int
    rounds: int
    samples: int
    proxy_iterations: int
    cnn_seeds: tuple[int, ...] = CNN_SEEDS
    detr_seeds: tuple[int, ...] = DETR_SEEDS
    fpn_channels: int = 32
    pretrain_batch: int = 8  # crops per warm-start step (the demo's warm start: engine.pretrain's 32)
    detectors: tuple[str, ...] = DETECTORS  # what --detectors defaults to


PRESETS = {
    # 96 px, 250 iterations: the first partial run (BENCHMARKS.md); no baseline reached the floor
    "small": Sizes(n_train=200, n_val=50, image_size=96, pretrain_iterations=150, cnn_iterations=250,
                   detr_iterations=200, rounds=2, samples=2, proxy_iterations=40),
    # the `demo` preset's data, detectors (MobileNetV3-Small, FPN 64, 16 px anchors) and schedule (500 / 100
    # images at 128 px, 400-iteration trainings): where RetinaNet's baselines pass the floor on 2 CPU cores
    # (BENCHMARKS.md, "The main job")
    "medium": Sizes(n_train=500, n_val=100, image_size=128, pretrain_iterations=200, cnn_iterations=400,
                    detr_iterations=400, rounds=2, samples=2, proxy_iterations=60, fpn_channels=64, pretrain_batch=32,
                    detectors=("retinanet_mobilenet_v3_small", "faster_rcnn_mobilenet_v3_small",
                               "deformable_detr_tiny")),
    # the paper-like setting's shape on a GPU or a free machine (not run here)
    "full": Sizes(n_train=1000, n_val=200, image_size=128, pretrain_iterations=400, cnn_iterations=1200,
                  detr_iterations=3000, rounds=4, samples=4, proxy_iterations=150),
    # every path once, in seconds (tests)
    "smoke": Sizes(n_train=32, n_val=12, image_size=64, pretrain_iterations=4, cnn_iterations=3,
                   detr_iterations=2, rounds=1, samples=2, proxy_iterations=2, cnn_seeds=(0,), detr_seeds=(0,)),
}


def rows_of(detector: str) -> tuple[str, ...]:
    """The rows trained for ``detector``: all of :data:`ROWS` (the DETR head takes ``detach_i3`` too)."""
    return ROWS


def seeds_of(detector: str, sizes: Sizes) -> tuple[int, ...]:
    return sizes.detr_seeds if detector in MMDET else sizes.cnn_seeds


def train_options(detector: str, sizes: Sizes, iterations: int) -> dict[str, Any]:
    """TrainConfig fields of one training of ``detector`` (its resolved name included)."""
    if detector in MMDET:  # the config's model and pipeline; AdamW as DETR trains
        return {"detector": detector, "iterations": iterations, "optimizer": "adamw",
                "lr": 5e-4, "batch_size": 4, "warmup_iters": max(1, iterations // 10), "grad_clip": 0.1,
                "num_threads": 1, "image_size": sizes.image_size}
    return {"detector": detector, "iterations": iterations, "image_size": sizes.image_size,
            "fpn_channels": sizes.fpn_channels,
            "anchor_size": sizes.image_size / 8, "batch_size": 8, "warmup_iters": max(1, iterations // 10),
            "lr": 0.01, "num_threads": 1}


# ----------------------------------------------------------------------------- the table (pure)
def table(results: Mapping[str, Mapping[str, Sequence[float]]], floor: float = AP_FLOOR,
          seeds_note: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Table 1 analogue from ``results[detector][row]`` = the AP × 100 of each seed.

    Each cell: ``{"mean", "std" (None with one seed), "n", "aps"}``, or None when the row
    has no result. A detector's row ``counts`` when its ``focal+giou`` mean reaches
    ``floor``; it lacks a baseline or falls below it otherwise."""
    out: dict[str, Any] = {"floor": float(floor), "rows": list(ROWS), "detectors": {}}
    for det, rows in results.items():
        unknown = sorted(set(rows) - set(ROWS))
        if unknown:
            raise ValueError(f"results of {det}: unknown row(s) {unknown}; known: {list(ROWS)}")
        cells = {}
        for row in ROWS:
            aps = [float(a) for a in rows.get(row, [])]
            bad = [a for a in aps if not math.isfinite(a) or not 0.0 <= a <= 100.0]
            if bad:
                raise ValueError(f"results of {det} / {row}: AP x 100 must be in [0, 100], got {bad}")
            cells[row] = None if not aps else {
                "mean": statistics.fmean(aps), "std": statistics.stdev(aps) if len(aps) > 1 else None,
                "n": len(aps), "aps": aps}
        base = cells[BASELINE]
        out["detectors"][det] = {"cells": cells, "counts": base is not None and base["mean"] >= floor,
                                 "seeds": (seeds_note or {}).get(det, "")}
    return out


def cell_text(cell: Mapping[str, Any] | None) -> str:
    if cell is None:
        return "—"
    if cell["std"] is None:
        return f"{cell['mean']:.1f}"
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def markdown(t: Mapping[str, Any]) -> str:
    """The table as Markdown: a row per detector, a column per loss; a row whose
    baseline is below the floor reads "not converged" in every cell."""
    head = ["detector", "seeds", *t["rows"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for det, d in t["detectors"].items():
        if d["counts"]:
            cells = [cell_text(d["cells"][r]) for r in t["rows"]]
        else:
            cells = [NOT_CONVERGED] * len(t["rows"])
        lines.append("| " + " | ".join([f"`{det}`", d["seeds"], *cells]) + " |")
    lines.append("")
    lines.append("— : not trained.")
    lines.append(f"AP × 100 on `shapes` val (mean ± std over the seeds). A row counts when its `{BASELINE}` "
                 f"baseline reaches {t['floor']:g} AP; below that it reads \"{NOT_CONVERGED}\" "
                 "(its numbers are in table1.json).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the runs
def _train_one(job: dict) -> dict:
    """One training (a worker process): ``job`` holds the TrainConfig fields, the row and
    where its result goes; returns the result (also written there)."""
    import torch

    from paploss import engine
    from paploss.spec_set import read_spec

    torch.set_num_threads(1)
    fields = dict(job["config"])
    spec_json = fields.pop("spec", None)
    spec = read_spec(spec_json) if spec_json else None
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="table1-") as tmp:
        cfg = engine.TrainConfig(**fields, spec=spec, out_dir=tmp)
        res = engine.train(cfg, progress=False)
    result = {"detector": job["detector"], "row": job["row"], "seed": fields["seed"],
              "AP": 100.0 * float(res.metrics.get("AP", 0.0)), "metrics": dict(res.metrics),
              "diverged": bool(res.diverged), "seconds": round(time.monotonic() - start, 1)}
    Path(job["out"]).parent.mkdir(parents=True, exist_ok=True)
    Path(job["out"]).write_text(json.dumps(result))
    print(f"table1> {job['detector']} {job['row']} seed {fields['seed']}: AP {result['AP']:.2f} "
          f"({result['seconds']:.0f}s)", flush=True)
    return result


def _job(detector: str, row: str, seed: int, sizes: Sizes, data: str, init: str, spec_json: str | None,
         work: Path) -> dict:
    cfg = {**train_options(detector, sizes, sizes.detr_iterations if detector in MMDET else sizes.cnn_iterations),
           "data": data, "train_ann": "train", "val_ann": "val", "seed": seed, "init": init or None,
           "loss": BASELINE if row == BASELINE else "paploss", "spec": spec_json,
           "detach_i3": row == "pap+detach_i3"}
    return {"detector": detector, "row": row, "config": cfg, "out": str(work / "table1" / detector / f"{row}-s{seed}.json")}


def _search(detector: str, sizes: Sizes, work: str, data: str, init: str, jobs: int) -> str:
    """A short search for ``detector`` on search-train / search-val; the searched spec's JSON."""
    from paploss import flow, presets, steps

    opts = train_options(detector, sizes, sizes.proxy_iterations)
    p = presets.get_preset("smoke").with_overrides(
        rounds=sizes.rounds, samples=sizes.samples, detector=opts.pop("detector"), proxy=opts, select_top=0)
    s = flow.Search(preset=p, work=work, search_name=f"table1-{detector}")
    state = flow.search(s, data, init, map=flow.processes(jobs) if jobs > 1 else flow.in_order)
    return steps.searched_spec(state).to_json()


def _train_all(jobs: Sequence[dict], workers: int) -> list[dict]:
    """The trainings of ``jobs`` not cached yet, ``workers`` at a time; every result."""
    done = [json.loads(Path(j["out"]).read_text()) for j in jobs if Path(j["out"]).exists()]
    left = [j for j in jobs if not Path(j["out"]).exists()]
    print(f"table1> {len(done)} trainings cached, {len(left)} to train, {workers} at a time", flush=True)
    if left and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            done += list(pool.map(_train_one, left))
    else:
        done += [_train_one(j) for j in left]
    return done


def _cached_search(work: Path, detector: str) -> str | None:
    """The searched spec of a finished cached search of ``detector`` (its last state), else None."""
    from paploss import steps

    states = sorted((work / "searches" / f"table1-{detector}" / "state").glob("round-*.json"))
    return steps.searched_spec(str(states[-1])).to_json() if len(states) > 1 else None


def inputs(sizes: Sizes, detectors: Sequence[str], work_dir: Path, only_cached: bool = False
           ) -> tuple[str, dict[str, str]]:
    """The bundled ``shapes`` of ``sizes`` and each detector's warm start, cached in ``work_dir``
    (``only_cached``: a warm start not there is "")."""
    from paploss import steps

    data = steps.prepare_data("bundled:shapes", str(work_dir),
                              bundled={"n_train": sizes.n_train, "n_val": sizes.n_val, "image_size": sizes.image_size})
    inits = {}
    for det in detectors:
        opts = train_options(det, sizes, sizes.cnn_iterations)
        inits[det] = steps.pretrain(data, str(work_dir), config={"iterations": sizes.pretrain_iterations,
                                                                 "batch_size": sizes.pretrain_batch,
                                                                 "num_threads": PRETRAIN_THREADS},
                                    detector=opts["detector"], proxy=opts, only_cached=only_cached)
    return data, inits


def run(preset: str, detectors: Sequence[str], work: str, out: str, jobs: int, floor: float = AP_FLOOR,
        report_only: bool = False) -> dict:
    """Everything: data, warm starts, the fixed losses' trainings, a search per detector,
    the searched losses' trainings; writes the table and the figure to ``out`` and returns
    the table. ``report_only``: train nothing, tabulate what the cache holds."""
    from paploss import plots
    from paploss.spec import LossSpec
    from paploss.spec_set import read_spec

    sizes = PRESETS[preset]
    work_dir = Path(work).resolve()
    data, inits = inputs(sizes, detectors, work_dir, only_cached=report_only)
    pap = LossSpec.handcrafted(PAP_FORM).to_json()

    def jobs_of(rows: Sequence[str], spec_of) -> list[dict]:  # seed-major: every detector's seed 0 first
        return [_job(det, row, seed, sizes, data, inits[det], spec_of(det, row), work_dir)
                for seed in range(max(max(seeds_of(d, sizes)) for d in detectors) + 1)
                for det in detectors for row in rows if row in rows_of(det) and seed in seeds_of(det, sizes)]

    fixed = jobs_of([r for r in ROWS if r != "searched"], lambda det, row: None if row == BASELINE else pap)
    done = [json.loads(Path(j["out"]).read_text()) for j in fixed if Path(j["out"]).exists()] if report_only \
        else _train_all(fixed, jobs)
    searched = {det: (_cached_search(work_dir, det) if report_only
                      else _search(det, sizes, str(work_dir), data, inits[det], jobs)) for det in detectors}
    searched = {det: s for det, s in searched.items() if s is not None}
    later = [j for j in jobs_of(["searched"], lambda det, row: searched.get(det)) if j["detector"] in searched]
    done += [json.loads(Path(j["out"]).read_text()) for j in later if Path(j["out"]).exists()] if report_only \
        else _train_all(later, jobs)
    results: dict[str, dict[str, list[float]]] = {det: {} for det in detectors}
    for r in sorted(done, key=lambda r: (r["detector"], r["row"], r["seed"])):
        results[r["detector"]].setdefault(r["row"], []).append(r["AP"])
    notes = {det: (f"{len(seeds_of(det, sizes))} (one seed: slow on a CPU)" if det in MMDET
                   else str(len(seeds_of(det, sizes)))) for det in detectors}
    t = table(results, floor, notes)
    t.update(preset=preset, sizes=dataclasses.asdict(sizes), pap_form=PAP_FORM,
             searched={det: json.loads(s) for det, s in searched.items()}, trainings=done)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table1.json").write_text(json.dumps(t, indent=1))
    (out_dir / "table1.md").write_text(markdown(t) + "\n")
    if searched:
        (out_dir / "figure1.png").write_bytes(plots.detectors_figure({d: read_spec(s) for d, s in searched.items()}))
    return t


@click.command("table1")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="medium", show_default=True,
              help="Sizes: medium (the demo's data, detectors and 400-iteration trainings: about an hour on 2 idle "
                   "cores), small (96 px, 250 iterations: no baseline reaches the floor), full (longer trainings and "
                   "search), smoke (seconds).")
@click.option("--detectors", default=None,
              help="Comma-separated detectors (paploss search --detector names) [default: the preset's; medium: the "
                   "demo's MobileNetV3-Small CNNs and deformable_detr_tiny, the others: " + ",".join(DETECTORS) + "].")
@click.option("--floor", type=float, default=AP_FLOOR, show_default=True,
              help="AP x 100 a detector's focal/CE baseline must reach for its row to count.")
@click.option("--jobs", type=int, default=2, show_default=True, help="Trainings at a time (one thread each).")
@click.option("--work", default="runs/table1-work", show_default=True, help="Cache folder; a rerun resumes.")
@click.option("--out", default="runs/table1", show_default=True, help="Where table1.json/.md and figure1.png go.")
@click.option("--report-only", is_flag=True, help="Train nothing: tabulate the trainings and searches --work holds.")
def main(preset: str, detectors: str | None, floor: float, jobs: int, work: str, out: str, report_only: bool) -> None:
    """Table 1 and Figure 1 on shapes (see the module docstring)."""
    from paploss.spec_set import detector_names

    names = PRESETS[preset].detectors if detectors is None else tuple(d for d in detectors.split(",") if d)
    unknown = sorted(set(names) - set(detector_names()))
    if unknown or not names:
        raise click.UsageError(f"--detectors: unknown {unknown or 'none given'}; known: {', '.join(detector_names())}")
    if jobs < 1:
        raise click.UsageError(f"--jobs={jobs} must be >= 1")
    start = time.monotonic()
    t = run(preset, names, work, out, jobs, floor, report_only)
    click.echo(markdown(t))
    click.echo(f"wall time {time.monotonic() - start:.0f}s; results in {out}/table1.json, table1.md, figure1.png")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
