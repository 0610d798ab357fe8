"""A bigger search on one GPU machine, inside a fixed time budget (issue 8).

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

import concurrent.futures as cf
import json
import math
import os
import tarfile
import threading
import time
from pathlib import Path

import click

from bench import search as B
from paploss import steps, storage


def _log(msg: str) -> None:
    B._log(msg)


def _round(pool, p, data, init, work, name, out, deadline=None) -> dict | None:
    """One round of a search (proxy trials, then the controller's update); None if it
    would not finish before ``deadline`` (the trials are then abandoned)."""
    proxy = steps.train_options(p.proxy, p.detector)
    futures = [pool.submit(steps.proxy_trial, data, init, t, proxy, work, name, state=out["state"],
                           attempts=p.attempts) for t in out["trials"]]
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    done, pending = cf.wait(futures, timeout=timeout)
    if pending:
        for f in pending:
            f.cancel()
        return None
    return steps.controller_update(out["state"], [f.result() for f in futures], work, name,
                                   max_failed_trials=p.max_failed_trials)


def _search(pool, p, data, init, work, name, deadline, record) -> None:
    out = steps.init_search(work, name, p.rounds, p.samples, seed=p.seed, controller=p.controller)
    record.update(name=name, state=out["state"], rounds_done=0)
    for r in range(p.rounds):
        start = time.monotonic()
        nxt = _round(pool, p, data, init, work, name, out, deadline)
        if nxt is None:
            _log(f"{name}: stopped before round {r + 1} finished (budget); its mean is the one after round {r}")
            return
        out = nxt
        record.update(state=out["state"], rounds_done=r + 1)
        _log(f"{name} round {r + 1}/{p.rounds}: mean reward {out['mean_reward']:.4f}, "
             f"max {out['max_reward']:.4f} ({time.monotonic() - start:.0f}s)")


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
def main(work, out_dir, datasets, samples, max_rounds, min_rounds, sigma, proxy_iterations, final_iterations,
         search_budget_s, total_budget_s, losses, compare, seeds, jobs, pipeline_preset, n_train, n_val):
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
    _log(f"device {run['device']}, {jobs} jobs")

    def cfg_for(rounds: int) -> B.BenchConfig:
        return B.BenchConfig(datasets=tuple(names), losses=("searched",), seeds=seed_list,
                             pipeline_preset=pipeline_preset, rounds=rounds, samples=samples,
                             proxy_iterations=proxy_iterations, final_iterations=final_iterations,
                             n_train=n_train, n_val=n_val, sigma=sigma, jobs=jobs, work=work, out=str(out))

    with B._pool(jobs) as pool:
        # data and warm starts: the benchmark's (cached under --work, else made here)
        prepared = {}
        for d in names:  # the datasets made at once, in the pool
            p = cfg_for(max_rounds).preset(d)
            w = storage.join(work, d)
            prepared[d] = (w, pool.submit(steps.prepare_data, p.dataset, w, split_seed=p.split_seed, bundled=p.bundled))
        prepared = {d: (w, fut.result()) for d, (w, fut) in prepared.items()}
        for d, (w, data) in prepared.items():
            p = cfg_for(max_rounds).preset(d)
            prepared[d] = (w, data, steps.pretrain(data, w, config=p.pretrain, seed=p.seed, detector=p.detector))
        _log(f"data and warm starts ready ({time.monotonic() - t0:.0f}s)")

        # the timing round: one round of S trials on every dataset at once
        start = time.monotonic()
        timing = {}
        for d, (w, data, init) in prepared.items():
            p = cfg_for(max_rounds).preset(d)
            first = steps.init_search(w, f"timing-{d}-s{samples}", max_rounds, samples, seed=p.seed,
                                      controller=p.controller)
            timing[d] = threading.Thread(target=_round, args=(pool, p, data, init, w, f"timing-{d}-s{samples}", first))
            timing[d].start()
        for th in timing.values():
            th.join()
        t_round = time.monotonic() - start
        left = t0 + search_budget_s - time.monotonic()
        rounds = max(1, min(max_rounds, int(left / (1.1 * t_round))))
        run.update(timing_round_s=round(t_round, 1), rounds=rounds)
        _log(f"one round of {samples} trials on {len(names)} dataset(s): {t_round:.0f}s -> R = {rounds}")
        if rounds < min_rounds:  # e.g. 1 round of 8 on an H100 shared by 16 processes (BENCHMARKS.md)
            _log(f"R = {rounds} < --min-rounds {min_rounds}: too short a search to mean anything; "
                 "no search, the finals of the other losses only")
            run["skipped"] = f"R = {rounds} < --min-rounds {min_rounds}"
            loss_list = [x for x in loss_list if x != "searched"]

        # the searches, every dataset at once, each round's trials in the shared pool
        cfg = cfg_for(rounds)
        records = {d: {} for d in names}
        threads = []
        for d, (w, data, init) in prepared.items():
            if "skipped" in run:
                break
            p = cfg.preset(d)
            th = threading.Thread(target=_search, args=(pool, p, data, init, w, f"device-{d}-searched-s{samples}r{rounds}",
                                                        t0 + search_budget_s + 0.5 * t_round, records[d]))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        run["searches"] = records
        _write(out, "run.json", json.dumps(run, indent=2))
        with tarfile.open(out / "searches.tar.gz", "w:gz") as tar:
            for d, rec in records.items():
                if rec:
                    tar.add(steps.search_dir(prepared[d][0], rec["name"]), arcname=rec["name"])
        _log(f"searches done ({time.monotonic() - t0:.0f}s)")

        # the finals: every loss and seed, seed-major so that early stops keep whole seeds
        specs = {}
        for d in names:
            specs[d] = B._loss_specs(cfg, d, {}, [x for x in loss_list if x != "searched"])
            if "searched" in loss_list:
                specs[d]["searched"] = steps.load_controller(records[d]["state"]).spec().to_json()
            for name, pattern in extra.items():
                specs[d][name] = steps.load_controller(pattern.format(dataset=d)).spec().to_json()
        futures = {}
        for seed in seed_list:
            for d in names:
                w, data, init = prepared[d]
                p = cfg.preset(d)
                for loss, spec in specs[d].items():
                    target = storage.join(w, "final-device", f"{loss}-seed{seed}.json")
                    futures[pool.submit(B._final_job, p, data, init, loss, spec, seed, target)] = (d, loss, seed)
        results: dict = {d: {} for d in names}
        got: dict = {}
        try:
            for f in cf.as_completed(futures, timeout=max(1.0, t0 + total_budget_s - time.monotonic())):
                d, loss, seed = futures[f]
                got[(d, loss, seed)] = f.result()["metrics"]
                _log(f"{d} {loss} seed {seed}: AP {got[(d, loss, seed)].get('AP', math.nan):.4f}")
                for dd in names:  # per seed in order, only the seeds every loss of dd finished
                    results[dd] = {}
                    for loss_name in specs[dd]:
                        for s in seed_list:
                            if all((dd, x, s) in got for x in specs[dd]):
                                for m in B.METRICS:
                                    results[dd].setdefault(loss_name, {k: [] for k in B.METRICS})[m].append(
                                        float(got[(dd, loss_name, s)].get(m, math.nan)))
                _write(out, "results.json", json.dumps(results, indent=1))
        except cf.TimeoutError:
            _log(f"total budget reached: {len(futures) - len(got)} final trainings left out")
        run["finals_done"] = len(got)
        run["finals_all"] = {f"{d}/{loss}/seed{s}": m for (d, loss, s), m in got.items()}
        _write(out, "run.json", json.dumps(run, indent=2))
        _write(out, "summary.md", B.summarize(results) + "\n" + B.goal_text(results) + "\n")
        _log(f"done ({time.monotonic() - t0:.0f}s)")
        workers = list((pool._processes or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:  # trainings past the budget: stop them
            proc.kill()
        os._exit(0)


if __name__ == "__main__":
    main()
