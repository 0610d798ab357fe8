"""KFP lightweight components: one thin typed wrapper per ``paploss.steps`` function.

Each wrapper only converts KFP's parameter types to the step's arguments and
calls the step; all logic lives in :mod:`paploss.steps`. Components run in the
project image (``base_image``), which has ``paploss`` and ``kfp`` installed, so
``install_kfp_package=False``: no ``pip install`` per task (DESIGN: without it
every local task re-runs pip and tasks serialise).

``build(image)`` returns the components for an image; the image is baked into the
compiled pipeline. ``DEFAULT_IMAGE`` comes from ``PAPLOSS_IMAGE`` or is
``paploss:latest`` (what ``make image`` tags).
"""

import os
from types import SimpleNamespace
from typing import Dict, List, NamedTuple

from kfp import dsl

DEFAULT_IMAGE = os.environ.get("PAPLOSS_IMAGE", "paploss:latest")

__all__ = ["DEFAULT_IMAGE", "build", "STEP_FUNCTIONS"]


def prepare_data(dataset: str, work: str, split_seed: int, search_val_fraction: float, bundled: Dict,
                 search_splits: int = 1) -> str:
    """Dataset (``bundled:<name>``, folder or ``s3://``) -> prepared data URI with the
    search split (``search_splits`` of them)."""
    from paploss import steps

    return steps.prepare_data(dataset, work, split_seed=split_seed, search_val_fraction=search_val_fraction,
                              bundled=bundled, search_splits=search_splits)


def pretrain(data: str, work: str, config: Dict, seed: int, detector: str, proxy: Dict) -> str:
    """Prepared data -> URI of the warm-start backbone (pre-trained on classification,
    for the proxy trials' detector)."""
    from paploss import steps

    return steps.pretrain(data, work, config=config, seed=seed, detector=detector, proxy=proxy)


def init_search(
    work: str, search_name: str, rounds: int, samples: int, seed: int, controller: Dict,
    tracking_uri: str, experiment: str, params: Dict, dataset: str, detector: str, proxy: Dict, final: Dict,
    max_failed_trials: int, attempts: int, model_name: str, reward_seeds: int = 1, search_splits: int = 1,
) -> NamedTuple("InitOutputs", [("state", str), ("trials", List[str])]):
    """Controller state v0 and round 0's trials (``reward_seeds`` trials per sampled
    loss; round r on search split r mod ``search_splits``); opens the MLflow parent
    run (with the pipeline's parameters as its params)."""
    from collections import namedtuple

    from paploss import steps

    params = {**params, "dataset": dataset, "detector": detector, "proxy": proxy, "final": final,
              "max_failed_trials": max_failed_trials, "attempts": attempts, "model_name": model_name,
              "work": work, "search_name": search_name}
    out = steps.init_search(work, search_name, rounds, samples, seed=seed, controller=controller,
                            tracking={"uri": tracking_uri, "experiment": experiment}, params=params,
                            reward_seeds=reward_seeds, search_splits=search_splits)
    return namedtuple("InitOutputs", ["state", "trials"])(out["state"], out["trials"])


def proxy_trial(
    data: str, init: str, trial: str, proxy: Dict, detector: str, epochs: float, work: str, search_name: str,
    state: str, tracking_uri: str, experiment: str, attempts: int,
) -> str:
    """One sampled θ -> its reward (search-val AP) as result JSON; failures are results."""
    from paploss import steps

    proxy = steps.train_options(proxy, detector=detector, epochs=epochs)
    return steps.proxy_trial(data, init, trial, proxy, work, search_name, state=state,
                             tracking={"uri": tracking_uri, "experiment": experiment}, attempts=attempts)


def controller_update(
    state: str, results: List[str], work: str, search_name: str, max_failed_trials: int,
    tracking_uri: str, experiment: str,
) -> NamedTuple("UpdateOutputs", [("state", str), ("trials", List[str])]):
    """One PPO round on the collected rewards -> next state and trials."""
    from collections import namedtuple

    from paploss import steps

    out = steps.controller_update(state, results, work, search_name, max_failed_trials=max_failed_trials,
                                  tracking={"uri": tracking_uri, "experiment": experiment})
    return namedtuple("UpdateOutputs", ["state", "trials"])(out["state"], out["trials"])


def selection_trials(state: str, top: int, seeds: List[int], rank: str) -> List[str]:
    """The selection's trials: the ``top`` best sampled θ of the search (ranked by ``rank``), each with every seed."""
    from paploss import steps

    return steps.selection_trials(state, top, seeds, rank)


def select_loss(state: str, results: List[str], work: str, search_name: str, tracking_uri: str,
                experiment: str, rank: str) -> str:
    """The candidate with the best mean reward -> the search state holding that choice."""
    from paploss import steps

    tracking = {"uri": tracking_uri, "experiment": experiment}
    return steps.select_loss(state, results, work, search_name, tracking=tracking, rank=rank)


def final_train(
    data: str, init: str, loss: str, final: Dict, detector: str, epochs: float, work: str, search_name: str,
    state: str, seed: int, tracking_uri: str, experiment: str, model_name: str, promote: bool,
) -> str:
    """Full training with the searched loss or a baseline -> result JSON with val AP."""
    from paploss import steps

    final = steps.train_options(final, detector=detector, epochs=epochs)
    return steps.final_train(data, init, loss, final, work, search_name, state=state, seed=seed,
                             tracking={"uri": tracking_uri, "experiment": experiment},
                             model_name=model_name, promote=promote)


def report(
    final_searched: str, final_l1: str, final_giou: str, state: str, work: str, search_name: str,
    tracking_uri: str, experiment: str,
) -> str:
    """The AP table (searched vs baselines) as JSON; closes the MLflow parent run."""
    from paploss import steps

    return steps.report([final_searched, final_l1, final_giou], state, work, search_name,
                        tracking={"uri": tracking_uri, "experiment": experiment})


STEP_FUNCTIONS = (prepare_data, pretrain, init_search, proxy_trial, controller_update, selection_trials, select_loss,
                  final_train, report)


def build(image: str | None = None) -> SimpleNamespace:
    """The components for ``image`` (default ``DEFAULT_IMAGE``), by step name."""
    image = image or DEFAULT_IMAGE
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
        raise ValueError(f"image={image!r} is not a container image reference")
    return SimpleNamespace(**{
        fn.__name__: dsl.component(fn, base_image=image, install_kfp_package=False) for fn in STEP_FUNCTIONS
    })
