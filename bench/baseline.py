"""A search's rewards against a handcrafted loss trained as its proxy trials were.

A reward says little on its own: with ``--search-splits`` each round scores on other
images, and a proxy's AP moves with its training seed and warm start. ``python -m bench.search
--reward-baseline FORM`` trains the handcrafted form FORM (the PAP loss with its exact
functions, with ``--detach-i3`` where the run has it) as each round's samples were
trained (the round's seeds, split and warm starts), and as the selection's candidates
were, and the report and MLflow give each round's mean and best reward, and each
candidate's, minus FORM's: did the search find a loss better than FORM where it looked?

One training per distinct (warm start, seed, split): a search over one split with a
fixed seed needs one for all its rounds, one over five splits one per split. Each is
cached in the dataset's ``baseline/`` folder under a key of its inputs. BENCHMARKS.md,
issue 8, findings 30 to 34 did this by hand with ``bench.reeval --top 0 --split K``.
"""

from __future__ import annotations

import statistics
from concurrent.futures import Executor
from typing import Any, Iterable, Mapping, Sequence

from bench.search import _log, platform_info, warm_start
from paploss import presets, steps, storage

__all__ = ["Run", "round_trainings", "selection_split", "round_runs", "selection_runs", "cached", "train", "measure",
           "gaps", "gaps_text"]

#: One proxy training of the baseline: (warm start, training seed, search split).
Run = tuple[str, int, int]


def round_trainings(state: str) -> list[list[dict]]:
    """Per finished round of the search in ``state``: the proxy trainings that each of
    its sampled θ had, as ``{"seed", "split", "repeat"}``: the search's seed, one per
    reward seed (``steps.reward_seeds_of``; the j-th has ``repeat`` j), on split round
    mod the search's splits."""
    doc, c = storage.read_json(state), steps.load_controller(state)
    seeds = steps.reward_seeds_of(c.config.seed, int(doc.get("reward_seeds", 1)))
    splits = int(doc.get("search_splits", 1))
    return [[{"seed": seed, "split": rec.round % splits, "repeat": j} for j, seed in enumerate(seeds)]
            for rec in c.history]


def selection_split(state: str) -> int:
    """The search split a selection after the search in ``state`` trains and scores on
    (``steps.selection_trials``: the number of rounds mod the search's splits)."""
    return steps.load_controller(state).round % int(storage.read_json(state).get("search_splits", 1))


def round_runs(state: str, inits: Sequence[str]) -> list[list[Run]]:
    """Per finished round of the search in ``state``: the trainings each of its samples
    had (:func:`round_trainings`), the j-th reward seed from ``inits[j mod len(inits)]``
    (the bench's rule, ``bench.search.WarmStarts``)."""
    return [[(warm_start(inits, t["repeat"]), int(t["seed"]), int(t["split"])) for t in trainings]
            for trainings in round_trainings(state)]


def selection_runs(state: str, inits: Sequence[str], seeds: Sequence[int]) -> dict[int, Run]:
    """``{seed: run}``: the selection's trainings after the search in ``state``, seed s
    from ``inits[s mod len(inits)]`` (give the search's warm start alone for a selection
    on it), on the selection's split (:func:`selection_split`)."""
    split = selection_split(state)
    return {int(s): (warm_start(inits, int(s)), int(s), split) for s in seeds}


def cached(p: presets.Preset, data: str, run: Run, form: str, work: str) -> tuple[str, str, dict | None]:
    """(key, file, cached result or None) of ``form`` trained as ``run`` on the proxy
    of preset ``p``, in the dataset folder ``work``'s ``baseline/``."""
    from paploss.functions import HANDCRAFTED_VERSION

    init, seed, split = run
    key = steps.cache_key(work, "bench-baseline", steps.At(data), steps.At(init), form, seed, split,
                          steps.plain(dict(p.proxy)), p.detector, HANDCRAFTED_VERSION)
    uri = storage.join(work, "baseline", f"{form}-split{split}-seed{seed}-{key}.json")
    done = storage.read_json(uri) if storage.exists(uri) else None
    return key, uri, done if done is not None and done.get("key") == key else None


def train(p: presets.Preset, data: str, run: Run, form: str, work: str) -> dict:
    """``form`` trained as ``run`` on the proxy of ``p`` (``steps.proxy_config``: search
    split ``run[2]``'s search-train, scored on its search-val); its result, cached
    (written under a temporary name, then renamed)."""
    from paploss.engine import train as run_training
    from paploss.spec import LossSpec

    key, out, done = cached(p, data, run, form, work)
    if done is not None:
        return done
    init, seed, split = run
    cfg, metric = steps.proxy_config(steps.train_options(p.proxy, p.detector), data, split,
                                     LossSpec.handcrafted(form), init, seed)
    res = run_training(cfg, progress=False)
    metrics = {k: float(v) for k, v in res.metrics.items()}
    doc = {"key": key, "form": form, "seed": seed, "split": split, "init": storage.location_id(init, work),
           "metric": metric, "reward": None if res.diverged else metrics[metric], "metrics": metrics,
           "diverged": bool(res.diverged), "seconds": float(res.seconds), "platform": platform_info()}
    storage.write_json(out, doc)
    return doc


def measure(pool: Executor | None, p: presets.Preset, data: str, work: str, form: str,
            runs: Iterable[Run]) -> dict[Run, float | None]:
    """``form``'s reward for each of ``runs`` (None: diverged, or not cached when ``pool``
    is None, a report-only run); the trainings not cached yet run in ``pool``."""
    runs = list(dict.fromkeys(runs))
    if pool is None:
        docs = {run: cached(p, data, run, form, work)[2] for run in runs}
    else:
        futures = {run: pool.submit(train, p, data, run, form, work) for run in runs}
        docs = {}
        for (init, seed, split), fut in futures.items():  # logged as each one finishes, in order
            docs[(init, seed, split)] = doc = fut.result()
            _log(f"baseline {form} on split {split}, seed {seed}, warm start {init}: reward "
                 f"{doc['reward'] if doc['reward'] is None else round(doc['reward'], 4)} ({doc['seconds']:.0f}s)")
    return {run: doc.get("reward") if doc else None for run, doc in docs.items()}


def gaps(state: Mapping[str, Any], rounds: Sequence[Sequence[Run]], selection: Mapping[int, Run],
         rewards: Mapping[Run, float | None]) -> dict[str, Any]:
    """The search whose state file holds ``state`` (its content) against the baseline whose
    ``rewards`` (``measure``) were trained as its rounds (``round_runs``) and its selection
    (``selection_runs``) were::

        {"rounds": [per round {"baseline", "mean", "best", "above", "samples"}, or None where
                    a training of the baseline is missing or diverged],
         "candidates": [per selection candidate its mean reward minus the baseline's over
                        the selection's seeds, or None], or [] without a selection}

    ``baseline``: the baseline's reward, the mean over the round's trainings, as a
    sample's reward is the mean over its reward seeds; ``mean``, ``best``: the round's
    mean and best reward minus it; ``above``: how many samples beat it."""
    history = state["controller"]["history"]
    out: dict[str, Any] = {"rounds": [], "candidates": []}
    for rec, runs in zip(history, rounds):
        base = [rewards.get(run) for run in runs]
        got = [float(x) for x in rec["rewards"]]
        if not got or any(b is None for b in base):
            out["rounds"].append(None)
            continue
        b = statistics.mean(base)
        out["rounds"].append({"baseline": b, "mean": statistics.mean(got) - b, "best": max(got) - b,
                              "above": sum(x > b for x in got), "samples": len(got)})
    for c in (state.get("selected") or {}).get("candidates", []):
        pairs = [(float(r), rewards.get(selection.get(int(s)))) for s, r in c["rewards"].items()]
        out["candidates"].append(None if not pairs or any(b is None for _, b in pairs)
                                 else statistics.mean(r - b for r, b in pairs))
    return out


def gaps_text(form: str, found: Mapping[str, Mapping[str, Any]]) -> str:
    """The report's section: per search (``{label: gaps(...)}``) its rounds and selection
    candidates against ``form`` (AP × 100 on each round's own search-val)."""
    if not found:
        return ""
    f = (lambda v: "–" if v is None else f"{100 * v:+.2f}")
    lines = [f"\n\n## Rewards against `{form}` trained as the proxy trials were\n",
             f"AP × 100 on search-val: `{form}` trained with each round's seeds, split and warm starts "
             "(and the selection's), and each round's mean and best reward minus its.\n",
             f"| search | round | `{form}` | mean − `{form}` | best − `{form}` | samples above `{form}` |",
             "|---|---|---|---|---|---|"]
    for label, g in found.items():
        for r, row in enumerate(g["rounds"]):
            lines.append(f"| {label} | {r + 1} | – | – | – | – |" if row is None else
                         f"| {label} | {r + 1} | {100 * row['baseline']:.2f} | {f(row['mean'])} | {f(row['best'])} | "
                         f"{row['above']}/{row['samples']} |")
    sel = [f"- {label}: {', '.join(f(x) for x in g['candidates'])}" for label, g in found.items() if g["candidates"]]
    if sel:
        lines += ["", f"The selection's candidates (its order), mean reward minus `{form}`'s over the selection's "
                      "seeds:", "", *sel]
    return "\n".join(lines)
