"""One prepared GPU check: proxy trials packed k per GPU, and bfloat16 on/off.

For a lent GPU machine (about 15 minutes of device time, start-up included): within
``--budget-s`` (480 s by default, ``bench/gpu_check.sh`` wraps it in a hard timeout) it

1. checks, before each packing, that k trials fit the GPU's memory
   (:func:`paploss.packing.check_gpu` with :func:`paploss.packing.estimate_trial_bytes`)
   and whether an MPS daemon answers (:func:`paploss.packing.mps_running`);
2. trains ``--trial-iterations`` (300) iterations of the ``quick`` proxy trial k at a
   time, for each k of ``--ks`` (1, 8, 16), under CUDA MPS when it starts
   (``bench.search.cuda_mps``): k processes, started together behind a barrier;
3. trains one ``--amp-iterations`` (200) iteration trial with bfloat16 autocast on,
   then off;

and prints a table: seconds per iteration of each trial, iterations per second of the
whole GPU (the throughput packing buys), the peak memory each trial's allocator
reserved beside the estimate, and the last losses.  ``--out`` (``$OUT`` on the device
machine) gets ``gpu_check.json`` and ``gpu_check.md``.  Timings are of the training
iterations only (from the first to the last step); evaluation is skipped unless
``--eval`` (it needs pycocotools, which the device image lacks).

Without CUDA (or with ``--cpu``) the same steps run on the CPU with tiny sizes
(k = 1, 2; a few iterations) as a dry check of the script itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import click

TRIAL_TIMEOUT_S = 300  # longest wait at the start barrier
_STARTED = time.time()  # the budget counts from the import, before torch's


def _worker(cfg: dict, evaluate: bool, barrier, queue) -> None:
    """One training in its own process: waits for the others at ``barrier``, then
    trains and puts its timings, peak memory and losses on ``queue``."""
    import torch

    from paploss import engine
    from paploss.config import TrainConfig
    from paploss.evaluate import METRICS

    out: dict = {"pid": os.getpid()}
    try:
        if not evaluate:  # timing of the training only: no pycocotools needed
            engine.evaluate_model = lambda *a, **k: {m: math.nan for m in METRICS}
        config = TrainConfig(**cfg)
        cuda = config.device.startswith("cuda")
        if cuda:
            torch.zeros(1, device="cuda")  # the CUDA context (and MPS client) before the clock starts
        barrier.wait(timeout=TRIAL_TIMEOUT_S)
        steps: list[float] = []
        r = engine.train(config, on_step=lambda it, v: steps.append(time.time()), progress=False)
        out.update(start=steps[0], end=steps[-1], iterations=len(steps), losses=r.losses[-3:],
                   s_per_it=(steps[-1] - steps[0]) / max(1, len(steps) - 1), AP=r.metrics.get("AP"),
                   peak_bytes=torch.cuda.max_memory_reserved() if cuda else None,
                   amp=engine.amp_enabled(config.amp, engine.resolve_device(config.device)))
    except BaseException as exc:  # reported in the table, the other trials go on
        out["error"] = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            barrier.abort()  # the others stop waiting for this one
    queue.put(out)


def _run_packed(cfg: dict, k: int, evaluate: bool, deadline: float) -> dict:
    """k trainings of ``cfg`` at once (seeds 0..k-1), started together; those still
    running at ``deadline`` (a ``time.time()``) are stopped and reported."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=({**cfg, "seed": i}, evaluate, barrier, queue)) for i in range(k)]
    for p in procs:
        p.start()
    results = []
    while len(results) < k and time.time() < deadline:
        with contextlib.suppress(Exception):
            results.append(queue.get(timeout=5))
        if len(results) < k and not any(p.is_alive() for p in procs) and queue.empty():
            break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    ok = [r for r in results if "error" not in r]
    row: dict = {"k": k, "finished": len(ok), "errors": [r["error"] for r in results if "error" in r]}
    if len(ok) < k:
        row["errors"].append(f"{k - len(ok)} of {k} trainings did not finish"
                             + (" (stopped at the time budget)" if time.time() >= deadline else ""))
    if ok:
        wall = max(r["end"] for r in ok) - min(r["start"] for r in ok)
        its = sum(r["iterations"] - 1 for r in ok)
        row.update(wall_s=wall, it_per_s=its / wall if wall > 0 else math.nan,
                   s_per_it=sum(r["s_per_it"] for r in ok) / len(ok),
                   peak_gib=None if any(r["peak_bytes"] is None for r in ok)
                   else max(r["peak_bytes"] for r in ok) / 2**30,
                   last_loss=ok[0]["losses"][-1], amp=ok[0]["amp"], AP=ok[0]["AP"])
    return row


def _sizes(cpu: bool, trial_iterations: int, amp_iterations: int, ks: str):
    from paploss.config import PROXY_PRESETS

    if cpu:
        base = {**PROXY_PRESETS["smoke"], "device": "cpu", "num_threads": 1, "max_val_images": 4}
        return base, 3, 2, [1, 2], dict(n_train=16, n_val=4, image_size=64)
    base = {**PROXY_PRESETS["quick"], "device": "cuda", "num_threads": 1, "max_val_images": 32, "amp": True}
    return base, trial_iterations, amp_iterations, [int(x) for x in ks.split(",") if x], \
        dict(n_train=512, n_val=32, image_size=None)


def _table(rows: list[dict], amp_rows: list[dict]) -> str:
    lines = ["| run | k | finished | s / iteration (each) | iterations / s (GPU) | peak GiB (each) | "
             "estimate GiB (each) | last loss | note |", "|---|---|---|---|---|---|---|---|---|"]
    def f(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else "-"

    for r in rows + amp_rows:
        note = "; ".join(r.get("errors", []) + ([r["note"]] if r.get("note") else []))
        lines.append(f"| {r['run']} | {r['k']} | {r.get('finished', 0)} | {f(r, 's_per_it', '.4f')} | "
                     f"{f(r, 'it_per_s', '.1f')} | {f(r, 'peak_gib', '.2f')} | {f(r, 'estimate_gib', '.2f')} | "
                     f"{f(r, 'last_loss', '.4f')} | {note} |")
    return "\n".join(lines)


@click.command()
@click.option("--cpu", is_flag=True, help="Dry check on the CPU with tiny sizes (also without CUDA).")
@click.option("--ks", default="1,8,16", show_default=True, help="Trials per GPU to measure.")
@click.option("--trial-iterations", type=int, default=300, show_default=True)
@click.option("--amp-iterations", type=int, default=200, show_default=True)
@click.option("--budget-s", type=float, default=470, show_default=True,
              help="Everything ends within this many seconds: a measurement still running then is stopped, "
                   "later ones are left out; the table so far is written after every row.")
@click.option("--eval/--no-eval", "evaluate", default=False, show_default=True,
              help="Evaluate each training (needs pycocotools); timings exclude it either way.")
@click.option("--mps/--no-mps", default=True, show_default=True, help="Start CUDA MPS for the packed trials.")
@click.option("--out", "out_dir", default=None, help="Where the results go [$OUT, else runs/gpu-check].")
def main(cpu, ks, trial_iterations, amp_iterations, budget_s, evaluate, mps, out_dir):
    """Proxy trials packed k per GPU (under MPS) and a bfloat16 on/off pair, timed; a table."""
    import torch

    from bench.search import cuda_mps
    from paploss.config import TrainConfig
    from paploss.data import make_dataset, search_split
    from paploss.errors import InputError
    from paploss.packing import check_gpu, estimate_trial_bytes, mps_pipe_directory, mps_running

    t0 = _STARTED
    cpu = cpu or not torch.cuda.is_available()
    base, trial_its, amp_its, k_list, data_sizes = _sizes(cpu, trial_iterations, amp_iterations, ks)
    out = Path(out_dir or os.environ.get("OUT") or "runs/gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="paploss-gpu-check-"))
    root = make_dataset("shapes", work / "shapes", progress=False, **{k: v for k, v in data_sizes.items() if v})
    search_split(root)
    spec = {"form": "square"}
    trial = {**base, "data": str(root), "loss": "paploss", "spec": spec, "iterations": trial_its}
    trial["warmup_iters"] = min(trial.get("warmup_iters", 0), max(0, trial_its - 1))
    num_classes = len(json.loads((root / "annotations" / "search_train.json").read_text())["categories"])
    estimate = estimate_trial_bytes(TrainConfig(**trial), num_classes)
    print(f"[gpu-check] {'cpu' if cpu else torch.cuda.get_device_name(0)}; data {root}; trial estimate {estimate / 2**30:.2f} GiB", flush=True)

    rows: list[dict] = []
    amp_rows: list[dict] = []
    deadline = t0 + budget_s - 5
    device = "cpu" if cpu else torch.cuda.get_device_name(0)

    def write() -> None:  # after every row: a run stopped by the outer timeout still leaves its table
        head = (f"GPU check on {device} ({'CPU dry check, tiny sizes' if cpu else 'quick proxy trial'}), "
                f"{trial_its}-iteration trials, {amp_its}-iteration bf16 pair; {time.time() - t0:.0f} s in all.")
        table = _table(rows, amp_rows)
        (out / "gpu_check.md").write_text(head + "\n\n" + table + "\n")
        record = {"device": device, "cpu": cpu, "trials": rows, "amp": amp_rows, "estimate_bytes": estimate,
                  "seconds": time.time() - t0}
        (out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str))
        return head + "\n\n" + table

    with cuda_mps(mps and not cpu) as mps_on:
        print(f"[gpu-check] MPS {'on' if mps_on else 'off'}; daemon seen at {mps_pipe_directory()}: "
              f"{mps_running()}", flush=True)
        for k in k_list:
            row = {"run": f"trials{' (MPS)' if mps_on and k > 1 else ''}", "k": k, "estimate_gib": estimate / 2**30}
            if time.time() >= deadline:
                rows.append({**row, "errors": ["left out: over the time budget"]})
                continue
            if not cpu:
                try:
                    row["note"] = f"memory check: at most {check_gpu(k, estimate)} fit"
                except InputError as exc:
                    rows.append({**row, "errors": [f"refused: {exc}"]})
                    continue
            t = time.time()
            rows.append({**row, **_run_packed(trial, k, evaluate, deadline)})
            write()
            print(f"[gpu-check] k={k}: {time.time() - t:.0f}s; {rows[-1]}", flush=True)
    for amp in (True, False):
        cfg = {**trial, "iterations": amp_its, "amp": amp}
        row = {"run": f"bf16 {'on' if amp else 'off'}", "k": 1, "estimate_gib": estimate / 2**30}
        if time.time() >= deadline:
            amp_rows.append({**row, "errors": ["left out: over the time budget"]})
            continue
        got = _run_packed(cfg, 1, evaluate, deadline)
        if amp and got.get("amp") is False:
            got["note"] = "no bfloat16 autocast on this device: float32"
        amp_rows.append({**row, **got})
        write()
        print(f"[gpu-check] {row['run']}: {amp_rows[-1]}", flush=True)

    print(write(), flush=True)
    sys.stderr.flush()
    # no waiting on stopped trainings' queues and semaphores at exit
    os._exit(0 if any(r.get("finished") for r in rows + amp_rows) else 1)


if __name__ == "__main__":
    main()
