"""Stage 3, the search's controller: its start (:func:`init_search`) and one PPO
update per round (:func:`controller_update`, SPEC §3)."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any, Mapping, Sequence

from paploss import storage
from paploss.steps.errors import SearchExists, SearchFailed, StepError
from paploss.steps.options import _SearchOptions, _check_name
from paploss.steps.state import _read_state, _round_runs, _state_doc, _trials_of
from paploss.steps.trials import _trials_noise, reward_noise
from paploss.steps.work import _client, _log, plain, search_dir, state_uri

def check_search(
    work: str,
    search_name: str,
    rounds: int,
    samples: int,
    *,
    seed: int = 0,
    controller: Mapping[str, Any] | None = None,
    trial_seeds: str = "fixed",
    reward_seeds: int = 1,
    search_splits: int = 1,
    detector: str = "",
):
    """The controller a search starts from, and whether its first state exists: checks,
    before any work, that the controller options build a controller (``sigma`` > 0,
    known option names, ...) and that a search of that name in ``work``, if there is
    one, has these settings (its controller options, seed, trial seeds, reward seeds
    and splits). ``detector``: the trials' detector; a detector with several PAP-loss
    heads (:func:`paploss.spec_set.head_names`) gives the controller one block of θ per
    head ("" = one loss). Returns ``(controller, exists)``; raises :class:`StepError`
    naming the option, or :class:`SearchExists` naming what differs. Reads, never writes."""
    from paploss.search import Controller

    _check_name(search_name)
    if not isinstance(controller or {}, Mapping):
        raise StepError(f"controller options must be a JSON object, got {controller!r}")
    options = plain(dict(controller or {}))
    for bad in ("rounds", "seed", "samples"):
        if bad in options:
            raise StepError(f"controller option {bad!r} is a search parameter: pass it as {bad}=")
    options = _with_heads(options, detector)
    opts = _SearchOptions(trial_seeds, reward_seeds, search_splits)
    try:
        c = Controller(rounds=int(rounds), seed=int(seed), samples=int(samples), **options)
    except TypeError as exc:
        import inspect

        known = sorted(k for k in inspect.signature(Controller).parameters if k not in ("rounds", "seed", "samples"))
        raise StepError(f"controller options {sorted(options)}: {exc}; known: {known}") from None
    except ValueError as exc:
        raise StepError(f"controller options {options}: {exc}") from None
    uri = state_uri(work, search_name, 0)
    if not storage.exists(uri):
        return c, False
    doc, _ = _read_state(uri)
    existing, fresh = doc["controller"], c.state_dict()
    had_options, options_now = existing.get("options", {}), fresh["options"]
    diff = [f"{k}={had_options.get(k)!r} there, {options_now.get(k)!r} now"
            for k in sorted(set(had_options) | set(options_now)) if had_options.get(k) != options_now.get(k)]
    diff += [f"its starting {what} differs" for what, key in (("mean", "logits"), ("sigma", "sigma"))
             if existing.get(key) != fresh[key]]
    if diff:
        raise SearchExists(
            f"search {search_name!r} already exists in {work} with other controller options "
            f"({'; '.join(diff)}); choose another search_name"
        )
    had_opts = _SearchOptions.of(doc)
    for option in (f.name for f in fields(_SearchOptions)):
        had, now = getattr(had_opts, option), getattr(opts, option)
        if had != now:
            raise SearchExists(f"search {search_name!r} already exists in {work} with {option}={had!r}, "
                               f"not {now!r}; choose another search_name")
    return c, True


def _with_heads(options: dict, detector: str) -> dict:
    """The controller options with the heads of ``detector`` (none for a one-loss detector)."""
    from paploss.spec_set import head_names

    try:
        heads = list(head_names(detector)) if detector else []
    except ValueError as exc:
        raise StepError(f"detector: {exc}") from None
    if "heads" in options and list(options["heads"] or []) != heads:
        raise StepError(f"controller option heads={options['heads']!r} does not fit detector {detector or '(default)'!r}, "
                        f"whose PAP-loss heads are {heads}")
    return {**options, "heads": heads} if heads else options


def trials_detector(params: Mapping[str, Any] | None) -> str:
    """The detector the proxy trials train, as a search's ``params`` record it: the
    ``detector`` parameter, else the ``proxy`` options' own (:func:`train_options`'s
    rule), "" when neither names one (the engine's default, one loss)."""
    from paploss.steps.options import train_options

    params = dict(params or {})
    proxy = params.get("proxy") if isinstance(params.get("proxy"), Mapping) else {}
    return str(train_options(proxy, str(params.get("detector") or "")).get("detector") or "")


def init_search(
    work: str,
    search_name: str,
    rounds: int,
    samples: int,
    seed: int = 0,
    controller: Mapping[str, Any] | None = None,
    tracking: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    trial_seeds: str = "fixed",
    reward_seeds: int = 1,
    search_splits: int = 1,
    detector: str | None = None,
) -> dict:
    """Controller state before round 0 and round 0's trials.

    ``controller``: options of :class:`paploss.search.Controller` (``sigma``,
    ``lr``, ``steps``, ``clip_eps``, ``functions``, ``grad_scale``, ``shared``,
    ``fixed``, ``min_reward``, ``mu``). Opens (or, on resume, reopens) the
    search's parent run in MLflow with ``params``. ``trial_seeds``: the proxy
    trials' training seed, ``fixed`` (``seed`` for every trial; the only choice, kept in
    the state files). ``reward_seeds``: how many proxy trainings, with seeds
    REWARD_SEED_STRIDE apart, each sampled θ gets; its reward is their mean (less
    of one training's luck in the reward, at that many times the cost).
    ``search_splits``: how many search splits (:func:`prepare_data`'s, the same
    number) the rounds cycle through: round r's trials train on split r mod n and
    are scored on its search-val, so that the search does not fit one set of
    search-val images. ``detector``: the trials' detector, whose PAP-loss heads set θ's
    length (41 numbers per head: 82 for a Faster R-CNN); None takes the one ``params``
    record (:func:`trials_detector`: the pipeline's run-time ``detector`` parameter, else
    the proxy options'). Returns ``{"state": uri, "trials": [json, …]}``.
    """
    if detector is None:
        detector = trials_detector(params)
    c, exists = check_search(work, search_name, rounds, samples, seed=seed, controller=controller,
                             trial_seeds=trial_seeds, reward_seeds=reward_seeds, search_splits=search_splits,
                             detector=detector)
    options = _with_heads(plain(dict(controller or {})), detector)
    opts = _SearchOptions(trial_seeds, reward_seeds, search_splits)
    uri = state_uri(work, search_name, 0)
    if not exists:
        storage.write_json(uri, _state_doc(c, 0, search_name, opts))
    if tracking is not None:
        from paploss import tracking as tr

        tr.open_search(tracking, search_name,
                       {**dict(params or {}), "rounds": rounds, "samples": samples, "seed": seed,
                        "trial_seeds": trial_seeds, "reward_seeds": reward_seeds, "search_splits": search_splits,
                        "controller": options})
    each = f", {reward_seeds} trainings each" if reward_seeds > 1 else ""
    cycle = f", {search_splits} search splits" if search_splits > 1 else ""
    _log(f"search {search_name}: {rounds} rounds x {samples} samples{each}{cycle}, D={c.dim}")
    return {"state": uri, "trials": _trials_of(c, samples, opts)}


def controller_update(
    state: str,
    results: Sequence[str | Mapping[str, Any]],
    work: str,
    search_name: str,
    max_failed_trials: int = 0,
    tracking: Mapping[str, str] | None = None,
) -> dict:
    """One PPO round (SPEC §3) on the round's trial results; returns the next state
    and the next round's trials, ``{"state": uri, "trials": [...], "round": r,
    "mean_reward", "max_reward", "failed_trials"}``.

    With the search's ``reward_seeds`` = n, a sampled θ's reward is the mean of its n
    trials' rewards. Failed and diverged trials get the controller's ``min_reward``
    (a θ with any failed trial among its n). When the
    search's failed trials exceed ``max_failed_trials`` it stops with
    ``SearchFailed`` (and no new state is written). Logs the round's metrics and
    figures on the parent MLflow run.
    """
    doc, c = _read_state(state)  # a corrupt state is one line naming the file
    parsed = sorted((json.loads(x) if isinstance(x, str) else dict(x) for x in results), key=lambda d: d["sample"])
    rounds_seen = {int(p["round"]) for p in parsed}
    if rounds_seen != {c.round}:
        raise StepError(f"results are for round(s) {sorted(rounds_seen)} but the state {state} is at round {c.round}")
    r = c.round
    # state files written before trial_seeds (reward_seeds) existed: one trial of the search's seed per θ
    opts = _SearchOptions.of(doc)
    trial_seeds, reward_seeds, search_splits = opts.trial_seeds, opts.reward_seeds, opts.search_splits
    if len(parsed) % reward_seeds:
        raise StepError(f"round {r} has {len(parsed)} results, not a multiple of the search's reward_seeds={reward_seeds}")
    samples = len(parsed) // reward_seeds
    expected = c.sample(samples).tolist()
    seeds, split_field = _round_runs(c, r, opts)
    for k, p in enumerate(parsed):
        if int(p["sample"]) != k:
            raise StepError(f"round {r} has no result of sample {k} (samples {[int(q['sample']) for q in parsed]})")
        if any(abs(a - b) > 1e-12 for a, b in zip(p["theta"], expected[k // reward_seeds])):
            raise StepError(f"result of round {r} sample {p['sample']} is for another θ than the controller drew")
    if [int(p["seed"]) for p in parsed] != seeds * samples:
        want = f"{seeds} (trial_seeds={trial_seeds!r}, reward_seeds={reward_seeds})" if reward_seeds > 1 \
            else f"{seeds[0]} (trial_seeds={trial_seeds!r})"
        raise StepError(f"results of round {r} were trained with seeds {sorted({int(p['seed']) for p in parsed})}, "
                        f"not the search's {want}")
    split = split_field.get("split", 0)
    if any(int(p.get("split", 0)) != split for p in parsed):
        raise StepError(f"results of round {r} were scored on search splits {sorted({int(p.get('split', 0)) for p in parsed})}, "
                        f"not split {split} (round {r} of a search over search_splits={search_splits})")
    out = state_uri(work, search_name, r + 1)
    if storage.exists(out):
        done, nxt = _read_state(out)
        if nxt.round == r + 1 and [list(t) for t in nxt.history[r].thetas] == expected:
            return _update_output(out, nxt, done["failed_trials"], samples, opts)
    failed_now = [p for p in parsed if p["failed"]]
    total_failed = int(doc.get("failed_trials", 0)) + len(failed_now)
    if total_failed > int(max_failed_trials):
        errors = "; ".join(f"r{p['round']} s{p['sample']}: {str(p['error']).splitlines()[0] if p['error'] else ''}"
                           for p in failed_now)
        raise SearchFailed(
            f"search {search_name!r}: {total_failed} failed trials exceed max_failed_trials={max_failed_trials} "
            f"(round {r}: {errors})"
        )
    groups = [parsed[i * reward_seeds:(i + 1) * reward_seeds] for i in range(samples)]
    rewards = [float("nan") if any(p["failed"] for p in g) else math.fsum(float(p["reward"]) for p in g) / len(g)
               for g in groups]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # failed trials: counted and reported below
        record = c.update(expected, rewards)
    storage.write_json(out, _state_doc(c, total_failed, search_name, opts))
    ok = [x for x in rewards if math.isfinite(x)]
    noise = reward_noise([[float("nan") if p["failed"] else float(p["reward"]) for p in g] for g in groups])
    _log(
        f"round {r + 1}/{c.rounds}: mean reward {record.mean_reward:.4f}, "
        f"max {max(ok) if ok else float('nan'):.4f}, failed {len(failed_now)} (total {total_failed})"
        + (f"; rewards' spread (sd) {noise[0]:.4f}, seed noise (sd) {noise[1]:.4f}" if noise else "")
    )
    if tracking is not None:
        from paploss import tracking as tr

        history = [[None if i in rec.failed else v for i, v in enumerate(rec.rewards)] for rec in c.history]
        tr.record_round(
            tracking, search_name, round=r, rewards=[None if not math.isfinite(x) else x for x in rewards],
            failed=len(failed_now), mu=c.mu.tolist(), names=c.parameter_names, spec=c.spec(), history=history,
            noise=[*_trials_noise(search_dir(work, search_name), reward_seeds, r), noise],
        )
    return _update_output(out, c, total_failed, samples, opts)


def _update_output(uri: str, c, failed: int, samples: int, opts: _SearchOptions) -> dict:
    rec = c.history[-1]
    ok = [v for i, v in enumerate(rec.rewards) if i not in rec.failed]
    return {
        "state": uri,
        "trials": _trials_of(c, samples, opts),
        "round": c.round,
        "mean_reward": rec.mean_reward,
        "max_reward": max(ok) if ok else None,
        "failed_trials": failed,
    }

