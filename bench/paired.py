"""The paired gap between two losses' final trainings, each read from a benchmark's
``bench_search.json`` (the results of ``python -m bench.search``):

    python -m bench.paired A.json:DATASET:LOSS B.json:DATASET:LOSS [--metric AP75] [--minus C D]

Seed k of A is set against seed k of B (the same data, warm start and seed when both
come from runs with the same ``--seeds``); over the first n seeds both have, it prints
the means, the mean gap ± its standard error (``bench.search.paired_se``), how many
seeds A won, and A's AP per seed (AP × 100; ``--metric`` AP50 or AP75 instead).
``--minus C D`` sets the gap A − B against the gap C − D seed by seed (how much a
gap grew, e.g. from 1200- to 3000-iteration finals): it prints that change's mean ±
its standard error and in how many seeds it is positive.
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench.search import paired_se


METRICS = ("AP", "AP50", "AP75")


def read_ap(arg: str, metric: str = "AP") -> list[float]:
    """``metric`` (AP, AP50 or AP75) × 100 per seed of ``PATH:DATASET:LOSS``; a
    ``ValueError`` naming what is missing."""
    parts = arg.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{arg!r}: expected PATH:DATASET:LOSS, e.g. docs/bench_search.json:digits:searched")
    path, dataset, loss = parts
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a bench_search.json ({e})") from None
    if dataset not in doc:
        raise ValueError(f"{path}: no dataset {dataset!r} (it has {sorted(doc)})")
    if loss not in doc[dataset] or not doc[dataset][loss].get(metric):
        raise ValueError(f"{path}: dataset {dataset!r} has no {metric} for loss {loss!r} "
                         f"(it has {sorted(doc[dataset])})")
    return [100 * v for v in doc[dataset][loss][metric]]


def report(a: list[float], b: list[float]) -> str:
    """The two lines the command prints for A's and B's AP per seed."""
    n = min(len(a), len(b))
    if n < 2:
        raise ValueError(f"a paired gap needs 2 seeds or more in both; A has {len(a)}, B has {len(b)}")
    a, b = a[:n], b[:n]
    gaps = [x - y for x, y in zip(a, b)]
    return (f"A {statistics.mean(a):.2f} - B {statistics.mean(b):.2f} over {n} seeds: "
            f"{statistics.mean(gaps):+.2f} ± {paired_se(a, b):.2f}, {sum(g > 0 for g in gaps)} won\n"
            "A per seed: " + ", ".join(f"{v:.2f}" for v in a))


def change(a: list[float], b: list[float], c: list[float], d: list[float]) -> str:
    """The line ``--minus C D`` adds: the per-seed change of the gap A − B from C − D."""
    n = min(map(len, (a, b, c, d)))
    if n < 2:
        raise ValueError(f"a change of paired gaps needs 2 seeds or more in all four; the fewest has {n}")
    ab, cd = ([x - y for x, y in zip(p[:n], q[:n])] for p, q in ((a, b), (c, d)))
    diffs = [x - y for x, y in zip(ab, cd)]  # the two gaps are themselves paired seed by seed
    return (f"(A - B) - (C - D) over {n} seeds: {statistics.mean(diffs):+.2f} ± {paired_se(ab, cd):.2f}, "
            f"{sum(x > 0 for x in diffs)} larger")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", metavar="A.json:DATASET:LOSS")
    ap.add_argument("b", metavar="B.json:DATASET:LOSS")
    ap.add_argument("--metric", choices=METRICS, default="AP", help="Which COCO metric (default: AP).")
    ap.add_argument("--minus", nargs=2, metavar=("C.json:DATASET:LOSS", "D.json:DATASET:LOSS"),
                    help="Also print how the gap A - B changed from the gap C - D, seed by seed.")
    args = ap.parse_args(argv)
    try:
        a, b = read_ap(args.a, args.metric), read_ap(args.b, args.metric)
        lines = [report(a, b)]
        if args.minus:
            lines.append(change(a, b, *(read_ap(x, args.metric) for x in args.minus)))
    except (OSError, ValueError) as e:  # a file that cannot be read, or lacks what was asked for
        ap.error(str(e))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
