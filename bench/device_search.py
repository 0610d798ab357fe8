"""A bigger search on one GPU machine, inside a fixed time budget.

The 2-core benchmark (:mod:`bench.search`) affords 8 rounds x 4 samples per search;
the paper searches 40 rounds x 8 samples with sigma 0.2 (SPEC section 3's defaults).
On a machine with a GPU and many cores this runs the separate search on each
dataset at once, ``--samples`` per round, and as many rounds (at most
``--max-rounds``) as fit ``--search-budget-s``: a first timing round of proxy trials
measures what a round costs, and R is fixed from it before the search starts (the
SPEC's sigma schedule needs R up front). Then it trains the final detector with
each loss of ``--losses`` and each seed on the same machine, so that every loss is
compared on the same hardware, and evaluates it on the held-out ``val`` split.

Everything else is the benchmark's: the same data, warm start, proxy and final
schedules (``--work`` holding the benchmark's cached data and warm starts gives the
same ones), the same search and final-training code. ``--compare NAME=STATE``
adds the loss of another search (a state file, ``{dataset}`` filled in) to the
finals, for instance the 2-core search's.

Writes to ``--out``: ``results.json`` (``{dataset: {loss: {"AP": [per seed], ...}}}``,
rewritten after each final training), ``summary.md`` (the table and the goal check),
``run.json`` (the timing round, R, what finished) and ``searches.tar.gz`` (the search
states, for the figures and ``mu_travel``).
"""

from __future__ import annotations

import json
import math
import contextlib
import os
import tarfile
import threading
import time
from pathlib import Path

import click

from bench import search as B
from paploss import flow, steps, storage


class _OneRound(Exception):
    """Stops the timing round's search after its first round."""


def _stop_after_one(out: dict) -> None:
    raise _OneRound


def _complete_seeds(got: dict, specs: dict, seeds) -> dict:
    """``{dataset: {loss: {metric: [per seed]}}}`` of the finals in ``got`` (keyed
    ``(dataset, loss, seed)``), keeping per dataset only the seeds every loss finished."""
    results: dict = {}
    for d, losses in specs.items():
        done = [s for s in seeds if all((d, loss, s) in got for loss in losses)]
        results[d] = {loss: {m: [float(got[(d, loss, s)].get(m, math.nan)) for s in done] for m in B.METRICS}
                      for loss in losses} if done else {}
    return results


def _write(out: Path, name: str, text: str) -> None:
    storage.write_text(str(out / name), text)  # temp name, then rename


@click.command()
@click.option("--work", default="runs/bench3", show_default=True,
              help="Benchmark work folder: its cached data and warm starts are reused (same keys).")
@click.option("--out", "out_dir", default=None, help="Where the results go [$OUT, else runs/device].")
@click.option("--datasets", default="shapes,digits", show_default=True)
@click.option("--samples", type=int, default=8, show_default=True, help="Losses sampled per round (S).")
@click.option("--max-rounds", type=int, default=40, show_default=True, help="At most this many rounds (R).")
@click.option("--min-rounds", type=int, default=8, show_default=True,
              help="Fewer rounds than this fit the budget: no search (the other losses' finals only).")
@click.option("--sigma", type=float, default=0.2, show_default=True, help="Starting spread of the policy.")
@click.option("--proxy-iterations", type=int, default=150, show_default=True)
@click.option("--final-iterations", type=int, default=400, show_default=True)
@click.option("--search-budget-s", type=float, default=330, show_default=True,
              help="Seconds from the start by which the searches must end (timing round included).")
@click.option("--total-budget-s", type=float, default=520, show_default=True,
              help="Seconds from the start by which everything ends; unfinished finals are left out.")
@click.option("--losses", default="searched,square,linear,focal+l1", show_default=True,
              help="Losses of the final trainings ('searched' is this run's search).")
@click.option("--compare", multiple=True, help="NAME=STATE: another search's loss in the finals "
              "(STATE a state file; '{dataset}' is filled in).")
@click.option("--seeds", default="0,1,2,3,4", show_default=True)
@click.option("--jobs", type=int, default=16, show_default=True, help="Trainings at a time.")
@click.option("--pipeline-preset", default="quick", show_default=True,
              help="paploss.steps preset behind the sizes (the benchmark's is 'quick'; 'smoke' for a check).")
@click.option("--n-train", type=int, default=1000, show_default=True)
@click.option("--n-val", type=int, default=250, show_default=True)
@click.option("--mps/--no-mps", default=True, show_default=True,
              help="Run the trainings under CUDA MPS (started here if the machine has it): concurrent processes "
                   "share the GPU instead of taking turns.")
def main(work, out_dir, datasets, samples, max_rounds, min_rounds, sigma, proxy_iterations, final_iterations,
         search_budget_s, total_budget_s, losses, compare, seeds, jobs, pipeline_preset, n_train, n_val, mps):
    """Search on each dataset with S samples per round and as many rounds as fit the budget,
    then train and evaluate the finals of every loss and seed on the same machine."""
    import torch

    t0 = time.monotonic()
    out = Path(out_dir or os.environ.get("OUT") or "runs/device")
    out.mkdir(parents=True, exist_ok=True)
    names = [d for d in datasets.split(",") if d]
    seed_list = tuple(int(s) for s in seeds.split(","))
    loss_list = [x for x in losses.split(",") if x]
    extra = dict(c.split("=", 1) for c in compare)
    run: dict = {"cuda": torch.cuda.is_available(), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                 else "cpu", "samples": samples, "sigma": sigma, "proxy_iterations": proxy_iterations,
                 "final_iterations": final_iterations, "seeds": seed_list, "losses": loss_list, "compare": extra}
    stack = contextlib.ExitStack()  # closed by hand before the os._exit at the end
    run["mps"] = stack.enter_context(B.cuda_mps(mps))
    B._log(f"device {run['device']}, {jobs} jobs" + (", CUDA MPS" if run["mps"] else ""))

    def cfg_for(rounds: int) -> B.BenchConfig:
        return B.BenchConfig(datasets=tuple(names), losses=("searched",), seeds=seed_list,
                             pipeline_preset=pipeline_preset, rounds=rounds, samples=samples,
                             proxy_iterations=proxy_iterations, final_iterations=final_iterations,
                             n_train=n_train, n_val=n_val, sigma=sigma, jobs=jobs, work=work, out=str(out))

    presets = {d: cfg_for(max_rounds).preset(d) for d in names}  # everything but R, which the timing round fixes
    works = {d: storage.join(work, d) for d in names}
    with B._pool(jobs) as pool:
        # data and warm starts: the benchmark's (cached under --work, else made here), the datasets at once
        made = {d: pool.submit(steps.prepare_data, p.dataset, works[d], split_seed=p.split_seed, bundled=p.bundled)
                for d, p in presets.items()}
        data = {d: f.result() for d, f in made.items()}
        init = {d: steps.pretrain(data[d], works[d], config=p.pretrain, seed=p.seed, detector=p.detector)
                for d, p in presets.items()}
        B._log(f"data and warm starts ready ({time.monotonic() - t0:.0f}s)")

        def in_threads(target) -> None:  # one thread per dataset, each round's trials in the pool
            threads = [threading.Thread(target=target, args=(d,)) for d in names]
            for th in threads:
                th.start()
            for th in threads:
                th.join()

        # the timing round: one round of S trials on every dataset at once (flow.search stopped after it)
        def timing_round(d: str) -> None:
            p, name = presets[d].with_overrides(rounds=max_rounds, samples=samples), f"timing-{d}-s{samples}"
            try:
                flow.search(flow.Search(preset=p, work=works[d], search_name=name), data[d], init[d],
                            map=B.WarmStarts(pool), on_round=_stop_after_one)
            except _OneRound:
                pass

        start = time.monotonic()
        in_threads(timing_round)
        t_round = time.monotonic() - start
        left = t0 + search_budget_s - time.monotonic()
        rounds = max(1, min(max_rounds, int(left / (1.1 * t_round))))
        run.update(timing_round_s=round(t_round, 1), rounds=rounds)
        B._log(f"one round of {samples} trials on {len(names)} dataset(s): {t_round:.0f}s -> R = {rounds}")
        searching = rounds >= min_rounds
        if not searching:  # e.g. 1 round of 8 on an H100 shared by 16 processes (BENCHMARKS.md)
            B._log(f"R = {rounds} < --min-rounds {min_rounds}: too short a search to mean anything; "
                   "no search, the finals of the other losses only")
            run["skipped"] = f"R = {rounds} < --min-rounds {min_rounds}"
            loss_list = [x for x in loss_list if x != "searched"]

        # the searches, every dataset at once
        cfg = cfg_for(rounds)
        search_names = {d: f"device-{d}-searched-s{samples}r{rounds}" for d in names}
        states: dict[str, str] = {}

        def search(d: str) -> None:
            m = B.WarmStarts(pool, search=(init[d],), deadline=t0 + search_budget_s + 0.5 * t_round)
            states[d] = B.run_search(cfg, m, cfg.preset(d), data[d], works[d], search_names[d], "searched")

        if searching:
            in_threads(search)
        run["searches"] = {d: {"name": search_names[d], "state": states[d],
                               "rounds_done": steps.load_controller(states[d]).round} if d in states else {}
                           for d in names}
        _write(out, "run.json", json.dumps(run, indent=2))
        with tarfile.open(out / "searches.tar.gz", "w:gz") as tar:
            for d, rec in run["searches"].items():
                if rec:
                    tar.add(steps.search_dir(works[d], rec["name"]), arcname=rec["name"])
        B._log(f"searches done ({time.monotonic() - t0:.0f}s)")

        # the finals: every loss and seed, seed-major so that early stops keep whole seeds
        specs = {}
        for d in names:
            specs[d] = B._loss_specs(cfg, d, {}, [x for x in loss_list if x != "searched"])
            if "searched" in loss_list:
                specs[d]["searched"] = steps.load_controller(states[d]).spec().to_json()
            for name, pattern in extra.items():
                specs[d][name] = steps.load_controller(pattern.format(dataset=d)).spec().to_json()
        results: dict = {d: {} for d in names}
        got: dict = {}
        for d in names:  # each dataset's finals through flow.finals; those past the budget are left out
            m = B.WarmStarts(pool, finals=(init[d],), deadline=t0 + total_budget_s)
            jobs = B.final_jobs(seed_list, list(specs[d]), specs[d], (init[d],))
            docs = B.run_finals(m, cfg.preset(d), data[d], works[d], jobs, name="device-finals")
            for (loss, seed), doc in docs.items():
                got[(d, loss, seed)] = doc["metrics"]
                B._log(f"{d} {loss} seed {seed}: AP {doc['metrics'].get('AP', math.nan):.4f}")
            left = len(jobs) - len(docs)
            if left:
                B._log(f"total budget reached: {left} final trainings of {d} left out")
            results = _complete_seeds(got, specs, seed_list)
            _write(out, "results.json", json.dumps(results, indent=1))
        run["finals_done"] = len(got)
        run["finals_all"] = {f"{d}/{loss}/seed{s}": m for (d, loss, s), m in got.items()}
        _write(out, "run.json", json.dumps(run, indent=2))
        _write(out, "summary.md", B.summarize(results) + "\n" + B.goal_text(results) + "\n")
        B._log(f"done ({time.monotonic() - t0:.0f}s)")
        workers = list((pool._processes or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:  # trainings past the budget: stop them
            proc.kill()
        stack.close()  # stop the MPS daemon
        os._exit(0)


if __name__ == "__main__":
    main()
