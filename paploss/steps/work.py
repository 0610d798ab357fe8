"""Where a search keeps things in its work folder, and how outputs are named by their inputs.

Work-folder layout::

    {work}/data/<key>/                                     prepared dataset (images/, annotations/)
    {work}/pretrain/<key>/backbone.pt                      warm start, shared by searches on that data
    {work}/searches/<search_name>/state/round-NNN.json     controller state after NNN rounds
    {work}/searches/<search_name>/state/selected-<key>.json  the state holding a selection's choice
    {work}/searches/<search_name>/trials/rNNN-sMM.json     one trial's result
    {work}/searches/<search_name>/final/<loss>.json        a final training's result
    {work}/searches/<search_name>/final/<loss>/            its checkpoint
    {work}/searches/<search_name>/report.json              the AP table

An output is named by a :func:`content_key` of its inputs (a step called again with
the same inputs finds it); the data and warm starts among those inputs are keyed as
places in the work folder (:class:`At`), so a moved work folder keeps its cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from paploss import storage

def _log(msg: str) -> None:
    """A progress line; ``paploss run`` shows lines that start with ``paploss>``."""
    print(f"paploss> {msg}", flush=True)


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: names outputs by their inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class At(str):
    """A URI (data, warm start, state) among :func:`cache_key`'s parts (``At(None)`` is None:
    a missing one stays as it was in the key)."""

    def __new__(cls, uri: str | None):
        return None if uri is None else super().__new__(cls, uri)


def cache_key(work: str, *parts: Any) -> str:
    """The key naming an output in ``work`` by its inputs ``parts`` (:func:`content_key`'s).
    The parts wrapped in :class:`At` are URIs: in the key they are
    :func:`storage.location_id`, relative to ``work``, so the key is the same however
    ``work`` is spelled (``runs/b`` or ``/home/me/runs/b``) and wherever the folder lies."""
    return content_key(*(storage.location_id(p, work) if isinstance(p, At) else p for p in parts))


def plain(value: Any) -> Any:
    """JSON-like options with integral floats made ints, recursively.

    KFP carries dict parameters as protobuf ``Struct``s, whose numbers are all
    doubles: ``{"n_train": 48}`` arrives as ``{"n_train": 48.0}``. Normalising
    makes a step's outputs (and the names derived from its inputs) the same
    whichever way it is called."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def search_dir(work: str, search_name: str) -> str:
    return storage.join(work, "searches", search_name)


def state_uri(work: str, search_name: str, round: int) -> str:
    """Where a search keeps its controller state after ``round`` rounds (0: before the first)."""
    return storage.join(search_dir(work, search_name), "state", f"round-{round:03d}.json")


def _trial_uri(work: str, search_name: str, r: int, s: int) -> str:
    return storage.join(search_dir(work, search_name), "trials", f"r{r:03d}-s{s:02d}.json")


#: The selection writes the search state that holds its choice to
#: ``state/selected-<key>.json``, the key naming its inputs (a final training keyed by
#: the state's URI never reuses the result of another selection).
SELECTED_STATE = "selected-{key}.json"


def search_split_files(split: int) -> tuple[str, str]:
    """The annotation names (``annotations/<name>.json``) of search split ``split``:
    the proxy's train and val sets."""
    suffix = _split_suffix(split)
    return f"search_train{suffix}", f"search_val{suffix}"


def _split_suffix(split: int) -> str:
    return f"-{int(split)}" if int(split) else ""


def _local(uri: str) -> Path:
    return storage.localize(uri)


def _engine():
    from paploss import engine

    return engine


def _client(tracking: Mapping[str, str]):
    from paploss.tracking import make_client

    return make_client(tracking.get("uri") or None)


def tracking_config(uri: str = "", experiment: str = "paploss") -> dict:
    """The small dict every step gets to reach MLflow (``uri`` "" = the environment's)."""
    return {"uri": uri, "experiment": experiment}

