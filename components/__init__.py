"""KFP lightweight components: one thin typed wrapper per task of :data:`paploss.flow.STAGES`.

Each wrapper only converts KFP's parameter types to the step's arguments and calls
the step of :mod:`paploss.steps`; all logic lives there. The tasks after
``init-search`` share one small dict, ``run`` (the search's context: work folder,
name, MLflow, resolved training options, attempts…, made once by ``init_search``),
instead of a dozen parameters each.

Components run in the project image (``base_image``), which has ``paploss`` and
``kfp`` installed, so ``install_kfp_package=False``: no ``pip install`` per task
(without it every local task re-runs pip and tasks serialise). ``build(image)``
returns the components for an image; the image is baked into the compiled
pipeline. ``DEFAULT_IMAGE`` comes from ``PAPLOSS_IMAGE`` or is ``paploss:latest``
(what ``make image`` tags).
"""

import os
from types import SimpleNamespace
from typing import Dict, List, NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Metrics, Output

DEFAULT_IMAGE = os.environ.get("PAPLOSS_IMAGE", "paploss:latest")

__all__ = ["DEFAULT_IMAGE", "build", "STEP_FUNCTIONS"]


def prepare_data(dataset: str, work: str, split_seed: int, search_val_fraction: float, bundled: Dict,
                 search_splits: int = 1) -> str:
    """Dataset (``bundled:<name>``, folder or ``s3://``) -> prepared data URI with its search splits."""
    from paploss import steps

    return steps.prepare_data(dataset, work, split_seed=split_seed, search_val_fraction=search_val_fraction,
                              bundled=bundled, search_splits=search_splits)


def pretrain(data: str, work: str, config: Dict, seed: int, detector: str, proxy: Dict) -> str:
    """Prepared data -> URI of the warm-start backbone (pre-trained on classification)."""
    from paploss import steps

    return steps.pretrain(data, work, config=config, seed=seed, detector=detector, proxy=proxy)


def init_search(
    work: str, search_name: str, rounds: int, samples: int, seed: int, controller: Dict, tracking_uri: str,
    experiment: str, params: Dict, detector: str, proxy: Dict, final: Dict, proxy_epochs: float,
    final_epochs: float, max_failed_trials: int, attempts: int, model_name: str, promote: bool, promote_rule: str,
    reward_seeds: int = 1, search_splits: int = 1, kfp_run_id: str = "",
) -> NamedTuple("InitOutputs", [("state", str), ("trials", List[str]), ("run", Dict)]):
    """Controller state v0, round 0's trials and the search's ``run`` context; takes the
    search's lease for this pipeline run (a second run of the same search stops here, one
    line) and opens the MLflow parent run."""
    from collections import namedtuple

    from paploss import lease, steps

    lease.claim(work, search_name, run_id=kfp_run_id)

    run = steps.run_context(work, search_name, {"uri": tracking_uri, "experiment": experiment}, proxy=proxy,
                            final=final, detector=detector, proxy_epochs=proxy_epochs, final_epochs=final_epochs,
                            seed=seed, attempts=attempts, max_failed_trials=max_failed_trials, model_name=model_name,
                            promote=promote, promote_rule=promote_rule)
    run["kfp_run_id"] = kfp_run_id  # the lease's owner on a cluster; the report gives it back
    params = {**params, "detector": detector, "proxy": proxy, "final": final, "proxy_epochs": proxy_epochs,
              "final_epochs": final_epochs, "max_failed_trials": max_failed_trials, "attempts": attempts,
              "model_name": model_name, "work": work, "search_name": search_name}
    out = steps.init_search(work, search_name, rounds, samples, seed=seed, controller=controller,
                            tracking=steps.tracking_of(run), params=params, reward_seeds=reward_seeds,
                            search_splits=search_splits)
    return namedtuple("InitOutputs", ["state", "trials", "run"])(out["state"], out["trials"], run)


def proxy_trial(data: str, init: str, trial: str, state: str, run: Dict) -> str:
    """One sampled θ -> its reward (search-val AP) as result JSON; failures are results."""
    from paploss import steps

    return steps.proxy_trial(data, init, trial, steps.training_options(run, "proxy"), run["work"], run["search_name"],
                             state=state, tracking=steps.tracking_of(run), attempts=run["attempts"])


def controller_update(state: str, results: List[str], run: Dict
                      ) -> NamedTuple("UpdateOutputs", [("state", str), ("trials", List[str])]):
    """One PPO round on the collected rewards -> next state and trials."""
    from collections import namedtuple

    from paploss import steps

    out = steps.controller_update(state, results, run["work"], run["search_name"],
                                  max_failed_trials=run["max_failed_trials"], tracking=steps.tracking_of(run))
    return namedtuple("UpdateOutputs", ["state", "trials"])(out["state"], out["trials"])


def selection_trials(state: str, top: int, seeds: List[int], rank: str) -> List[str]:
    """The selection's trials: the ``top`` best sampled θ of the search (ranked by ``rank``), each with every seed."""
    from paploss import steps

    return steps.selection_trials(state, top, seeds, rank)


def select_loss(state: str, results: List[str], rank: str, run: Dict) -> str:
    """The candidate with the best mean reward -> the search state holding that choice."""
    from paploss import steps

    return steps.select_loss(state, results, run["work"], run["search_name"], tracking=steps.tracking_of(run),
                             rank=rank)


def lr_trial(data: str, init: str, item: str, state: str, sweep: Dict, run: Dict) -> str:
    """One training of the lr sweep (``item`` = ``"<loss>@<lr>"``, briefly on search-train) -> its search-val AP."""
    from paploss import steps

    loss = item.rpartition("@")[0]
    return steps.lr_trial(data, init, item, steps.training_options(run, "final"), sweep, run["work"],
                          run["search_name"], state=state if loss == steps.SEARCHED else "", seed=run["seed"])


def lr_pick(results: List[str], run: Dict) -> str:
    """The sweep's results -> the best learning rate of each loss, as JSON ``{loss: lr}``."""
    from paploss import steps

    return steps.lr_pick(results, run["work"], run["search_name"], tracking=steps.tracking_of(run))


def final_train(data: str, init: str, loss: str, state: str, run: Dict, lrs: str, placement: Dict, kfp_run_id: str,
                node_selector: Dict, tolerations: List[Dict], s3_secret: str, mlflow_secret: str) -> str:
    """Full training with the searched loss, the search's start or a baseline, at its learning rate of
    ``lrs`` (the lr sweep's JSON ``{loss: lr}``) -> result JSON with its val AP; on
    more than one GPU (``placement``) the training is a Kubeflow Trainer TrainJob this task waits for."""
    import json

    import os

    from paploss import steps
    from pipelines.trainjob import final_trainer

    os.environ.setdefault("KFP_RUN_ID", kfp_run_id)  # the registered model's lineage tag

    trainer = final_trainer(placement, search_name=run["search_name"], task=loss, run_id=kfp_run_id,
                            tracking_uri=run["tracking"].get("uri", ""), s3_secret=s3_secret,
                            mlflow_secret=mlflow_secret, node_selector=node_selector, tolerations=tolerations)
    options = steps.loss_options(steps.training_options(run, "final"), loss, json.loads(lrs or "{}").get(loss))
    return steps.final_train(data, init, loss, options, run["work"], run["search_name"],
                             state=state if loss == steps.SEARCHED else "", seed=run["seed"],
                             tracking=steps.tracking_of(run), model_name=run["model_name"], promote=run["promote"],
                             trainer=trainer,
                             spec=steps.start_spec(run["work"], run["search_name"]) if loss == steps.START else "")


def report(finals: List[str], state: str, run: Dict, metrics: Output[Metrics], table: Output[Markdown]) -> str:
    """The AP table (searched vs baselines) as JSON, the promotion decision; closes the MLflow
    parent run. The KFP run page shows the table (``table``) and the finals' AP (``metrics``)."""
    from paploss import steps

    out = steps.report(finals, state, run["work"], run["search_name"], tracking=steps.tracking_of(run),
                       model_name=run["model_name"], promote=run["promote"], promote_rule=run["promote_rule"])
    values, markdown = steps.report_outputs(out)
    for name, value in values.items():
        metrics.log_metric(name, value)
    with open(table.path, "w", encoding="utf-8") as f:
        f.write(markdown)
    from paploss import lease

    lease.release_run(run["work"], run["search_name"], run_id=run.get("kfp_run_id", ""))  # the search is done
    return out


STEP_FUNCTIONS = (prepare_data, pretrain, init_search, proxy_trial, controller_update, selection_trials, select_loss,
                  lr_trial, lr_pick, final_train, report)


def build(image: str | None = None) -> SimpleNamespace:
    """The components for ``image`` (default ``DEFAULT_IMAGE``), by step name."""
    image = image or DEFAULT_IMAGE
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
        raise ValueError(f"image={image!r} is not a container image reference")
    return SimpleNamespace(**{
        fn.__name__: dsl.component(fn, base_image=image, install_kfp_package=False) for fn in STEP_FUNCTIONS
    })
