"""Is Faster R-CNN's baseline slow or broken? Its focal/CE baselines from Table 1's warm start, longer.

In ``bench.table1 --preset medium`` Faster R-CNN's CE + GIoU baseline reads under 2 AP at
400 iterations while its PAP loss reaches 27-30. This trains, from the same cached data
and warm start (run ``bench.table1`` first), torchvision's own losses (``focal+l1``: CE +
smooth L1) at 400 iterations and CE + GIoU at ``--long`` iterations, side by side, one
thread each, and prints AP x 100 on val.

    PYTHONPATH=. .venv/bin/python -m bench.frcnn_baseline --work runs/table1-medium
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click

from bench import table1

DETECTOR = "faster_rcnn_mobilenet_v3_small"


@click.command("frcnn_baseline")
@click.option("--work", default="runs/table1-medium", show_default=True, help="bench.table1's --work (cached data, warm start).")
@click.option("--out", default="runs/frcnn-baseline", show_default=True, help="Where each training's JSON goes.")
@click.option("--long", "long_iterations", type=int, default=1200, show_default=True,
              help="Iterations of the long CE + GIoU training.")
@click.option("--seed", type=int, default=0, show_default=True)
def main(work: str, out: str, long_iterations: int, seed: int) -> None:
    """focal+l1 at the preset's iterations and focal+giou at --long, from Table 1's warm start."""
    sizes = table1.PRESETS["medium"]
    out_dir = Path(out).resolve()
    data, inits = table1.inputs(sizes, [DETECTOR], Path(work).resolve(), only_cached=True)
    init = inits[DETECTOR]
    if not init:
        raise click.UsageError(f"--work {work}: no cached warm start of {DETECTOR}; run bench.table1 --preset medium first")
    jobs = []
    for loss, iterations in (("focal+l1", sizes.cnn_iterations), ("focal+giou", long_iterations)):
        job = table1._job(DETECTOR, table1.BASELINE, seed, sizes, data, init, None, out_dir)
        job["config"].update(loss=loss, iterations=iterations, warmup_iters=max(1, iterations // 10))
        job.update(row=f"{loss}-{iterations}", out=str(out_dir / f"{loss}-{iterations}-s{seed}.json"))
        jobs.append(job)
    with ProcessPoolExecutor(2) as pool:
        for r in pool.map(table1._train_one, jobs):
            click.echo(f"{r['row']}: AP {r['AP']:.2f}, AP50 {100 * r['metrics'].get('AP50', 0.0):.2f} ({r['seconds']:.0f} s)")


if __name__ == "__main__":  # pragma: no cover
    main()
