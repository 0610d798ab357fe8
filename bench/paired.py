"""The paired gap between two losses' final trainings, each read from a benchmark's
``bench_search.json`` (BENCHMARKS.md, issue 8, from finding 27 on):

    python -m bench.paired A.json:DATASET:LOSS B.json:DATASET:LOSS

Seed k of A is set against seed k of B (the same data, warm start and seed when both
come from runs with the same ``--seeds``); over the first n seeds both have, it prints
the means, the mean gap ± its standard error (``bench.search.paired_se``), how many
seeds A won, and A's AP per seed (AP × 100).
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench.search import paired_se


def read_ap(arg: str) -> list[float]:
    """AP × 100 per seed of ``PATH:DATASET:LOSS``; a ``ValueError`` naming what is missing."""
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
    if loss not in doc[dataset] or not doc[dataset][loss].get("AP"):
        raise ValueError(f"{path}: dataset {dataset!r} has no AP for loss {loss!r} (it has {sorted(doc[dataset])})")
    return [100 * v for v in doc[dataset][loss]["AP"]]


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", metavar="A.json:DATASET:LOSS")
    ap.add_argument("b", metavar="B.json:DATASET:LOSS")
    args = ap.parse_args(argv)
    try:
        print(report(read_ap(args.a), read_ap(args.b)))
    except (OSError, ValueError) as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
