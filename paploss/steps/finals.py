"""Stage 5, the final trainings: the searched loss and the baselines on train, scored on val (SPEC §4)."""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from paploss import storage
from paploss.steps.errors import SearchFailed, StepError
from paploss.steps.options import _train_config
from paploss.steps.state import searched_spec
from paploss.steps.trials import _run_training
from paploss.steps.work import At, _client, _local, _log, cache_key, plain, search_dir

#: The baselines trained beside the searched loss (SPEC §4, RetinaNet).
BASELINES = ("focal+l1", "focal+giou")


#: The name of the searched loss in results and MLflow.
SEARCHED = "searched"


def final_train(
    data: str,
    init: str,
    loss: str,
    final: Mapping[str, Any],
    work: str,
    search_name: str,
    state: str = "",
    seed: int = 0,
    tracking: Mapping[str, str] | None = None,
    model_name: str = "paploss-retinanet",
    promote: bool = True,
    spec: str = "",
    tag: str = "",
    trainer: Callable[[dict], Mapping[str, Any]] | None = None,
) -> str:
    """Train the detector on train and evaluate it on the real val set (SPEC §4).

    ``loss``: ``searched`` (:func:`searched_spec` of ``state``: the controller's final
    mean μ, or the selected candidate after a selection stage), a baseline
    (``focal+l1``, ``focal+giou``), or any other name for the PAP loss of ``spec``
    (a LossSpec as JSON: a handcrafted form, the search's starting loss, a loss
    file). ``tag`` is added to the result's file name (``final/<loss><tag>.json``),
    e.g. to keep the finals of several seeds apart. Logs a nested ``paploss.kind=final``
    run (opened as training starts). ``trainer``: where the training runs when not in
    this process (e.g. a multi-GPU job on a cluster): it gets the training's options by
    ``paploss train`` name (data, out_dir and init as URIs, the spec as a file's URI) and
    returns ``{"metrics", "diverged", "checkpoint"}``. The searched one registers a version of
    ``model_name`` without the ``champion`` alias: the report, which knows the
    baselines, decides that (``promote`` is kept for callers and not used here). Returns JSON
    ``{"loss", "metrics", "checkpoint", "diverged", "seconds", "model_version", "promoted"}``.
    """
    given = _given_spec(loss, spec, tag)
    if loss == SEARCHED:
        if not state:
            raise StepError("final_train(loss='searched') needs the final controller state")
        spec = searched_spec(state)
    else:
        spec = given
    out = storage.join(search_dir(work, search_name), "final", f"{loss}{tag}.json")
    final = plain(dict(final or {}))
    key = cache_key(work, At(data), At(init), loss, final, At(state), int(seed), *([given.to_json()] if given else []))
    if storage.exists(out):
        done = storage.read_json(out)
        if done.get("key") == key:
            return json.dumps(done)
    if tracking is not None:  # the final's MLflow run is RUNNING while it trains
        from paploss import tracking as tr

        tr.start_final(tracking, search_name, f"{loss}{tag}")
    start = time.monotonic()
    folder = storage.join(search_dir(work, search_name), "final", f"{loss}{tag}")
    _log(f"final training with {loss}")
    losses: list[float] = []
    if trainer is None:
        res, ckpt_uri = _train_here(final, data, init, loss, spec, seed, losses, storage.join(folder, "checkpoint.pt"))
        metrics, diverged = res.metrics, res.diverged
    else:
        done = _train_elsewhere(trainer, final, data, init, loss, spec, seed, folder)
        metrics, diverged, ckpt_uri = done["metrics"], done["diverged"], done.get("checkpoint") or ""
    result = {
        "loss": loss, "key": key, "metrics": {k: float(v) for k, v in dict(metrics).items()},
        "checkpoint": ckpt_uri, "diverged": bool(diverged), "seconds": round(time.monotonic() - start, 3),
        "spec": spec.to_json() if spec is not None else None, "model_version": None, "promoted": False,
    }
    if tracking is not None:
        from paploss import tracking as tr

        result.update(tr.record_final(
            tracking, search_name, {**result, "loss": f"{loss}{tag}"}, losses=losses, data=data,
            params={**dict(final), "seed": seed}, model_name=model_name, register=loss == SEARCHED and not tag))
    storage.write_json(out, result)
    ap = result["metrics"].get("AP", float("nan"))
    _log(f"final {loss}: AP {ap:.4f}" + (f", model version {result['model_version']}" if result["model_version"] else ""))
    return json.dumps(result)


def _train_here(final, data, init, loss, spec, seed, losses: list, ckpt_uri: str):
    """One final training in this process; its checkpoint goes to ``ckpt_uri``.
    Returns ``(TrainResult, ckpt_uri or "" when it wrote none)``."""
    with tempfile.TemporaryDirectory(prefix="paploss-final-") as tmp:
        cfg = _train_config(
            final, "final config",
            data=str(_local(data)), train_ann="train", val_ann="val",
            loss="paploss" if spec is not None else loss, spec=spec,
            init=str(_local(init)) if init else None, seed=int(seed), out_dir=tmp,
        )
        res = _run_training(cfg, on_step=lambda it, value: losses.append(float(value)))
        if not res.checkpoint:
            return res, ""
        storage.write_bytes(ckpt_uri, Path(res.checkpoint).read_bytes())
        return res, ckpt_uri


def _train_elsewhere(trainer, final, data, init, loss, spec, seed, folder: str) -> Mapping[str, Any]:
    """One final training handed to ``trainer``; its outputs go to ``folder`` (the work folder)."""
    spec_uri = None
    if spec is not None:
        spec_uri = storage.write_text(storage.join(folder, "spec.json"), spec.to_json())
    options = {**dict(final), "data": data, "train_ann": "train", "val_ann": "val",
               "loss": "paploss" if spec is not None else loss, "spec": spec_uri, "init": init or None,
               "seed": int(seed), "out_dir": folder}
    done = dict(trainer({k: v for k, v in options.items() if v is not None}))
    missing = [k for k in ("metrics", "diverged") if k not in done]
    if missing:
        raise SearchFailed(f"the final training of {loss} elsewhere returned no {', '.join(missing)}")
    return done


_LOSS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._-]{0,63}$")
_TAG = re.compile(r"^[A-Za-z0-9+._-]{0,32}$")


def _given_spec(loss: str, spec: str, tag: str):
    """The LossSpec a final of ``loss`` trains with when it is neither searched nor a
    baseline (``spec`` JSON); None for those two. Names the bad argument otherwise."""
    for name, value, form in (("loss", loss, _LOSS_NAME), ("tag", tag, _TAG)):
        if not isinstance(value, str) or not form.match(value):
            raise StepError(f"{name}={value!r} must be letters, digits, '+', '.', '_' or '-' (it names a file)")
    if loss == SEARCHED or loss in BASELINES:
        if spec:
            raise StepError(f"loss={loss!r} takes no spec: its loss is {'the search state' if loss == SEARCHED else 'fixed'}")
        return None
    if not spec:
        raise StepError(f"loss={loss!r} is not {SEARCHED!r} or a baseline {list(BASELINES)}: give its spec (LossSpec JSON)")
    from paploss.spec_set import read_spec

    try:  # a LossSpec, or a SpecSet (one per head) for a detector with several heads
        return read_spec(spec)
    except ValueError as exc:
        raise StepError(f"spec of loss {loss!r}: {exc}") from None
