"""Stage 4, selection (optional; off by default: SPEC §3's searched loss is μ).

A search rewards each sampled loss by one proxy training with one seed; near a good
loss the differences between samples are of the size of one seed's luck, and the
policy's mean may settle elsewhere. The selection stage trains the ``top`` best
samples of the whole search again with the ``seeds`` given (never the trials' own
seed) on the same proxy, and the searched loss becomes the candidate with the best
mean reward over those new trainings.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from paploss import storage
from paploss.steps.errors import SearchFailed, StepError
from paploss.steps.options import _SearchOptions, check_select_rank, check_selection
from paploss.steps.state import _read_state, _round_runs, _split_field
from paploss.steps.work import SELECTED_STATE, At, _client, _log, cache_key, search_dir

def selection_trials(state: str, top: int, seeds: Sequence[int], rank: str = "reward") -> list[str]:
    """The re-evaluation trials: the ``top`` distinct θ of the whole search with the
    highest rewards (failed trials left out; ``rank`` ``round``: the highest rewards
    relative to their round's mean, :data:`SELECT_RANKS`), each with every seed of ``seeds``.

    Trials are numbered after the search's last round (``round`` = the number of
    rounds, ``sample`` = candidate × len(seeds) + seed index) and carry
    ``candidate``, ``search_round``, ``search_sample`` and ``search_reward``; in a
    search over n search splits, also the ``split`` a round numbered so would take
    (the number of rounds mod n: with n > rounds, one no round scored on)."""
    doc, c = _read_state(state)
    check_selection(int(top), seeds)
    check_select_rank(rank)
    if int(top) == 0:
        return []
    if not c.history:
        raise StepError(f"the state {state} has no finished round: nothing to select from")
    finished = [(reward, rec.round, i, [float(v) for v in theta]) for rec in c.history
                for i, (theta, reward) in enumerate(zip(rec.thetas, rec.rewards)) if i not in rec.failed]
    by_round: dict[int, list[float]] = {}
    for reward, rnd, _, _ in finished:
        by_round.setdefault(rnd, []).append(reward)
    offset = {rnd: sum(own) / len(own) if rank == "round" else 0.0 for rnd, own in by_round.items()}
    ranked = sorted(finished, key=lambda x: (-(x[0] - offset[x[1]]), x[1], x[2]))
    picked: list[tuple] = []
    for item in ranked:
        if len(picked) == int(top):
            break
        if all(item[3] != p[3] for p in picked):
            picked.append(item)
    if not picked:
        raise StepError(f"the search in {state} has no finished trial to select from")
    seeds = [int(x) for x in seeds]
    opts = _SearchOptions.of(doc)
    for reward, rnd, i, theta in picked:
        for own in _round_runs(c, rnd, opts)[0]:
            if own in seeds:
                raise StepError(f"select_seeds={seeds} holds {own}, the training seed of candidate r{rnd:03d}-s{i:02d}: "
                                "it was picked by that seed's reward, so it would be measured with its own luck")
    split = _split_field(c.round, opts.search_splits)
    return [json.dumps({"round": c.round, "sample": k * len(seeds) + j, "theta": theta, "seed": seed,
                        "candidate": k, "search_round": rnd, "search_sample": i, "search_reward": reward, **split})
            for k, (reward, rnd, i, theta) in enumerate(picked) for j, seed in enumerate(seeds)]


def select_loss(
    state: str,
    results: Sequence[str | Mapping[str, Any]],
    work: str,
    search_name: str,
    tracking: Mapping[str, str] | None = None,
    rank: str = "reward",
) -> str:
    """The candidate with the best mean reward over its re-evaluation trials
    (a failed one counts as reward 0, SPEC §3); writes the search state with that
    choice (and ``rank``, how :func:`selection_trials` picked the candidates) under
    ``"selected"`` to ``state/selected-<key>.json`` and returns its URI.
    :func:`searched_spec` of that state is the selected loss. Logs the candidates'
    mean rewards and ``selection.json`` on the parent MLflow run."""
    check_select_rank(rank)
    doc, c = _read_state(state)
    parsed = [json.loads(x) if isinstance(x, str) else dict(x) for x in results]
    if not parsed:
        raise StepError("select_loss got no trial results")
    wrong = sorted({int(p["round"]) for p in parsed} - {c.round})
    if wrong:
        raise StepError(f"results are for round(s) {wrong}, not the selection after round {c.round} of {state}")
    candidates: list[dict] = []
    for p in sorted(parsed, key=lambda d: int(d["sample"])):
        theta = [float(v) for v in p["theta"]]
        cand = next((x for x in candidates if x["theta"] == theta), None)
        if cand is None:
            cand = {"theta": theta, "rewards": {}, "failed": 0}
            candidates.append(cand)
        failed = bool(p.get("failed")) or p.get("reward") is None
        cand["rewards"][str(int(p["seed"]))] = 0.0 if failed else float(p["reward"])
        cand["failed"] += int(failed)
    for cand in candidates:
        cand["mean_reward"] = sum(cand["rewards"].values()) / len(cand["rewards"])
    pick = max(range(len(candidates)), key=lambda k: candidates[k]["mean_reward"])  # the first on ties
    best = candidates[pick]
    doc["selected"] = {"theta": best["theta"], "spec": c.spec_of(best["theta"]).to_json(), "candidate": pick,
                       "mean_reward": best["mean_reward"], "from_state": state, "candidates": candidates, "rank": rank}
    # rank "reward" (the default) adds nothing to the key, as before ranks existed
    key = cache_key(work, At(state), [[c["theta"], c["rewards"]] for c in candidates],
                    *([rank] if rank != "reward" else []))
    out = storage.join(search_dir(work, search_name), "state", SELECTED_STATE.format(key=key))
    storage.write_json(out, doc)
    _log(f"selection: candidate {pick} of {len(candidates)}, mean reward "
         f"{best['mean_reward']:.4f} over seeds {sorted(best['rewards'], key=int)}")
    if tracking is not None:
        from paploss import tracking as tr

        tr.record_selection(tracking, search_name, candidates, doc["selected"])
    return out

