"""A search's state file: the controller (as plain data) and how its trials are made.

The controller (:class:`paploss.search.Controller`) takes and returns plain dicts;
this module reads and writes them (:func:`~paploss.steps.work.state_uri`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from paploss import storage
from paploss.steps.options import _SearchOptions, reward_seeds_of

def load_controller(state: str):
    """The :class:`paploss.search.Controller` a search state file (:func:`state_uri`) holds."""
    return _read_state(state)[1]


def save_controller(uri: str, controller) -> str:
    """Write a bare controller state (:meth:`~paploss.search.Controller.state_dict`) to
    ``uri`` (local or s3://), atomically; :func:`load_controller` reads it back."""
    return storage.write_json(uri, {"controller": controller.state_dict()})


def _read_state(state: str) -> tuple[dict, Any]:
    """A search state file's content and the controller it holds (one read).

    A file that is not JSON, not an object with a ``controller``, or whose controller
    state is corrupt raises :class:`~paploss.steps.errors.StepError` naming the file."""
    from paploss.search import Controller
    from paploss.steps.errors import StepError

    try:
        doc = storage.read_json(state)
    except UnicodeDecodeError:
        raise StepError(str(state), "not a search state file (not text)") from None
    except ValueError as exc:
        raise StepError(str(state), f"not a search state file: {getattr(exc, 'what', exc)}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("controller"), dict):
        raise StepError(str(state), "not a search state file: no 'controller' object")
    try:
        return doc, Controller.from_state_dict(doc["controller"])
    except ValueError as exc:
        raise StepError(str(state), f"corrupt search state: {exc}") from None


def _split_field(round: int, search_splits: int) -> dict:
    """The ``split`` a trial of round ``round`` trains and scores on (``round`` mod
    ``search_splits``), as the trial's field; {} with one split (the trials' JSON as
    before search_splits existed: kfp's cache keys)."""
    return {"split": int(round) % search_splits} if search_splits > 1 else {}


def _round_runs(controller, rnd: int, opts: _SearchOptions) -> tuple[list[int], dict]:
    """The training seeds each sampled θ of round ``rnd`` gets (one per reward seed) and
    the round's ``split`` field (:func:`_split_field`). Every trial of a round shares the
    round's seed, the search's (its rewards compare losses, not seeds)."""
    return reward_seeds_of(controller.config.seed, opts.reward_seeds), _split_field(rnd, opts.search_splits)


def _trials_of(controller, samples: int, opts: _SearchOptions) -> list[str]:
    """The next round's trials as JSON strings: round, sample index, θ, training seed.
    With ``reward_seeds`` = n, θ number i is trained n times: samples i·n … i·n + n − 1,
    the j-th with ``repeat`` j and seed + j × REWARD_SEED_STRIDE. With ``search_splits``
    > 1, each carries the round's ``split``."""
    if controller.done:
        return []
    thetas = controller.sample(samples).tolist()
    seeds, split = _round_runs(controller, controller.round, opts)
    n = len(seeds)  # n = 1: no "repeat", the trials' JSON as before reward_seeds existed (kfp's cache keys)
    return [
        json.dumps({"round": controller.round, "sample": i * n + j, "theta": theta, "seed": seed,
                    **({"repeat": j} if n > 1 else {}), **split})
        for i, theta in enumerate(thetas) for j, seed in enumerate(seeds)
    ]


def _state_doc(c, failed: int, search_name: str, opts: _SearchOptions) -> dict:
    """A search state file's content (:func:`state_uri`); the search's seed is the controller's."""
    return {"controller": c.state_dict(), "failed_trials": int(failed), "search_name": search_name,
            **opts.doc_fields()}


def searched_spec(state: str):
    """The searched loss of a search state: the selected candidate when the state
    holds a selection (:func:`select_loss`), else the policy's final mean μ (SPEC §3)."""
    return _searched_spec_of(*_read_state(state))


def _searched_spec_of(doc: Mapping[str, Any], controller):
    from paploss.spec_set import read_spec

    if doc.get("selected"):  # a LossSpec, or a SpecSet for a detector with several heads
        return read_spec(doc["selected"]["spec"])
    return controller.spec()

