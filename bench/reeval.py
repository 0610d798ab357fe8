"""Are a search's best samples better than a handcrafted loss, or were they lucky?

    python -m bench.reeval --search runs/bench6/shapes/searches/bench-shapes-searched-shared \
        --top 7 --baseline square --seeds 1 2 --jobs 2 --out runs/diag/reeval.json

A search scores each sampled loss by one proxy training with one seed (SPEC §3). The
best of many noisy rewards is biased upward (the winner's curse), so this trains the
``--top`` samples of a finished search again, on the same proxy (the search's own
``bench-inputs.json``: data, warm start, schedule; ``search_train`` -> ``search_val``)
with other training seeds, beside ``--baseline`` (a handcrafted form) trained with
the same seeds, and reports per sample the mean reward over the new seeds and the
paired difference to the baseline (mean ± standard error over seeds). With ``--inits``
seed s trains from the (s mod N)-th warm start (a selection across warm starts);
``--top 0`` trains the baseline alone, to set beside a selection's cached trials:

    python -m bench.reeval --search runs/bench7/digits/searches/bench-digits-searched-shared --top 0 \
        --seeds 1 2 3 4 5 6 --inits WS0 WS1 WS2 --out runs/diag/square_ws3.json

``--train`` adds TrainConfig fields to every training (``'{"detach_i3": true}'``: the
loss without I3's gradient into the boxes; ``'{"box_collapse": 0.3}'``: the box-collapse
stop). Trainings run ``--jobs`` at a time, each on ``--device`` with ``--threads`` CPU
threads; a job not started by ``--budget-s`` seconds is left out (the table then
covers the seeds every loss finished).  Results go to ``--out`` (JSON, rewritten
after each training, temp name then rename) and the table to stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import statistics
import time
from multiprocessing import get_context
from pathlib import Path


def load_trials(search: str) -> tuple[dict, list[dict]]:
    """(the search's ``bench-inputs.json``, its finished trials best first)."""
    from paploss.steps import trial_results

    folder = Path(search)
    inputs_file = folder / "bench-inputs.json"
    if not inputs_file.exists():
        raise SystemExit(f"{inputs_file} does not exist: --search must be a benchmark search folder "
                         "(with bench-inputs.json and trials/)")
    inputs = read_inputs(inputs_file)
    trials = trial_results(folder)
    done = [t for t in trials if not t.get("failed") and t.get("reward") is not None and t.get("spec")]
    if not done:
        raise SystemExit(f"{folder / 'trials'} holds no finished trial")
    return inputs, sorted(done, key=lambda t: -t["reward"])


def read_inputs(file: Path) -> dict:
    """A search's ``bench-inputs.json`` with its data and warm starts as paths: the file
    names those inside the work folder by their place in it (``storage.location_id``),
    and the search folder lies in ``<work>/searches/``, wherever the work folder is now."""
    from bench.search import input_places
    from paploss import storage

    work = str(file.resolve().parent.parent.parent)
    return input_places(json.loads(file.read_text()), lambda v: storage.at_location(v, work))


def trial_name(t: dict) -> str:
    return f"r{int(t['round']):03d}-s{int(t['sample']):02d}"


def _train(job: dict, deadline: float) -> dict | None:
    """One proxy training (``job``: name, seed, spec JSON, config); None when past ``deadline``."""
    if time.time() > deadline:
        return None
    from paploss.engine import TrainConfig, train
    from paploss.spec import LossSpec

    cfg = TrainConfig(**{**job["config"], "loss": "paploss", "spec": LossSpec.from_json(job["spec"]),
                         "seed": int(job["seed"])})
    r = train(cfg, progress=False)
    return {"loss": job["name"], "seed": int(job["seed"]), "metrics": {k: float(v) for k, v in r.metrics.items()},
            "diverged": bool(r.diverged), "seconds": float(r.seconds), "final_loss": float(r.losses[-1]),
            "init": job["config"].get("init"), "iterations": int(r.iterations), "box_collapsed": bool(r.box_collapsed)}


def _train_fields(ap: argparse.ArgumentParser, text: str | None) -> dict:
    """``--train``'s JSON object of TrainConfig fields, refused by name when it is not one."""
    import dataclasses

    from paploss.engine import TrainConfig

    if not text:
        return {}
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as exc:
        ap.error(f"--train {text!r} is not JSON: {exc}")
    if not isinstance(extra, dict):
        ap.error(f"--train {text!r} must be a JSON object of TrainConfig fields")
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        ap.error(f"--train: {unknown} are not TrainConfig fields")
    return extra


def summarize(report: dict, baseline: str) -> tuple[list[dict], str]:
    """Per loss: the seeds every loss finished, mean AP over them, and the paired
    difference to ``baseline`` (mean ± SE over seeds); rows best first, as a table."""
    from bench.search import paired_se

    runs = report["runs"]
    names = list(dict.fromkeys([baseline, *report["candidates"]]))
    seeds = sorted({r["seed"] for r in runs})
    ap = {(r["loss"], r["seed"]): r["metrics"]["AP"] for r in runs}
    common = [s for s in seeds if all((n, s) in ap for n in names)]
    rows = []
    for n in names:
        vals = [ap[(n, s)] for s in common]
        base = [ap[(baseline, s)] for s in common]
        rows.append({"loss": n, "search_reward": report["search_rewards"].get(n), "seeds": common, "AP": vals,
                     "mean": statistics.mean(vals) if vals else math.nan,
                     "gap": statistics.mean(vals) - statistics.mean(base) if vals else math.nan,
                     "gap_se": paired_se(vals, base)})
    rows.sort(key=lambda row: -row["mean"] if not math.isnan(row["mean"]) else math.inf)
    f = (lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}")
    lines = [f"AP x 100 ({report.get('split', 'search_train -> search_val')}), new seeds {common}; gap = paired difference to {baseline} (mean ± SE)", "",
             "| loss | search reward (its seed) | AP per new seed | mean | gap to baseline |", "|---|---|---|---|---|"]
    for row in rows:
        gap = "" if row["loss"] == baseline else f"{100 * row['gap']:+.1f} ± {f(row['gap_se']) or 'n/a'}"
        lines.append(f"| {row['loss']} | {f(row['search_reward'])} | {', '.join(f(v) for v in row['AP'])} | "
                     f"{f(row['mean'])} | {gap} |")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search", required=True, help="a benchmark search folder (bench-inputs.json, trials/)")
    ap.add_argument("--inputs", default=None,
                    help="train on the data and warm start of this bench-inputs.json instead of the search's own "
                         "(another dataset's search: the transfer of its samples)")
    ap.add_argument("--top", type=int, default=7,
                    help="how many of the best samples to train again (0: the baseline alone)")
    ap.add_argument("--baseline", default="square",
                    help="handcrafted form trained beside them (paploss.spec.HANDCRAFTED_FORMS), or 'none' (its "
                         "results are known already: CPU trainings are deterministic)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="training seeds of the new trainings")
    ap.add_argument("--inits", nargs="+", default=None, metavar="BACKBONE",
                    help="warm starts: seed s trains from the (s mod N)-th, as `python -m bench.search --warm-starts N "
                         "--select-warm-starts` trains its selection [default: the search's own warm start]")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per training")
    ap.add_argument("--jobs", type=int, default=2, help="trainings at a time (processes)")
    ap.add_argument("--budget-s", type=float, default=math.inf, help="start no training after this many seconds")
    ap.add_argument("--iterations", type=int, default=None, help="override the search's proxy length (a smoke run)")
    ap.add_argument("--only", nargs="+", default=None, metavar="rNNN-sMM",
                    help="train these samples (by trial name) instead of the --top best")
    ap.add_argument("--final-iterations", type=int, default=None,
                    help="train the benchmark's final training instead (train -> val, the 'default' bench preset's "
                         "schedule with this many iterations): does the sample win where the benchmark measures?")
    ap.add_argument("--train", default=None, metavar="JSON",
                    help='extra TrainConfig fields of every training, e.g. \'{"detach_i3": true}\' or '
                         '\'{"box_collapse": 0.3}\'')
    ap.add_argument("--split", type=int, default=0, metavar="K",
                    help="train and score on search split K (a search with --search-splits: its selection's split "
                         "is the number of rounds mod N) [0: search_train -> search_val]")
    ap.add_argument("--out", default=None, help="results JSON (rewritten after each training)")
    args = ap.parse_args(argv)
    extra = _train_fields(ap, args.train)
    if min(args.jobs, args.threads, args.iterations or 1) < 1 or min(args.top, args.split) < 0:
        ap.error(f"--jobs {args.jobs}, --threads {args.threads} and --iterations {args.iterations} must be >= 1, "
                 f"--top {args.top} and --split {args.split} >= 0")
    if args.top == 0 and args.baseline == "none" and not args.only:
        ap.error("--top 0 with --baseline none trains nothing")
    missing_inits = [p for p in args.inits or () if not Path(p).is_file()]
    if missing_inits:
        ap.error(f"--inits {missing_inits}: no such file")

    from bench.search import warm_start
    from paploss import steps, storage
    from paploss.spec import HANDCRAFTED_FORMS
    from paploss.spec import LossSpec

    if args.baseline != "none" and args.baseline not in HANDCRAFTED_FORMS:
        ap.error(f"--baseline {args.baseline!r} is not a handcrafted form; known: {list(HANDCRAFTED_FORMS)}")
    inputs, trials = load_trials(args.search)
    if args.inputs:
        if not Path(args.inputs).is_file():
            ap.error(f"--inputs {args.inputs} does not exist")
        inputs = read_inputs(Path(args.inputs))
    if args.only:
        by_name = {trial_name(t): t for t in trials}
        missing = sorted(set(args.only) - set(by_name))
        if missing:
            ap.error(f"--only {missing}: no finished trial of that name in {args.search}/trials")
        best = [by_name[n] for n in args.only]
    else:
        best = trials[: args.top]
    if args.final_iterations:
        from bench.search import BENCH_PRESETS, BenchConfig

        # the final schedule and detector do not depend on the dataset; the name only fills the preset
        folder = Path(args.inputs).parent if args.inputs else Path(args.search)
        dataset = folder.name.split("-")[1] if folder.name.startswith("bench-") else "shapes"
        p = BenchConfig(**{**BENCH_PRESETS["default"], "final_iterations": args.final_iterations}).preset(dataset)
        # a final's TrainConfig (steps.final_train): the preset's final options on train, scored on val
        config = {**steps.train_options(p.final, p.detector), "data": inputs["data"], "init": inputs["init"],
                  "train_ann": "train", "val_ann": "val"}
    else:
        train_ann, val_ann = steps.search_split_files(args.split)
        if not (Path(inputs["data"]) / "annotations" / f"{val_ann}.json").is_file():
            ap.error(f"--split {args.split}: {inputs['data']} has no annotations/{val_ann}.json")
        config = {**steps.train_options(inputs["proxy"], inputs.get("detector", "")), "data": inputs["data"],
                  "init": inputs["init"], "train_ann": train_ann, "val_ann": val_ann}
    config.update(device=args.device, num_threads=args.threads, out_dir=None, **extra)
    if args.iterations:
        config.update(iterations=args.iterations, epochs=None)
    specs = {trial_name(t): t["spec"] for t in best}
    if args.baseline != "none":
        specs = {args.baseline: LossSpec.handcrafted(args.baseline).to_json(), **specs}
    inits = args.inits or [inputs["init"]]
    report = {"search": args.search, "inputs": inputs, "inits": inits, "train": extra, "split": f"{config['train_ann']} -> {config['val_ann']}", "baseline": args.baseline, "seeds": args.seeds,
              "device": args.device, "jobs": args.jobs, "threads": args.threads,
              "candidates": [trial_name(t) for t in best],
              "search_rewards": {trial_name(t): t["reward"] for t in best},
              "search_seeds": {trial_name(t): t["seed"] for t in best}, "runs": []}
    jobs = [{"name": n, "seed": s, "spec": specs[n], "config": {**config, "init": warm_start(inits, s)}}
            for s in args.seeds for n in specs]
    t0 = time.time()
    deadline = t0 + args.budget_s
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_train, j, deadline): j for j in jobs}
        for fut in cf.as_completed(futures):
            j, res = futures[fut], fut.result()
            if res is None:
                print(f"{j['name']} seed {j['seed']}: left out (past --budget-s)", flush=True)
                continue
            report["runs"].append(res)
            report["wall_s"] = time.time() - t0
            print(f"{res['loss']} seed {res['seed']}: AP {res['metrics']['AP']:.4f} ({res['seconds']:.0f} s, "
                  f"{time.time() - t0:.0f} s in)", flush=True)
            if args.out:
                storage.write_json(args.out, report)
    rows, table = summarize(report, args.baseline) if args.baseline != "none" else ([], "")
    report["summary"] = rows
    if args.out:
        storage.write_json(args.out, report)
    print(table)
    return report


if __name__ == "__main__":
    main()
