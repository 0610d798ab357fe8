"""Stage 5a, the learning-rate sweep: every final loss gets its own best learning rate.

Before the finals, each loss of the table (the searched loss, the search's start and
the baselines) trains briefly with each learning rate of a small sweep on
search-train and is scored on search-val (the images the finals never score on);
the best learning rate per loss is the one its final trains with. So no loss of the
table is compared at a learning rate tuned for another.

A sweep is ``{"lrs": [lr, ...], **training options}``: the options (``iterations``,
``warmup_iters``, ...) override the finals' for the sweep's short trainings. With
fewer than two learning rates nothing trains: each loss keeps the finals' ``lr``.

::

    lr_trial(loss, lr) × (losses × lrs)  ─►  lr_pick  ─►  {loss: lr}  (lr_sweep.json)

The search's starting loss is the loss named :data:`START` (:func:`start_spec`: the
PAP loss of the controller's starting mean μ).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from typing import Any, Mapping, Sequence

from paploss import storage
from paploss.steps.errors import StepError
from paploss.steps.finals import BASELINES, SEARCHED, _given_spec
from paploss.steps.options import _train_config
from paploss.steps.state import _read_state, searched_spec
from paploss.steps.trials import _run_training
from paploss.steps.work import At, _local, _log, cache_key, plain, search_dir, search_split_files, state_uri

__all__ = ["START", "PAP_ONLY_OPTIONS", "start_spec", "loss_options", "sweep_lrs", "sweep_items", "lr_trial",
           "lr_pick"]

#: The name of the search's starting loss (the controller's starting mean μ) in results and MLflow.
START = "start"

#: Training options that only the PAP loss takes (a baseline's training drops them).
PAP_ONLY_OPTIONS = ("detach_i3", "box_collapse")


def start_spec(work: str, search_name: str) -> str:
    """The search's starting loss as LossSpec JSON: the PAP loss of the controller's
    mean μ in the search's first state (round 0, before any update)."""
    first = state_uri(work, search_name, 0)
    if not storage.exists(first):
        raise StepError(f"search {search_name!r} has no first state at {first}: init-search makes it")
    _, controller = _read_state(first)
    return controller.spec().to_json()


def loss_options(final: Mapping[str, Any], loss: str, lr: float | None = None) -> dict:
    """The training options of ``loss``'s final: ``final`` with ``lr`` (None: keep) and,
    for a baseline, without the options only the PAP loss takes (:data:`PAP_ONLY_OPTIONS`)."""
    out = plain(dict(final or {}))
    if loss in BASELINES:
        for name in PAP_ONLY_OPTIONS:
            out.pop(name, None)
    if lr is not None:
        lr = float(lr)
        if not math.isfinite(lr) or lr <= 0:
            raise StepError(f"learning rate of {loss!r}: lr={lr!r} must be a number > 0")
        out["lr"] = lr
    return out


def sweep_lrs(sweep: Mapping[str, Any] | None) -> list[float]:
    """The sweep's learning rates (``sweep["lrs"]``), checked: numbers > 0, no repeats."""
    lrs = list((sweep or {}).get("lrs", []))
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise StepError(f"lr sweep: lrs={lrs!r} must be numbers > 0 (got {lr!r})")
    if len(set(lrs)) != len(lrs):
        raise StepError(f"lr sweep: lrs={lrs!r} has repeats")
    return [float(x) for x in lrs]


def sweep_items(losses: Sequence[str], sweep: Mapping[str, Any] | None, final: Mapping[str, Any] | None = None
                ) -> list[str]:
    """The sweep's trainings, one ``"<loss>@<lr>"`` per loss and learning rate; with fewer
    than two learning rates, one item per loss at the finals' ``lr`` (nothing to choose:
    its :func:`lr_trial` does not train)."""
    lrs = sweep_lrs(sweep)
    if len(lrs) < 2:
        lrs = [float((final or {}).get("lr", lrs[0] if lrs else 0.01))]
    return [f"{loss}@{lr!r}" for loss in losses for lr in lrs]


def _item(item: str) -> tuple[str, float]:
    loss, sep, lr = str(item).rpartition("@")
    try:
        value = float(lr)
    except ValueError:
        value = float("nan")
    if not sep or not loss or not math.isfinite(value) or value <= 0:
        raise StepError(f"lr sweep item {item!r} must be '<loss>@<lr>' with lr > 0")
    return loss, value


def lr_trial(data: str, init: str, item: str, final: Mapping[str, Any], sweep: Mapping[str, Any] | None,
             work: str, search_name: str, state: str = "", spec: str = "", seed: int = 0) -> str:
    """One training of the sweep: ``item`` = ``"<loss>@<lr>"`` trained with the finals'
    options ``final`` overridden by the sweep's (``sweep`` less ``lrs``) on search-train,
    scored on search-val. ``loss`` is ``searched`` (needs ``state``), ``start`` (its
    spec from the search's first state), a baseline, or a PAP loss given by ``spec``.
    With fewer than two learning rates in ``sweep`` nothing trains (``"score": null``).
    Returns JSON ``{"loss", "lr", "score", "seconds"}``; a finished trial is found, not redone."""
    loss, lr = _item(item)
    out = storage.join(search_dir(work, search_name), "lr_sweep", f"{loss}@{lr!r}.json")
    if len(sweep_lrs(sweep)) < 2:
        return json.dumps({"loss": loss, "lr": lr, "score": None, "seconds": 0.0})
    if loss == SEARCHED:
        if not state:
            raise StepError("lr_trial of the searched loss needs the final search state")
        pap = searched_spec(state)
    elif loss == START:
        from paploss.spec_set import read_spec

        pap = read_spec(spec or start_spec(work, search_name))  # a SpecSet for a detector with several heads
    else:
        pap = _given_spec(loss, spec, "")
    options = {**loss_options(final, loss, lr), **{k: v for k, v in dict(sweep or {}).items() if k != "lrs"}}
    if pap is None:
        for name in PAP_ONLY_OPTIONS:
            options.pop(name, None)
    key = cache_key(work, At(data), At(init), loss, options, int(seed), pap.to_json() if pap is not None else "")
    if storage.exists(out):
        done = storage.read_json(out)
        if done.get("key") == key:
            return json.dumps({k: done[k] for k in ("loss", "lr", "score", "seconds")})
    train_ann, val_ann = search_split_files(0)
    start = time.monotonic()
    _log(f"lr sweep {loss} at lr {lr:g}: training")
    with tempfile.TemporaryDirectory(prefix="paploss-lr-") as tmp:
        cfg = _train_config(options, "lr sweep config", data=str(_local(data)), train_ann=train_ann,
                            val_ann=val_ann, loss="paploss" if pap is not None else loss, spec=pap,
                            init=str(_local(init)) if init else None, seed=int(seed), out_dir=tmp)
        res = _run_training(cfg)
    score = 0.0 if res.diverged else float(dict(res.metrics).get("AP", 0.0))
    result = {"loss": loss, "lr": lr, "score": score, "seconds": round(time.monotonic() - start, 3), "key": key}
    storage.write_json(out, result)
    _log(f"lr sweep {loss} at lr {lr:g}: search-val AP {100 * score:.2f} ({result['seconds']:.0f}s)")
    return json.dumps({k: result[k] for k in ("loss", "lr", "score", "seconds")})


def lr_pick(results: Sequence[str | Mapping[str, Any]], work: str, search_name: str,
             tracking: Mapping[str, str] | None = None) -> str:
    """The best learning rate per loss (highest search-val AP; a tie goes to the smaller
    lr) as JSON ``{loss: lr}`` (``{}`` when nothing trained: a sweep of fewer than two
    learning rates, every final keeps its lr); the whole sweep goes to ``lr_sweep.json`` in the search
    folder and the choices onto the search's MLflow run as its parameter ``lrs`` (the same JSON)."""
    rows = [json.loads(r) if isinstance(r, str) else dict(r) for r in results]
    if not rows:
        raise StepError("lr_pick: the lr sweep gave no results")
    best: dict[str, dict] = {}
    for row in sorted((r for r in rows if r.get("score") is not None), key=lambda r: (r["loss"], r["lr"])):
        if row["loss"] not in best or row["score"] > best[row["loss"]]["score"]:
            best[row["loss"]] = row
    lrs = {loss: float(row["lr"]) for loss, row in best.items()}
    if not lrs:
        _log("lr sweep: fewer than two learning rates, every final keeps its lr")
        return json.dumps({})
    storage.write_json(storage.join(search_dir(work, search_name), "lr_sweep.json"),
                       {"lrs": lrs, "trials": sorted(rows, key=lambda r: (r["loss"], r["lr"]))})
    _log("lr sweep: " + ", ".join(f"{loss} lr {lr:g}" for loss, lr in lrs.items()))
    if tracking is not None:
        from paploss import tracking as tr

        tr.open_search(tracking, search_name, {"lrs": lrs})  # a param: JSON {loss: lr}
    return json.dumps(lrs)
