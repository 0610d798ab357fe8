"""Which sampled losses collapse in a search, and why (docs/research/search-quality.md).

    python -m bench.collapse SEARCH_DIR [SEARCH_DIR ...]

``SEARCH_DIR`` is a search's folder (``steps.search_dir``: ``trials/rNNN-sMM.json`` hold
every finished trial's spec and reward). Prints, per search, the reward table of
``python -m bench.search`` (mean, max and collapsed trials per round, from the trial files,
so an unfinished round shows too); the mean over the collapsed and the other
trials of ``mean H2`` and ``mean H1`` on x in [0.4, 0.6] and of their ratio, and the
range of their worse-box gain (:func:`worse_box_gain`); and the trials whose stored box
quality record (trials trained since it is kept) fell below 0.5.

In the separate searches on both datasets, every trial with mean H2 above 0.3 there
collapsed, and the same samples with H1 raised to the identity collapsed too, while no
trial of the shared searches collapsed. Why: with the scores near each other, one positive's loss as a function of its
box quality u is about ``(1 - I1(u)) + R I3(u)``, R = H2/H1 in the middle. Where
``R I3'(u) > I1'(u)`` worse boxes lower it: the boxes are trained worse (u falls from
0.7 to 0.4 or below within tens of iterations), I3(u) goes to 0 and takes every
classification gradient with it. The shared form has I3 = I1 and R <= 1, so it never
can. ``TrainConfig.box_collapse`` (``python -m bench.search --box-collapse``) stops such trials early.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench.search import COLLAPSED, reward_table
from paploss import steps


def mid_means(spec_json: str) -> tuple[float, float]:
    """``(mean H2, mean H1)`` over x in [0.4, 0.6] (scores within ±0.2 of each other)."""
    import torch

    from paploss.spec import LossSpec

    spec = LossSpec.from_json(spec_json)
    x = torch.linspace(0.4, 0.6, 21, dtype=torch.float64)
    return float(spec.function("H2")(x).mean()), float(spec.function("H1")(x).mean())


def _ratio(h2: float, h1: float) -> float:
    return h2 / max(h1, 1e-3)


def h2_over_h1(spec_json: str) -> float:
    """``mean H2 / mean H1`` over x in [0.4, 0.6]."""
    return _ratio(*mid_means(spec_json))


def worse_box_gain(spec_json: str) -> float:
    """How much worse boxes can lower one positive's loss, read from θ alone:
    ``l(u) = (1 - I1(u)) + R I3(u)`` with R = :func:`h2_over_h1` (the ranking ratio while
    the scores are near each other), and the gain ``l(1) - min_u l(u)`` (0 when the best
    box is the best for the loss, as for every shared loss, whose R <= 1 and I3 = I1)."""
    import torch

    from paploss.spec import LossSpec

    spec = LossSpec.from_json(spec_json)
    u = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    r = h2_over_h1(spec_json)
    loss = 1.0 - spec.function("I1")(u) + r * spec.function("I3")(u)
    return float(loss[-1] - loss.min())


def box_quality_line(trial: dict, below: float = 0.5) -> str | None:
    """For a trial that stored its positives' mean box quality u per iteration
    (``box_quality``): where u first fell below ``below`` and its lowest value, or
    ``None`` when it never did (or the trial has no record)."""
    u = list(trial.get("box_quality") or ())
    first = next((i for i, q in enumerate(u) if q < below), None)  # NaN (a batch without positives) is not below
    if first is None:
        return None
    stop = ", stopped early (box collapse)" if trial.get("box_collapsed") else ""
    return (f"r{int(trial['round']):03d}-s{int(trial['sample']):02d}: u below {below} from iteration {first}, "
            f"lowest {min(q for q in u if q == q):.2f}, reward {float(trial['reward'] or 0.0):.4f}{stop}")


def main(argv: list[str] | None = None) -> None:
    dirs = (sys.argv[1:] if argv is None else argv) or ["--help"]
    if dirs[0] in ("-h", "--help"):
        print(__doc__)
        return
    for d in dirs:
        trials = steps.trial_results(d)
        rounds: dict[int, list[float]] = {}
        for t in trials:
            rounds.setdefault(int(t["round"]), []).append(float(t["reward"]))
        print(f"## {d}: {len(trials)} trials\n")
        print(reward_table({Path(d).name: [rounds[r] for r in sorted(rounds)]}))
        groups: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
        for t in trials:
            groups[float(t["reward"]) < COLLAPSED].append((*mid_means(t["spec"]), worse_box_gain(t["spec"])))
        for collapsed, values in groups.items():
            if values:
                h2, gain = [v[0] for v in values], [v[2] for v in values]
                print(f"\n{'collapsed' if collapsed else 'other'} trials ({len(values)}), on x in [0.4, 0.6]: "
                      f"mean H2 {statistics.mean(h2):.2f} (from {min(h2):.2f} to {max(h2):.2f}), "
                      f"mean H1 {statistics.mean(v[1] for v in values):.2f}, "
                      f"mean H2/H1 {statistics.mean(_ratio(*v[:2]) for v in values):.2f}; "
                      f"worse-box gain from {min(gain):.2f} to {max(gain):.2f}", end="")
        lines = [line for t in trials if (line := box_quality_line(t))]
        if lines:
            print("\n\nbox quality u of the positives fell below 0.5 in:\n" + "\n".join(lines), end="")
        print("\n")


if __name__ == "__main__":
    main()
