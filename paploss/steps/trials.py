"""Stage 3, the proxy trials: one sampled loss trained and rewarded by its AP on search-val."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import traceback
from typing import Any, Mapping, Sequence

from paploss import packing, storage
from paploss.steps.errors import SearchFailed, StepError
from paploss.steps.options import _SearchOptions, _train_config
from paploss.steps.state import _read_state, load_controller
from paploss.steps.work import (_client, _engine, _local, _log, _trial_uri, content_key, plain, search_dir,
                                search_split_files)

def _parse_trial(trial: str | Mapping[str, Any]) -> dict:
    t = json.loads(trial) if isinstance(trial, str) else dict(trial)
    for field in ("round", "sample", "theta", "seed"):
        if field not in t:
            raise StepError(f"trial {str(trial)[:200]} lacks the field {field!r}")
    return t


_TRIAL_FILE = re.compile(r"r\d{3}-s\d{2,}\.json")


def trial_results(folder: str | os.PathLike) -> list[dict]:
    """Every trial result stored in a search folder (``trials/rNNN-sMM.json``, by
    name; the copies :func:`_keep_aside` keeps are not trials of their own); [] when
    it has none."""
    trials = storage.join(str(folder), "trials")
    if not storage.exists(trials):
        return []
    return [storage.read_json(storage.join(trials, name))
            for name in storage.list_files(trials) if _TRIAL_FILE.fullmatch(name)]


def stored_trial(work: str, search_name: str, trial: str | Mapping[str, Any], init: str | None = None) -> dict | None:
    """The stored result of ``trial`` when it was trained with the same θ, the same
    seed and (where the result records it) the same warm start ``init``, else None.

    It is looked for under the trial's own name (``trials/rNNN-sMM.json``), then among
    the round's other results (a selection run again with more seeds numbers its
    trials anew, and a result another trial's name held is kept aside, see
    :func:`_keep_aside`); one found elsewhere comes back under the trial's round and
    sample. Results stored before ``init`` was recorded match any ``init``."""
    t = _parse_trial(trial)
    r, s = int(t["round"]), int(t["sample"])
    out = _trial_uri(work, search_name, r, s)
    if storage.exists(out):
        done = storage.read_json(out)
        if _same_trial(done, t, init, work):
            return done
    folder = storage.join(search_dir(work, search_name), "trials")
    if not storage.exists(folder):
        return None
    prefix = f"r{r:03d}-"
    for name in storage.list_files(folder):
        if name.startswith(prefix) and name.endswith(".json") and "/" not in name:
            uri = storage.join(folder, name)
            if uri == out:
                continue
            done = storage.read_json(uri)
            if _same_trial(done, t, init, work):
                return {**done, "round": r, "sample": s}
    return None


def _same_trial(done: Mapping[str, Any], t: Mapping[str, Any], init: str | None, work: str) -> bool:
    """Whether a stored result ``done`` is trial ``t``'s: the same θ and seed, and the
    same warm start where both name one (compared as :func:`storage.location_id` in ``work``)."""
    if done.get("theta") != [float(v) for v in t["theta"]] or int(done.get("seed", t["seed"])) != int(t["seed"]) \
            or int(done.get("split", 0)) != int(t.get("split", 0)):
        return False
    if "init" not in done or init is None:
        return True
    return storage.location_id(done["init"], work) == storage.location_id(init, work)


def _keep_aside(out: str) -> None:
    """Before a trial's result is written to ``out``: a result of another trial there
    (another θ, seed or warm start under the same name) is renamed
    ``rNNN-sMM-<key>.json`` rather than overwritten, so :func:`stored_trial` still finds it."""
    if not storage.exists(out):
        return
    old = storage.read_json(out)
    key = content_key(old.get("theta"), old.get("seed"), old.get("init"), *([old["split"]] if old.get("split") else []))
    storage.copy(out, out[: -len(".json")] + f"-{key}.json")


def _run_training(cfg, on_step=None):
    return _engine().train(cfg, on_step=on_step, progress=False)


def proxy_config(proxy: Mapping[str, Any] | None, data: str, split: int, spec, init: str | None, seed: int,
                 out_dir: str | None = None):
    """``(TrainConfig, reward metric)`` of one proxy training (SPEC §3): ``proxy``'s
    options (``reward_metric``, default ``AP``, names the metric that is the reward),
    trained on search split ``split``'s search-train and evaluated on its search-val
    (:func:`search_split_files`), with the PAP loss of ``spec`` from warm start ``init``."""
    options = plain(dict(proxy or {}))
    metric = options.pop("reward_metric", "AP")
    train_ann, val_ann = search_split_files(split)
    return _train_config(options, "proxy config", data=str(_local(data)), train_ann=train_ann, val_ann=val_ann,
                         loss="paploss", spec=spec, init=str(_local(init)) if init else None, seed=int(seed),
                         out_dir=out_dir), metric


def proxy_trial(
    data: str,
    init: str,
    trial: str | Mapping[str, Any],
    proxy: Mapping[str, Any],
    work: str,
    search_name: str,
    state: str = "",
    tracking: Mapping[str, str] | None = None,
    attempts: int = 1,
) -> str:
    """Train one proxy model with the loss of one sampled θ; its reward is the AP on
    search-val (SPEC §3, §4), of the trial's ``split`` where it names one
    (:func:`search_split_files`). Returns the result as JSON text::

        {"round", "sample", "theta", "seed", "init" (the warm start trained from, as a place in ``work``:
         ``storage.location_id``, so the result is found again after the work folder moved),
         "split" (when the trial has one),
         "reward" (null if failed), "failed", "diverged", "error", "metrics", "seconds", "spec",
         "box_collapsed" (stopped early by the proxy's ``box_collapse`` option; its reward is
         the AP of the model as it was then)}

    ``trial``: one item of ``init_search``/``controller_update``'s ``trials``.
    ``proxy``: ``TrainConfig`` fields of the proxy training (``reward_metric``,
    default ``AP``, picks the reward; ``AP50`` for VOC-style data). ``state``: the
    controller state the θ was drawn from (for θ → LossSpec). Exceptions are caught
    and retried ``attempts`` times, then reported as ``failed``; a diverged run
    (SPEC §3) is ``failed`` too. The stored result (``trials/rNNN-sMM.json``) also
    holds the training loss and the positives' mean box quality u per iteration
    (``losses``, ``box_quality``); the returned JSON leaves them out (KFP parameters
    stay small).
    """
    t = _parse_trial(trial)
    r, s = int(t["round"]), int(t["sample"])
    theta = [float(v) for v in t["theta"]]
    out = _trial_uri(work, search_name, r, s)
    done = stored_trial(work, search_name, t, init)
    if done is not None:
        _ensure_trial_logged(done, search_name, state, tracking)
        return _trial_output(done)
    k = int(t.get("split", 0))
    split = {"split": k} if "split" in t else {}  # the result records the trial's split where it names one
    train_ann, val_ann = search_split_files(k)
    lacking = [a for a in (train_ann, val_ann) if not storage.exists(storage.join(data, "annotations", f"{a}.json"))]
    if lacking:
        raise StepError(f"{_trial_label(t)} trains on search split {k}, but {data} has no "
                        f"{', '.join(f'annotations/{a}.json' for a in lacking)}: prepare the data with "
                        "search_splits as large as the search's")
    losses: list[float] = []
    quality: list[float] = []
    result: dict[str, Any] = {"round": r, "sample": s, "theta": theta, "seed": int(t["seed"]), **split,
                              "init": storage.location_id(init, work) or None, "reward": None, "failed": True,
                              "diverged": False, "error": "", "metrics": {}, "seconds": 0.0, "spec": None}
    if tracking is not None:  # the trial's MLflow run is RUNNING while it trains
        from paploss import tracking as tr

        tr.start_trial(tracking, search_name, r, s)
    start = time.monotonic()
    for attempt in range(1, int(attempts) + 1):
        losses = []
        try:
            spec = _spec_of(state, theta)
            result["spec"] = spec.to_json() if spec is not None else None
            with tempfile.TemporaryDirectory(prefix="paploss-trial-") as tmp:
                cfg, metric = proxy_config(proxy, data, k, spec, init, int(t["seed"]), out_dir=tmp)
                note = packing.check_packed_trial(cfg)  # k trials on one GPU: do they fit?
                if note:
                    _log(note)
                res = _run_training(cfg, on_step=lambda it, loss: losses.append(float(loss)))
            metrics = {k: float(v) for k, v in dict(res.metrics).items()}
            if metric not in metrics:
                raise StepError(f"reward_metric={metric!r} is not among the metrics {sorted(metrics)}")
            quality = list(res.box_quality)
            result.update(metrics=metrics, diverged=bool(res.diverged), error="",
                          box_collapsed=bool(res.box_collapsed))
            if res.diverged:
                result.update(failed=True, error="diverged (SPEC §3: training loss NaN or 1.0 for > 50 iterations)")
            else:
                result.update(failed=False, reward=metrics[metric])
            break
        except Exception as exc:  # noqa: BLE001 - a failed trial is a result, not a crash
            result["error"] = f"attempt {attempt}/{attempts}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
            _log(f"{_trial_label(t)}: attempt {attempt}/{attempts} failed: {type(exc).__name__}: {exc}")
    result["seconds"] = round(time.monotonic() - start, 3)
    result["losses"] = losses
    result["box_quality"] = quality
    _keep_aside(out)
    storage.write_json(out, result, indent=None)
    what = "FAILED" if result["failed"] else f"reward {result['reward']:.4f}"
    stop = "; stopped early: its boxes collapsed" if result.get("box_collapsed") else ""
    _log(f"{_trial_label(t)}: {what} ({result['seconds']:.0f}s{stop})")
    _ensure_trial_logged(result, search_name, state, tracking)
    return _trial_output(result)


def _trial_label(t: Mapping[str, Any]) -> str:
    """How progress lines name a trial: a round's sample counted from 1 as the round lines,
    the progress display and the MLflow run names (``r01-s01``) count, or a selection
    candidate's seed."""
    if "candidate" in t:
        return f"selection candidate {t['candidate']} seed {t['seed']}"
    return f"round {t['round'] + 1} sample {t['sample'] + 1}"


def _trial_output(result: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in result.items() if k not in ("losses", "box_quality")})


def _spec_of(state: str, theta: list[float]):
    if not state:
        return None
    return load_controller(state).spec_of(theta)


def _ensure_trial_logged(result: Mapping[str, Any], search_name: str, state: str,
                         tracking: Mapping[str, str] | None) -> None:
    """Log the trial on its MLflow run and end it, unless a retried step finished it before."""
    if tracking is None:
        return
    from paploss import tracking as tr

    tr.record_trial(tracking, search_name, result, load_controller(state).parameter_names if state else ())


def reward_noise(groups: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """How well one round's rewards can rank its samples, from the n trainings behind
    each (``reward_seeds`` n >= 2): ``(spread, noise)``.

    ``spread`` is the standard deviation of the samples' rewards (each the mean of its
    n trainings). ``noise`` is the standard deviation of the trainings' luck in one
    such reward: the residual variance of the table samples × repeats, once each
    sample's mean and each repeat's mean (its seed and warm start, shared by every
    sample) are taken out, over (S − 1)(n − 1) degrees of freedom, divided by n. Where
    ``noise`` comes near ``spread``, the round's ranking of its samples is mostly luck.
    Samples with a non-finite reward are left out; None when fewer than two remain or
    they have fewer than two trainings each."""
    rows = [[float(x) for x in g] for g in groups]
    rows = [g for g in rows if len(g) >= 2 and all(math.isfinite(x) for x in g)]
    if len(rows) < 2 or len({len(g) for g in rows}) != 1:
        return None
    s, n = len(rows), len(rows[0])
    means = [math.fsum(g) / n for g in rows]
    repeat = [math.fsum(g[j] for g in rows) / s for j in range(n)]
    grand = math.fsum(means) / s
    resid = math.fsum((g[j] - means[i] - repeat[j] + grand) ** 2 for i, g in enumerate(rows) for j in range(n))
    spread = math.sqrt(math.fsum((m - grand) ** 2 for m in means) / (s - 1))
    return spread, math.sqrt(resid / ((s - 1) * (n - 1)) / n)


def round_noise(state: str) -> list[tuple[float, float] | None]:
    """:func:`reward_noise` of each finished round of the search whose state (or
    selected state) is ``state``, from its stored trial results; all None for a search
    with ``reward_seeds`` 1 or one whose results are gone."""
    doc, c = _read_state(state)
    origin = doc.get("selected", {}).get("from_state", state)
    return _trials_noise(os.path.dirname(os.path.dirname(origin)), _SearchOptions.of(doc).reward_seeds, c.round)


def _trials_noise(folder: str, reward_seeds: int, rounds: int) -> list[tuple[float, float] | None]:
    """:func:`reward_noise` of rounds 0 … ``rounds`` − 1 from the trial results stored
    in the search folder ``folder`` (trial sample k is θ k // n's repeat k mod n; the
    selection's trials, numbered from round ``rounds`` on, are left out). Reads
    nothing with one reward seed."""
    n = int(reward_seeds)
    table: dict[int, dict[int, dict[int, float]]] = {}
    for t in trial_results(folder) if n > 1 else []:
        r, k = int(t["round"]), int(t["sample"])
        if r < rounds:
            reward = float("nan") if t.get("failed") or t.get("reward") is None else float(t["reward"])
            table.setdefault(r, {}).setdefault(k // n, {})[k % n] = reward
    return [reward_noise([[g[j] for j in range(n)] for g in table.get(r, {}).values() if len(g) == n])
            for r in range(rounds)]

