"""Which sampled losses collapse in a search, and why (BENCHMARKS.md, issue 8).

    python -m bench.collapse SEARCH_DIR [SEARCH_DIR ...]

``SEARCH_DIR`` is a search's folder (``steps.search_dir``: ``trials/*.json`` holds
every finished trial's spec and reward). Prints, per search, the reward table of
``paploss bench`` (mean, max and collapsed trials per round, from the trial files,
so an unfinished round shows too) and the mean over the collapsed and the other
trials of the ratio ``mean H2 / mean H1`` on x in [0.4, 0.6]: where it is above 1,
``num / den`` starts above 1 and the ``I3(u) · num / den`` term pushes box quality
down (docs/search.md).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench.search import COLLAPSED, reward_table


def h2_over_h1(spec_json: str) -> float:
    """``mean H2 / mean H1`` over x in [0.4, 0.6] (scores within ±0.2 of each other)."""
    import torch

    from paploss.spec import LossSpec

    spec = LossSpec.from_json(spec_json)
    x = torch.linspace(0.4, 0.6, 21, dtype=torch.float64)
    h1 = float(spec.function("H1")(x).mean())
    return float(spec.function("H2")(x).mean()) / max(h1, 1e-3)


def main(argv: list[str] | None = None) -> None:
    dirs = (sys.argv[1:] if argv is None else argv) or ["--help"]
    if dirs[0] in ("-h", "--help"):
        print(__doc__)
        return
    for d in dirs:
        trials = [json.loads(p.read_text()) for p in sorted(Path(d, "trials").glob("*.json"))]
        rounds: dict[int, list[float]] = {}
        for t in trials:
            rounds.setdefault(int(t["round"]), []).append(float(t["reward"]))
        print(f"## {d}: {len(trials)} trials\n")
        print(reward_table({Path(d).name: [rounds[r] for r in sorted(rounds)]}))
        ratio = {True: [], False: []}
        for t in trials:
            ratio[float(t["reward"]) < COLLAPSED].append(h2_over_h1(t["spec"]))
        for collapsed, values in ratio.items():
            if values:
                print(f"\n{'collapsed' if collapsed else 'other'} trials ({len(values)}): "
                      f"mean H2/H1 on x in [0.4, 0.6] = {statistics.mean(values):.2f}", end="")
        print("\n")


if __name__ == "__main__":
    main()
