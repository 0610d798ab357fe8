"""The search pipeline: data → warm start → R rounds of PPO → final trainings → report.

::

    prepare_data ─► pretrain ─┬─► round 0 ─► round 1 ─► … ─► round R-1 ─► final(searched) ─┐
    init_search ──────────────┘                                                              ├─► report
                              └─► final(focal+l1), final(focal+giou) (beside the search) ────┘

    round r (sub-pipeline "search-round"):
        ParallelFor trial in trials (parallelism):  proxy_trial(data, init, trial) ─► result JSON
        controller_update(state, Collected(results)) ─► next state, next trials

    with select_top > 0, after the last round (sub-pipeline "selection"):
        selection_trials(state) ─► ParallelFor: proxy_trial ─► select_loss ─► state holding the choice

``rounds``, ``parallelism`` and ``select_top`` are compile-time values (the round loop is a
Python loop at definition time and KFP's ``ParallelFor`` takes a constant
parallelism): ``build_pipeline`` makes one pipeline per pair. Everything else is a
run-time parameter whose default comes from the preset.

Rounds are sub-pipelines so that every value a trial needs from before its loop
(data, warm start, state) is an *input* of the sub-pipeline: ``kfp.local`` 2.17
replaces a task output consumed inside ``ParallelFor`` by the loop item.

Cluster settings (ignored by ``kfp.local``): proxy trials and final trainings
request one NVIDIA GPU, CPU and memory, and are retried ``retries`` times by KFP
(pod failures; Python errors are caught by the trial itself and counted as
failed trials); with ``kfp-kubernetes`` every task gets the node selector and
tolerations (run-time parameters) and the S3 credentials from the Kubernetes
secret named by ``s3_secret``; ``pvc`` mounts a claim at ``/data`` for a dataset
cache.
"""

from dataclasses import dataclass
from typing import Dict, List, NamedTuple

from kfp import dsl
from kfp import kubernetes

import components
from paploss.presets import Preset, get_preset
from paploss.steps.options import check_select_rank, check_selection

__all__ = ["ClusterOptions", "build_pipeline", "PIPELINE_NAME", "SECRET_KEYS"]

PIPELINE_NAME = "paploss-search"
#: The keys of the Kubernetes secret named by the ``s3_secret`` parameter, and the
#: environment variables they become in every task.
SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
_RoundOutputs = NamedTuple("RoundOutputs", [("state", str), ("trials", List[str])])


@dataclass(frozen=True)
class ClusterOptions:
    """Compile-time resources of the training tasks on a cluster."""

    accelerator: str = "nvidia.com/gpu"  # the Kubernetes resource KFP requests
    gpus: int = 1
    cpu: str = "4"
    memory: str = "16G"
    retries: int = 2
    backoff: str = "60s"
    s3_endpoint: str = ""  # AWS_ENDPOINT_URL of every task ("" = AWS's default)
    pvc: str = ""  # a PersistentVolumeClaim mounted at /data (dataset cache) in every task
    secret_optional: bool = True  # run even if the secret is missing (e.g. IAM roles provide S3 access)

    def __post_init__(self) -> None:
        if self.gpus < 0 or self.retries < 0:
            raise ValueError(f"gpus={self.gpus} and retries={self.retries} must be >= 0")


def _everywhere(task, p, cluster: ClusterOptions):
    """Settings of every task: node selector, tolerations, S3 secret, PVC, endpoint."""
    kubernetes.add_node_selector_json(task, p["node_selector"])
    kubernetes.add_toleration_json(task, p["tolerations"])
    kubernetes.use_secret_as_env(task, secret_name=p["s3_secret"], secret_key_to_env=SECRET_KEYS,
                                 optional=cluster.secret_optional)
    if cluster.pvc:
        kubernetes.mount_pvc(task, pvc_name=cluster.pvc, mount_path="/data")
        task.set_env_variable("PAPLOSS_CACHE", "/data/paploss-cache")
    if cluster.s3_endpoint:
        task.set_env_variable("AWS_ENDPOINT_URL", cluster.s3_endpoint)
    return task


def _training(task, cluster: ClusterOptions):
    """Settings of the training tasks (proxy trials, final trainings)."""
    if cluster.gpus:
        task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(cluster.gpus)
    task.set_cpu_request(cluster.cpu).set_memory_request(cluster.memory)
    if cluster.retries:
        task.set_retry(num_retries=cluster.retries, backoff_duration=cluster.backoff)
    return task


def build_pipeline(
    rounds: int | None = None,
    parallelism: int | None = None,
    image: str | None = None,
    preset: str | Preset = "quick",
    cluster: ClusterOptions | None = None,
    select_top: int | None = None,
):
    """The ``@dsl.pipeline`` of one search with ``rounds`` rounds and ``parallelism``
    trials at a time (defaults: the preset's), its components in ``image``; with
    ``select_top`` > 0 (default: the preset's) a selection stage after the last round
    trains the ``select_top`` best sampled losses again with each of ``select_seeds``
    and makes the best mean the searched loss (``paploss.steps.select_loss``).

    Run-time parameters (defaults from the preset): ``dataset`` (``bundled:<name>``,
    a folder or ``s3://`` prefix), ``work`` (folder or ``s3://`` prefix for data,
    states, checkpoints), ``search_name`` (tags every run and output of this
    search; the same name resumes it), ``samples``, ``seed``, ``split_seed``,
    ``search_val_fraction``, ``bundled``, ``detector``, ``proxy_epochs`` and
    ``final_epochs`` (0 = the preset's schedule), ``proxy``/``final``/
    ``pretrain_options`` (training options), ``controller`` (PPO options),
    ``max_failed_trials``, ``attempts``, ``select_seeds``, ``select_rank`` (how the selection ranks the
    samples, ``paploss.steps.SELECT_RANKS``), ``reward_seeds`` (proxy trainings per sampled
    loss, their mean its reward), ``search_splits`` (search splits the rounds cycle
    through), ``tracking_uri`` ("" = the environment's
    ``MLFLOW_TRACKING_URI``), ``experiment``, ``model_name``, ``promote``,
    ``node_selector``, ``tolerations``, ``s3_secret``.
    """
    p0 = get_preset(preset) if isinstance(preset, str) else preset
    rounds = p0.rounds if rounds is None else int(rounds)
    parallelism = p0.parallelism if parallelism is None else int(parallelism)
    if rounds < 1:
        raise ValueError(f"rounds={rounds} is out of range: a search needs at least one round")
    if parallelism < 1:
        raise ValueError(f"parallelism={parallelism} is out of range: must be >= 1")
    select_top = p0.select_top if select_top is None else int(select_top)
    check_selection(select_top, p0.select_seeds)  # a StepError is a ValueError
    check_select_rank(p0.select_rank)
    cluster = cluster or ClusterOptions()
    c = components.build(image)

    def _trial_loop(data, init, state, trials, proxy, detector, proxy_epochs, work, search_name, tracking_uri,
                    experiment, attempts, p):
        with dsl.ParallelFor(trials, parallelism=parallelism) as trial:
            t = c.proxy_trial(
                data=data, init=init, trial=trial, proxy=proxy, detector=detector, epochs=proxy_epochs,
                work=work, search_name=search_name, state=state, tracking_uri=tracking_uri,
                experiment=experiment, attempts=attempts,
            ).set_display_name("proxy-trial")
            _everywhere(_training(t, cluster), p, cluster)
        return t

    @dsl.pipeline(name="search-round", description="One PPO round: proxy trials in parallel, then the update.")
    def search_round(
        data: str, init: str, state: str, trials: List[str], proxy: Dict, detector: str, proxy_epochs: float,
        work: str, search_name: str, tracking_uri: str, experiment: str, attempts: int,
        max_failed_trials: int, node_selector: Dict, tolerations: List[Dict], s3_secret: str,
    ) -> _RoundOutputs:
        p = {"node_selector": node_selector, "tolerations": tolerations, "s3_secret": s3_secret}
        t = _trial_loop(data, init, state, trials, proxy, detector, proxy_epochs, work, search_name, tracking_uri,
                        experiment, attempts, p)
        u = c.controller_update(
            state=state, results=dsl.Collected(t.output), work=work, search_name=search_name,
            max_failed_trials=max_failed_trials, tracking_uri=tracking_uri, experiment=experiment,
        ).set_display_name("controller-update")
        _everywhere(u, p, cluster)
        return _RoundOutputs(u.outputs["state"], u.outputs["trials"])

    @dsl.pipeline(name="selection", description="Train the best sampled losses again with new seeds; pick the best mean.")
    def selection(
        data: str, init: str, state: str, select_seeds: List[int], select_rank: str, proxy: Dict, detector: str,
        proxy_epochs: float,
        work: str, search_name: str, tracking_uri: str, experiment: str, attempts: int,
        node_selector: Dict, tolerations: List[Dict], s3_secret: str,
    ) -> str:
        p = {"node_selector": node_selector, "tolerations": tolerations, "s3_secret": s3_secret}
        sel = c.selection_trials(state=state, top=select_top, seeds=select_seeds, rank=select_rank)
        sel.set_display_name("selection-trials")
        _everywhere(sel, p, cluster)
        t = _trial_loop(data, init, state, sel.output, proxy, detector, proxy_epochs, work, search_name,
                        tracking_uri, experiment, attempts, p)
        s = c.select_loss(state=state, results=dsl.Collected(t.output), work=work, search_name=search_name,
                          tracking_uri=tracking_uri, experiment=experiment, rank=select_rank)
        s.set_display_name("select-loss")
        _everywhere(s, p, cluster)
        return s.output

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"Search a Parameterized AP Loss with PPO ({rounds} rounds), then train it beside the baselines.",
    )
    def search_pipeline(
        dataset: str = p0.dataset,
        work: str = "s3://paploss/work",
        search_name: str = "paploss-search",
        samples: int = p0.samples,
        seed: int = p0.seed,
        split_seed: int = p0.split_seed,
        search_val_fraction: float = p0.search_val_fraction,
        bundled: Dict = p0.bundled,
        detector: str = p0.detector,
        proxy_epochs: float = 0.0,
        final_epochs: float = 0.0,
        proxy: Dict = p0.proxy,
        final: Dict = p0.final,
        pretrain_options: Dict = p0.pretrain,
        controller: Dict = p0.controller,
        max_failed_trials: int = p0.max_failed_trials,
        attempts: int = p0.attempts,
        select_seeds: List[int] = list(p0.select_seeds),
        select_rank: str = p0.select_rank,
        reward_seeds: int = p0.reward_seeds,
        search_splits: int = p0.search_splits,
        tracking_uri: str = "",
        experiment: str = "paploss",
        model_name: str = "paploss-retinanet",
        promote: bool = True,
        node_selector: Dict = {},  # noqa: B006 - KFP reads defaults from the signature
        tolerations: List[Dict] = [],  # noqa: B006
        s3_secret: str = "paploss-s3",
    ) -> str:
        p = {"node_selector": node_selector, "tolerations": tolerations, "s3_secret": s3_secret}
        tr = {"tracking_uri": tracking_uri, "experiment": experiment}
        prep = c.prepare_data(dataset=dataset, work=work, split_seed=split_seed,
                              search_val_fraction=search_val_fraction, bundled=bundled, search_splits=search_splits)
        prep.set_display_name("prepare-data")
        _everywhere(prep, p, cluster)
        warm = c.pretrain(data=prep.output, work=work, config=pretrain_options, seed=seed, detector=detector,
                          proxy=proxy)
        warm.set_display_name("pretrain")
        _everywhere(_training(warm, cluster), p, cluster)
        init = c.init_search(
            work=work, search_name=search_name, rounds=rounds, samples=samples, seed=seed,
            controller=controller, params={"rounds": rounds, "parallelism": parallelism, "image": image or components.DEFAULT_IMAGE},
            dataset=dataset, detector=detector, proxy=proxy, final=final, max_failed_trials=max_failed_trials,
            attempts=attempts, model_name=model_name, reward_seeds=reward_seeds,
            search_splits=search_splits, **tr,
        ).set_display_name("init-search")
        _everywhere(init, p, cluster)
        state, trials = init.outputs["state"], init.outputs["trials"]
        for r in range(rounds):
            rd = search_round(
                data=prep.output, init=warm.output, state=state, trials=trials, proxy=proxy, detector=detector,
                proxy_epochs=proxy_epochs, work=work, search_name=search_name, attempts=attempts,
                max_failed_trials=max_failed_trials, node_selector=node_selector, tolerations=tolerations,
                s3_secret=s3_secret, **tr,
            ).set_display_name(f"round-{r}")
            state, trials = rd.outputs["state"], rd.outputs["trials"]
        if select_top > 0:
            state = selection(
                data=prep.output, init=warm.output, state=state, select_seeds=select_seeds, select_rank=select_rank,
                proxy=proxy, detector=detector, proxy_epochs=proxy_epochs, work=work, search_name=search_name,
                attempts=attempts, node_selector=node_selector, tolerations=tolerations, s3_secret=s3_secret, **tr,
            ).set_display_name("selection").output
        finals = []
        for loss in ("searched", "focal+l1", "focal+giou"):
            f = c.final_train(
                data=prep.output, init=warm.output, loss=loss, final=final, detector=detector, epochs=final_epochs,
                work=work, search_name=search_name, state=state if loss == "searched" else "", seed=seed,
                model_name=model_name, promote=promote, **tr,
            ).set_display_name(f"final-{loss.replace('+', '-')}")
            if loss != "searched":
                f.after(init)  # the baselines run beside the search, once its MLflow run exists
            _everywhere(_training(f, cluster), p, cluster)
            finals.append(f)
        rep = c.report(
            final_searched=finals[0].output, final_l1=finals[1].output, final_giou=finals[2].output,
            state=state, work=work, search_name=search_name, **tr,
        ).set_display_name("report")
        _everywhere(rep, p, cluster)
        return rep.output

    search_pipeline.rounds = rounds  # type: ignore[attr-defined]
    search_pipeline.parallelism = parallelism  # type: ignore[attr-defined]
    search_pipeline.select_top = select_top  # type: ignore[attr-defined]
    return search_pipeline

