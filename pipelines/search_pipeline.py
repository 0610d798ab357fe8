"""The search pipeline: the flow of :mod:`paploss.flow`, task for task, as Kubeflow Pipelines.

::

    prepare-data ─► pretrain ─► init-search ─► round 0 ─► … ─► round R-1 ─► [selection] ─► lr sweep ─► finals
                                                                                          (each loss side by side)
    round r (sub-pipeline "search-round"):
        ParallelFor trial in trials (parallelism):  proxy-trial ─► result JSON
        controller-update(state, Collected(results)) ─► next state, next trials
    selection (sub-pipeline, with select_top > 0):
        selection-trials ─► ParallelFor: proxy-trial ─► select-loss ─► the state holding the choice
    lr sweep (sub-pipeline):
        ParallelFor (loss, lr) in FINAL_LOSSES × the preset's lrs:  lr-trial ─► lr-pick ─► {loss: lr}
    finals (sub-pipeline):
        ParallelFor loss in (searched, start, focal+l1, focal+giou):  final-train at its lr ─► report(Collected)

Compile-time values live in one :class:`PipelineOptions` (``rounds``, ``parallelism``
and ``select_top``: the round loop is a Python loop at definition time and
``ParallelFor`` takes a constant parallelism; the image; the cluster resources);
everything else is a run-time parameter whose default comes from the preset. The
sub-pipelines are built by module-level functions from those options.

Every value a looped task needs from before its loop (data, warm start, state, the
run context) is an *input* of its sub-pipeline: ``kfp.local`` 2.17 replaces a task
output consumed inside ``ParallelFor`` by the loop item. The tasks after
``init-search`` share the search's ``run`` context (a dict made by init-search:
work folder, name, MLflow, resolved training options) instead of a dozen
parameters each.

Cluster settings (ignored by ``kfp.local``): proxy trials and final trainings
request GPUs, CPU and memory and are retried by KFP (pod failures; Python errors
are caught by the trial itself and counted as failed trials); with ``kfp-kubernetes``
every task gets the node selector and tolerations (run-time parameters) and the S3
credentials from the Kubernetes secret named by ``s3_secret``; ``pvc`` mounts a claim
at ``/data`` for a dataset cache.
"""

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple

from kfp import dsl
from kfp import kubernetes

import components
from paploss.packing import TRIALS_PER_GPU_ENV
from paploss.presets import Preset, get_preset
from paploss.steps.options import check_select_rank, check_selection

__all__ = ["ClusterOptions", "PipelineOptions", "build_pipeline", "PIPELINE_NAME", "SECRET_KEYS", "FINAL_LOSSES"]

PIPELINE_NAME = "paploss-search"
#: The keys of the Kubernetes secret named by the ``s3_secret`` parameter, and the
#: environment variables they become in every task.
SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
#: The keys of the Kubernetes secret with MLflow's credentials (``mlflow_secret``, default
#: :data:`MLFLOW_SECRET`), each optional: user and password, or a token.
MLFLOW_SECRET = "paploss-mlflow"
MLFLOW_SECRET_KEYS = {k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")}
#: The losses of the final trainings: the searched one, the search's start and the baselines (SPEC §4).
FINAL_LOSSES = ("searched", "start", "focal+l1", "focal+giou")
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
    trials_per_gpu: int = 1  # proxy trials sharing one GPU under CUDA MPS (paploss.packing)
    trial_accelerator: str = ""  # the resource a packed trial requests ("" = accelerator; e.g. nvidia.com/gpu.shared)
    final_nodes: int = 1  # a final on more than one GPU is a Kubeflow Trainer TrainJob (pipelines.trainjob)
    final_gpus_per_node: int = 1
    max_gpus: int = 0  # the GPUs the finals hold at once (0: no cap)
    trainjob_runtime: str = "torch-distributed"  # the ClusterTrainingRuntime of the TrainJobs
    service_account: str = ""  # of the TrainJobs' pods ("" = the namespace's default)

    def __post_init__(self) -> None:
        if self.gpus < 0 or self.retries < 0:
            raise ValueError(f"gpus={self.gpus} and retries={self.retries} must be >= 0")
        self.finals_resources  # noqa: B018 - checks final_nodes, final_gpus_per_node, max_gpus
        if self.trials_per_gpu > 1:
            self.trial_resources  # noqa: B018 - checks trials_per_gpu against cpu and memory

    @property
    def finals_resources(self):
        """The final trainings' GPUs (:class:`pipelines.trainjob.FinalResources`)."""
        from pipelines.trainjob import FinalResources

        return FinalResources(self.final_nodes, self.final_gpus_per_node, self.max_gpus)

    @property
    def trial_resources(self):
        """What one proxy trial requests (:func:`paploss.packing.trial_resources`)."""
        from paploss.packing import trial_resources

        return trial_resources(self.trials_per_gpu, cpu=self.cpu, memory=self.memory,
                               accelerator=self.trial_accelerator or self.accelerator)

    def placement(self, image: str) -> dict:
        """The finals' placement, a constant input of the final-train task."""
        return {"nodes": self.final_nodes, "gpus_per_node": self.final_gpus_per_node, "image": image,
                "runtime": self.trainjob_runtime, "service_account": self.service_account}


@dataclass(frozen=True)
class PipelineOptions:
    """Everything KFP must know before a run: the shape of the DAG, the image, the resources."""

    preset: Preset
    rounds: int
    parallelism: int
    select_top: int
    image: str
    cluster: ClusterOptions = field(default_factory=ClusterOptions)

    @classmethod
    def of(cls, preset: str | Preset = "quick", rounds: int | None = None, parallelism: int | None = None,
           image: str | None = None, cluster: ClusterOptions | None = None,
           select_top: int | None = None) -> "PipelineOptions":
        """The preset's values where not given, checked (``ValueError`` naming the bad one)."""
        p = get_preset(preset) if isinstance(preset, str) else preset
        o = cls(preset=p, rounds=p.rounds if rounds is None else int(rounds),
                parallelism=p.parallelism if parallelism is None else int(parallelism),
                select_top=p.select_top if select_top is None else int(select_top),
                image=image or components.DEFAULT_IMAGE, cluster=cluster or ClusterOptions())
        if o.rounds < 1:
            raise ValueError(f"rounds={o.rounds} is out of range: a search needs at least one round")
        if o.parallelism < 1:
            raise ValueError(f"parallelism={o.parallelism} is out of range: must be >= 1")
        check_selection(o.select_top, p.select_seeds)  # a StepError is a ValueError
        check_select_rank(p.select_rank)
        return o


def _everywhere(task, k8s: dict, o: PipelineOptions):
    """Settings of every task: node selector, tolerations, S3 secret, PVC, endpoint."""
    cluster = o.cluster
    kubernetes.add_node_selector_json(task, k8s["node_selector"])
    kubernetes.add_toleration_json(task, k8s["tolerations"])
    kubernetes.use_secret_as_env(task, secret_name=k8s["s3_secret"], secret_key_to_env=SECRET_KEYS,
                                 optional=cluster.secret_optional)
    # MLflow credentials for an authenticated server, so tracking_uri holds none (each key optional)
    kubernetes.use_secret_as_env(task, secret_name=k8s["mlflow_secret"],
                                 secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True)
    if cluster.pvc:
        kubernetes.mount_pvc(task, pvc_name=cluster.pvc, mount_path="/data")
        task.set_env_variable("PAPLOSS_CACHE", "/data/paploss-cache")
    if cluster.s3_endpoint:
        task.set_env_variable("AWS_ENDPOINT_URL", cluster.s3_endpoint)
    return task


def _training(task, k8s: dict, o: PipelineOptions, *, gpus: int | None = None, cpu: str = "", memory: str = "",
              accelerator: str = ""):
    """Settings of the training tasks (warm start, proxy trials, final trainings):
    ``gpus`` of ``accelerator`` (defaults: the cluster's), CPU and memory requests, retries."""
    cluster = o.cluster
    gpus = cluster.gpus if gpus is None else gpus
    if gpus:
        task.set_accelerator_type(accelerator or cluster.accelerator).set_accelerator_limit(gpus)
    task.set_cpu_request(cpu or cluster.cpu).set_memory_request(memory or cluster.memory)
    if cluster.retries:
        task.set_retry(num_retries=cluster.retries, backoff_duration=cluster.backoff)
    return _everywhere(task, k8s, o)


def _proxy(task, k8s: dict, o: PipelineOptions):
    """A proxy trial's resources: one GPU, or one of its ``trials_per_gpu`` shares."""
    if o.cluster.trials_per_gpu == 1 or not o.cluster.gpus:
        return _training(task, k8s, o)
    share = o.cluster.trial_resources
    task.set_env_variable(TRIALS_PER_GPU_ENV, str(o.cluster.trials_per_gpu))  # the trial checks the GPU's memory
    return _training(task, k8s, o, gpus=share.accelerator_limit, cpu=share.cpu, memory=share.memory,
                     accelerator=share.accelerator)


def _final(task, k8s: dict, o: PipelineOptions):
    """A final training's resources; a final that runs as a TrainJob only waits for it."""
    if o.cluster.finals_resources.distributed:
        return _training(task, k8s, o, gpus=0, cpu="500m", memory="1G")
    return _training(task, k8s, o)


def _trials(c, o: PipelineOptions, k8s: dict, data, init, state, trials, run):
    """A ParallelFor of proxy trials (a round's samples or the selection's candidates)."""
    with dsl.ParallelFor(trials, parallelism=o.parallelism) as trial:
        t = c.proxy_trial(data=data, init=init, trial=trial, state=state, run=run).set_display_name("proxy-trial")
        _proxy(t, k8s, o)
    return t


def search_round(c, o: PipelineOptions):
    """The sub-pipeline of one PPO round."""

    @dsl.pipeline(name="search-round", description="One PPO round: proxy trials in parallel, then the update.")
    def round_pipeline(data: str, init: str, state: str, trials: List[str], run: Dict, node_selector: Dict,
                       tolerations: List[Dict], s3_secret: str, mlflow_secret: str) -> _RoundOutputs:
        k8s = {"node_selector": node_selector, "tolerations": tolerations, "s3_secret": s3_secret,
               "mlflow_secret": mlflow_secret}
        t = _trials(c, o, k8s, data, init, state, trials, run)
        u = c.controller_update(state=state, results=dsl.Collected(t.output), run=run)
        _everywhere(u.set_display_name("controller-update"), k8s, o)
        return _RoundOutputs(u.outputs["state"], u.outputs["trials"])

    return round_pipeline


def selection(c, o: PipelineOptions):
    """The sub-pipeline of the selection stage (``select_top`` > 0)."""

    @dsl.pipeline(name="selection", description="Train the best sampled losses again with new seeds; pick the best mean.")
    def selection_pipeline(data: str, init: str, state: str, select_seeds: List[int], select_rank: str, run: Dict,
                           node_selector: Dict, tolerations: List[Dict], s3_secret: str, mlflow_secret: str) -> str:
        k8s = {"node_selector": node_selector, "tolerations": tolerations, "s3_secret": s3_secret,
               "mlflow_secret": mlflow_secret}
        sel = c.selection_trials(state=state, top=o.select_top, seeds=select_seeds, rank=select_rank)
        _everywhere(sel.set_display_name("selection-trials"), k8s, o)
        t = _trials(c, o, k8s, data, init, state, sel.output, run)
        s = c.select_loss(state=state, results=dsl.Collected(t.output), rank=select_rank, run=run)
        _everywhere(s.set_display_name("select-loss"), k8s, o)
        return s.output

    return selection_pipeline


def lr_sweep(c, o: PipelineOptions):
    """The sub-pipeline of the learning-rate sweep: each final loss × each lr of the
    preset's sweep (a compile-time list), side by side, then the best lr per loss."""
    from paploss import steps

    items = steps.sweep_items(FINAL_LOSSES, o.preset.lr_sweep, steps.train_options(o.preset.final, o.preset.detector))

    @dsl.pipeline(name="lr-sweep", description="Train each final loss briefly at each lr; pick its best on search-val.")
    def sweep_pipeline(data: str, init: str, state: str, run: Dict, node_selector: Dict, tolerations: List[Dict],
                       s3_secret: str, mlflow_secret: str) -> str:
        k8s = {"node_selector": node_selector, "tolerations": tolerations, "s3_secret": s3_secret,
               "mlflow_secret": mlflow_secret}
        with dsl.ParallelFor(items, parallelism=o.parallelism) as item:
            t = c.lr_trial(data=data, init=init, item=item, state=state, sweep=dict(o.preset.lr_sweep), run=run)
            _proxy(t.set_display_name("lr-trial"), k8s, o)
        pick = c.lr_pick(results=dsl.Collected(t.output), run=run)
        _everywhere(pick.set_display_name("lr-pick"), k8s, o)
        return pick.output

    return sweep_pipeline


def finals(c, o: PipelineOptions):
    """The sub-pipeline of the final trainings, side by side, each at its lr of the sweep, and the report."""

    @dsl.pipeline(name="finals", description="Train the searched loss and the baselines side by side; the AP table.")
    def finals_pipeline(data: str, init: str, state: str, run: Dict, lrs: str, node_selector: Dict,
                        tolerations: List[Dict], s3_secret: str, mlflow_secret: str) -> str:
        k8s = {"node_selector": node_selector, "tolerations": tolerations, "s3_secret": s3_secret,
               "mlflow_secret": mlflow_secret}
        at_once = o.cluster.finals_resources.at_once(len(FINAL_LOSSES))  # the GPU cap
        with dsl.ParallelFor(list(FINAL_LOSSES), parallelism=at_once) as loss:
            f = c.final_train(data=data, init=init, loss=loss, state=state, run=run, lrs=lrs,
                              placement=o.cluster.placement(o.image), kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                              **k8s)
            _final(f.set_display_name("final-train"), k8s, o)
        rep = c.report(finals=dsl.Collected(f.output), state=state, run=run)
        _everywhere(rep.set_display_name("report"), k8s, o)
        return rep.outputs["Output"]

    return finals_pipeline


def build_pipeline(rounds: int | None = None, parallelism: int | None = None, image: str | None = None,
                   preset: str | Preset = "quick", cluster: ClusterOptions | None = None,
                   select_top: int | None = None):
    """The ``@dsl.pipeline`` of one search (:meth:`PipelineOptions.of` for the
    compile-time values); the run-time parameters and their preset defaults are the
    arguments of ``search_pipeline`` below (``docs/pipeline.md`` says what each does)."""
    o = PipelineOptions.of(preset, rounds, parallelism, image, cluster, select_top)
    p, c = o.preset, components.build(o.image)
    round_pipeline, selection_pipeline, finals_pipeline = search_round(c, o), selection(c, o), finals(c, o)
    from paploss import steps

    # fewer than two lrs: nothing to choose, no sweep tasks; every final trains at the final options' lr
    sweep_pipeline = lr_sweep(c, o) if len(steps.sweep_lrs(p.lr_sweep)) >= 2 else None

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"Search a Parameterized AP Loss with PPO ({o.rounds} rounds), then train it beside the baselines.",
    )
    def search_pipeline(
        dataset: str = p.dataset, work: str = "s3://paploss/work", search_name: str = "paploss-search",
        samples: int = p.samples, seed: int = p.seed, split_seed: int = p.split_seed,
        search_val_fraction: float = p.search_val_fraction, bundled: Dict = p.bundled, detector: str = p.detector,
        proxy_epochs: float = 0.0, final_epochs: float = 0.0, proxy: Dict = p.proxy, final: Dict = p.final,
        pretrain_options: Dict = p.pretrain, controller: Dict = p.controller,
        max_failed_trials: int = p.max_failed_trials, attempts: int = p.attempts,
        select_seeds: List[int] = list(p.select_seeds), select_rank: str = p.select_rank,
        reward_seeds: int = p.reward_seeds, search_splits: int = p.search_splits, tracking_uri: str = "",
        experiment: str = "paploss", model_name: str = "paploss-retinanet", promote: bool = True,
        promote_rule: str = "beat-baselines",
        node_selector: Dict = {},  # noqa: B006 - KFP reads defaults from the signature
        tolerations: List[Dict] = [],  # noqa: B006
        s3_secret: str = "paploss-s3", mlflow_secret: str = MLFLOW_SECRET,
    ) -> str:
        k8s = {"node_selector": node_selector, "tolerations": tolerations, "s3_secret": s3_secret,
               "mlflow_secret": mlflow_secret}
        prep = c.prepare_data(dataset=dataset, work=work, split_seed=split_seed,
                              search_val_fraction=search_val_fraction, bundled=bundled, search_splits=search_splits)
        _everywhere(prep.set_display_name("prepare-data"), k8s, o)
        warm = c.pretrain(data=prep.output, work=work, config=pretrain_options, seed=seed, detector=detector,
                          proxy=proxy)
        _training(warm.set_display_name("pretrain"), k8s, o)
        init = c.init_search(
            work=work, search_name=search_name, rounds=o.rounds, samples=samples, seed=seed, controller=controller,
            tracking_uri=tracking_uri, experiment=experiment,
            params={"rounds": o.rounds, "parallelism": o.parallelism, "image": o.image, "dataset": dataset},
            detector=detector, proxy=proxy, final=final, proxy_epochs=proxy_epochs, final_epochs=final_epochs,
            max_failed_trials=max_failed_trials, attempts=attempts, model_name=model_name, promote=promote,
            promote_rule=promote_rule, reward_seeds=reward_seeds, search_splits=search_splits,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        _everywhere(init.set_display_name("init-search"), k8s, o)
        state, trials, run = init.outputs["state"], init.outputs["trials"], init.outputs["run"]
        for r in range(o.rounds):
            rd = round_pipeline(data=prep.output, init=warm.output, state=state, trials=trials, run=run, **k8s)
            state, trials = rd.set_display_name(f"round-{r}").outputs["state"], rd.outputs["trials"]
        if o.select_top > 0:
            state = selection_pipeline(data=prep.output, init=warm.output, state=state, select_seeds=select_seeds,
                                       select_rank=select_rank, run=run, **k8s).set_display_name("selection").output
        lrs = "{}" if sweep_pipeline is None else sweep_pipeline(
            data=prep.output, init=warm.output, state=state, run=run, **k8s).set_display_name("lr-sweep").output
        return finals_pipeline(data=prep.output, init=warm.output, state=state, run=run, lrs=lrs,
                               **k8s).set_display_name("finals").output

    search_pipeline.rounds = o.rounds  # type: ignore[attr-defined]
    search_pipeline.parallelism = o.parallelism  # type: ignore[attr-defined]
    search_pipeline.select_top = o.select_top  # type: ignore[attr-defined]
    return search_pipeline
