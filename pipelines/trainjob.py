"""A final training on several GPUs or nodes as a Kubeflow Trainer ``TrainJob``.

A final training that needs more than one GPU runs where the platform already runs
distributed training: Kubeflow Trainer's ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``)
on the cluster's torch runtime (a ``ClusterTrainingRuntime``, by default
``torch-distributed``). The runtime starts ``numNodes`` pods and sets the ``PET_*``
variables (nodes, processes per node, node rank, master address and port) that
``torchrun`` reads; the job's command is ::

    torchrun --no-python paploss train <the training's own options>

so every process runs ``paploss train`` under DDP (NCCL on GPUs, gloo on CPUs): each
rank reads its share of every batch from S3, rank 0 evaluates and writes
``checkpoint.pt`` / ``metrics.json`` to ``--out`` (an ``s3://`` folder). A retried
training resumes from the checkpoint there (``paploss train``'s own ``resume``).

Three layers, each usable alone:

- :func:`build_trainjob` — a pure function: options in, manifest (a dict) out. The
  tests load it into the ``kubeflow-trainer-api`` models.
- :class:`KubeClient` — the three calls made on the Kubernetes API (get / create /
  delete a TrainJob, and the API group's discovery), over plain HTTP(S) with the
  pod's service-account token; ``api=URL`` talks to any server (tests: a loopback fake).
- :func:`submit_and_wait` — create (or attach to) the TrainJob, print its status while
  it runs, return when it completes, raise :class:`TrainJobError` (one line) when it
  fails, when Kubeflow Trainer is not installed, or when the pod may not create it.

:func:`run_final_trainjob` joins them for the pipeline's final-training task and
``paploss train --trainjob``.

What a retry does: a TrainJob of the same name (the name is derived from what it
trains, see :func:`trainjob_name`) that is running or complete is attached to, not
created again; one that failed is deleted and created again, and the new one resumes
from the last checkpoint in ``--out``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from paploss.errors import RunError

__all__ = [
    "API_VERSION", "DEFAULT_RUNTIME", "TrainJobOptions", "TrainJobError", "KubeClient", "FinalResources",
    "build_trainjob", "trainjob_name", "check_remote_args", "forward_args", "train_args_from_options",
    "submit_and_wait", "run_final_trainjob", "job_state", "read_result",
]

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_RUNTIME = "torch-distributed"
#: The replicated job (and its container) of Trainer's torch runtimes that runs the training.
TRAINER_JOB = "node"
#: Owner of this program's entry in ``spec.runtimePatches`` (patches are keyed by manager).
PATCH_MANAGER = "paploss/final-train"
COMMAND = ["torchrun", "--no-python", "paploss", "train"]
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: Keys of the S3 secret (the pipeline's ``s3_secret``) and the variables they become.
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
#: Keys of the MLflow secret, each optional (basic auth, or a token).
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
LABEL_SEARCH, LABEL_RUN, ANNOTATION_SPEC = "paploss/search-name", "paploss/kfp-run-id", "paploss/spec-sha256"
#: ``paploss train`` options that name data or outputs: every node must reach them.
REMOTE_OPTIONS = ("--data", "--out", "--init", "--spec")
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class TrainJobError(RunError):
    """A TrainJob could not be created, failed, or Kubeflow Trainer is missing (one line)."""


# ------------------------------------------------------------------ the manifest


@dataclass(frozen=True)
class TrainJobOptions:
    """Where and how a final training runs on the cluster.

    ``cpu`` / ``memory`` per node default to 4 CPUs and 16 GiB per GPU (at least one
    GPU's worth); ``gpus_per_node=0`` trains on CPUs (one process per node, gloo).
    ``shm``: size of the memory-backed ``/dev/shm`` (NCCL and data loaders need more
    than a container's default 64 MiB; "" keeps the default).
    """

    name: str
    image: str
    nodes: int = 1
    gpus_per_node: int = 1
    namespace: str = ""
    runtime: str = DEFAULT_RUNTIME
    accelerator: str = "nvidia.com/gpu"
    cpu: str = ""
    memory: str = ""
    shm: str = "16Gi"
    s3_secret: str = "paploss-s3"
    s3_endpoint: str = ""
    mlflow_secret: str = ""
    tracking_uri: str = ""
    service_account: str = ""
    search_name: str = ""
    run_id: str = ""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or len(self.name) > 63:
            raise ValueError(f"TrainJob name {self.name!r} must be a DNS label: lower-case letters, digits and '-', "
                             "starting with a letter, at most 63 characters")
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes} is out of range: must be >= 1")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node={self.gpus_per_node} is out of range: must be >= 0")
        if not self.image:
            raise ValueError("no image for the TrainJob: give the image of the pipeline's components "
                             "(paploss train --image, or PAPLOSS_IMAGE)")
        if not self.runtime:
            raise ValueError("no training runtime named (e.g. torch-distributed)")

    @property
    def procs_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


def _env(name: str, value: str) -> dict:
    return {"name": name, "value": value}


def _secret_env(secret: str, key: str) -> dict:
    return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}


def _label_value(value: str) -> str:
    """A label value: at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric."""
    v = re.sub(r"[^A-Za-z0-9._-]", "-", value)[:63]
    return v.strip("._-")


def build_trainjob(train_args: Sequence[str], opts: TrainJobOptions) -> dict:
    """The ``TrainJob`` manifest that runs ``paploss train <train_args>`` under torchrun
    on ``opts.nodes`` × ``opts.gpus_per_node`` GPUs (a dict, ready for YAML or the API).

    Environment of every process: the S3 keys from the secret ``opts.s3_secret``
    (optional keys: IAM roles may provide access instead), ``AWS_ENDPOINT_URL``, the
    MLflow URI and the optional MLflow credentials from ``opts.mlflow_secret``. The
    service account, node selector, tolerations and ``/dev/shm`` go through
    ``spec.runtimePatches`` onto the runtime's ``node`` job, the only way the v1alpha1
    API sets pod fields.
    """
    args = [str(a) for a in train_args]
    env = [_env("PYTHONUNBUFFERED", "1")]
    if opts.s3_secret:
        env += [_secret_env(opts.s3_secret, k) for k in S3_KEYS]
    if opts.s3_endpoint:
        env.append(_env("AWS_ENDPOINT_URL", opts.s3_endpoint))
    if opts.tracking_uri:
        env.append(_env("MLFLOW_TRACKING_URI", opts.tracking_uri))
    if opts.mlflow_secret:
        env += [_secret_env(opts.mlflow_secret, k) for k in MLFLOW_KEYS]
    gpus = max(opts.gpus_per_node, 1)
    requests = {"cpu": opts.cpu or str(4 * gpus), "memory": opts.memory or f"{16 * gpus}Gi"}
    resources: dict[str, Any] = {"requests": requests}
    if opts.gpus_per_node:
        resources["limits"] = {opts.accelerator: str(opts.gpus_per_node)}
    trainer = {
        "image": opts.image,
        "command": list(COMMAND),
        "args": args,
        "numNodes": opts.nodes,
        "numProcPerNode": opts.procs_per_node,
        "resourcesPerNode": resources,
        "env": env,
    }
    labels = {"app.kubernetes.io/name": "paploss", "app.kubernetes.io/component": "final-training"}
    if opts.search_name and _label_value(opts.search_name):
        labels[LABEL_SEARCH] = _label_value(opts.search_name)
    if opts.run_id and _label_value(opts.run_id):
        labels[LABEL_RUN] = _label_value(opts.run_id)
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": opts.runtime},
        "trainer": trainer,
    }
    pod: dict[str, Any] = {}
    if opts.service_account:
        pod["serviceAccountName"] = opts.service_account
    if opts.node_selector:
        pod["nodeSelector"] = dict(opts.node_selector)
    if opts.tolerations:
        pod["tolerations"] = [dict(t) for t in opts.tolerations]
    if opts.shm:
        pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm}}]
        pod["containers"] = [{"name": TRAINER_JOB, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]
    if pod:
        spec["runtimePatches"] = [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                {"name": TRAINER_JOB, "template": {"spec": {"template": {"spec": pod}}}},
            ]}}},
        }]
    metadata: dict[str, Any] = {"name": opts.name, "labels": labels,
                                "annotations": {ANNOTATION_SPEC: _digest(spec)}}
    if opts.namespace:
        metadata["namespace"] = opts.namespace
    return {"apiVersion": API_VERSION, "kind": "TrainJob", "metadata": metadata, "spec": spec}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def trainjob_name(prefix: str, *parts: Any) -> str:
    """A TrainJob name that is the same for the same ``parts`` (so a retry finds its
    job) and different otherwise: ``<prefix>-<10 hex digits>``, the prefix cut to keep
    the name at 40 characters (pods and services are named after it)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = "paploss-" + slug
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{slug[:29].rstrip('-')}-{digest}"


def _option_values(args: Sequence[str], option: str) -> list[str]:
    out = []
    for i, a in enumerate(args):
        if a == option and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(option + "="):
            out.append(a.split("=", 1)[1])
    return out


def check_remote_args(train_args: Sequence[str]) -> None:
    """Every node must read the data and write the checkpoint: ``--data`` and ``--out``
    are required and, like ``--init`` / ``--spec`` when given, must be ``s3://`` URIs."""
    for option in REMOTE_OPTIONS:
        values = _option_values(train_args, option)
        if not values and option in ("--data", "--out"):
            raise ValueError(f"a TrainJob needs {option} (an s3:// URI every node can reach; --out also holds the "
                             "checkpoint a retried training resumes from)")
        for v in values:
            if not v.startswith("s3://"):
                raise ValueError(f"{option} {v!r} is not an s3:// URI: the TrainJob's pods cannot see this machine's "
                                 "files")


def forward_args(command, values: Mapping[str, Any], given: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """The command-line options that reproduce ``values`` for the click ``command``:
    only those named in ``given`` (the ones the user set), minus ``exclude``. Flags
    are written bare, ``multiple`` options once per value."""
    import click

    given, exclude = set(given), set(exclude)
    out: list[str] = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.name not in given or param.name in exclude:
            continue
        value = values.get(param.name)
        flag = max((o for o in param.opts if o.startswith("--")), key=len, default=param.opts[0])
        if param.is_flag and not param.secondary_opts:
            if value:
                out.append(flag)
        elif param.is_flag:
            out.append(flag if value else param.secondary_opts[0])
        elif value is None:
            continue
        elif param.multiple:
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


#: TrainConfig field -> ``paploss train`` option name, where they differ.
_CONFIG_TO_OPTION = {"num_threads": "threads", "out": "out_dir"}


def train_args_from_options(options: Mapping[str, Any]) -> list[str]:
    """``paploss train`` arguments for training options given by name (the option names
    of ``paploss train``, or TrainConfig fields), e.g. ``{"data": "s3://…", "out_dir":
    "s3://…", "preset": "paper", "iterations": 90000}``. ``resume=False`` becomes
    ``--no-resume``; a TrainConfig field without a flag of its own goes into ``--config``
    (a JSON object), so every option reaches the job."""
    import json

    from paploss.engine_cli import train

    values: dict[str, Any] = {}
    config: dict[str, Any] = {}
    known = {p.name for p in train.params} - {"config_json"}
    for key, value in options.items():
        name = _CONFIG_TO_OPTION.get(key, key)
        if key == "resume":
            name, value = "no_resume", not value
        if name in known:
            values[name] = value
        else:
            config[key] = value
    if config:
        values["config_json"] = json.dumps(config, sort_keys=True)
    return forward_args(train, values, given=values)


# ------------------------------------------------------------------ the resources of the finals


@dataclass(frozen=True)
class FinalResources:
    """GPUs of the final trainings (compile options).

    ``nodes`` × ``gpus_per_node`` GPUs per final; more than one makes each final a
    TrainJob. ``max_gpus`` caps the GPUs the finals hold at once (0: no cap): at most
    ``at_once`` finals run beside each other.
    """

    nodes: int = 1
    gpus_per_node: int = 1
    max_gpus: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.max_gpus < 0:
            raise ValueError(f"final_nodes={self.nodes} (>= 1), final_gpus_per_node={self.gpus_per_node} (>= 0) "
                             f"and max_gpus={self.max_gpus} (>= 0) are out of range")
        if self.max_gpus and self.max_gpus < self.gpus:
            raise ValueError(f"max_gpus={self.max_gpus} is below the GPUs of one final training "
                             f"({self.nodes} nodes x {self.gpus_per_node} GPUs = {self.gpus})")

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def distributed(self) -> bool:
        """Whether a final is a TrainJob (more than one GPU, or more than one node)."""
        return self.gpus > 1 or self.nodes > 1

    def at_once(self, finals: int) -> int:
        """How many of ``finals`` final trainings may run beside each other."""
        if not self.max_gpus or not self.gpus:
            return finals
        return max(1, min(finals, self.max_gpus // self.gpus))


# ------------------------------------------------------------------ the Kubernetes API


@dataclass
class KubeClient:
    """The few Kubernetes API calls a TrainJob needs, over HTTP(S).

    ``api``: the API server's URL; default (in a pod): ``https://$KUBERNETES_SERVICE_HOST:
    $KUBERNETES_SERVICE_PORT`` with the service account's token and CA. The token file is
    read at each call (Kubernetes rotates it).
    """

    api: str = ""
    token_file: Path | None = None
    ca_file: Path | None = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.api:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise TrainJobError("no Kubernetes API: not running in a pod (KUBERNETES_SERVICE_HOST is unset) and "
                                    "no API URL given (--k8s-api)")
            self.api = f"https://{host}:{port}"
            self.token_file = self.token_file or SERVICE_ACCOUNT_DIR / "token"
            self.ca_file = self.ca_file or SERVICE_ACCOUNT_DIR / "ca.crt"
        self.api = self.api.rstrip("/")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, parsed JSON body or None) of one call; 4xx/5xx are returned, not raised."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token_file and Path(self.token_file).exists():
            req.add_header("Authorization", "Bearer " + Path(self.token_file).read_text().strip())
        context = None
        if self.api.startswith("https://"):
            cafile = str(self.ca_file) if self.ca_file and Path(self.ca_file).exists() else None
            context = ssl.create_default_context(cafile=cafile)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=context) as resp:
                return resp.status, _json(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _json(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrainJobError(f"cannot reach the Kubernetes API at {self.api}: {reason}") from None

    def jobs_path(self, namespace: str, name: str = "") -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}" + (f"/{name}" if name else "")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"message": raw[:200].decode(errors="replace")}


def _message(body: Any) -> str:
    text = body.get("message", "") if isinstance(body, dict) else ""
    return " ".join(str(text).split()) or "no message"


def _not_installed(detail: str) -> TrainJobError:
    return TrainJobError(f"Kubeflow Trainer is not installed on the cluster (no {PLURAL}.{GROUP}): {detail}; "
                         "install it and its torch runtime (docs/deployment.md), or train on one GPU")


def _check(status: int, body: Any, what: str, namespace: str = "") -> None:
    where = f" in namespace {namespace!r}" if namespace else ""
    if status in (401, 403):
        raise TrainJobError(f"the Kubernetes API refused to {what}{where} ({status}: {_message(body)}); give the "
                            "pod's service account the Role in docs/deployment.md")
    if status >= 400:
        raise TrainJobError(f"the Kubernetes API could not {what}{where} ({status}: {_message(body)})")


def _ensure_installed(client: KubeClient) -> None:
    status, body = client.request("GET", f"/apis/{GROUP}/{VERSION}")
    if status == 404:
        raise _not_installed(f"GET /apis/{GROUP}/{VERSION} answered 404")
    _check(status, body, f"read the API group {GROUP}")
    names = {r.get("name") for r in (body or {}).get("resources", [])}
    if PLURAL not in names:
        raise _not_installed(f"the API group {GROUP}/{VERSION} has no {PLURAL} resource")


# ------------------------------------------------------------------ waiting


def job_state(job: Mapping[str, Any]) -> tuple[str, str]:
    """(state, detail) of a TrainJob from its status: ``Complete``, ``Failed`` or
    ``Suspended`` (a condition that is True; Suspended: e.g. queued by Kueue),
    ``Running`` (child jobs active), or ``Created``."""
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    for state in ("Failed", "Complete", "Suspended"):
        if state in conditions:
            c = conditions[state]
            detail = ": ".join(x for x in (c.get("reason", ""), " ".join(str(c.get("message", "")).split())) if x)
            return state, detail
    jobs = status.get("jobsStatus") or []
    if jobs:
        total = {k: sum(int(j.get(k, 0)) for j in jobs) for k in ("active", "ready", "succeeded", "failed")}
        return "Running", ", ".join(f"{v} {k}" for k, v in total.items() if v) or "starting"
    return "Created", "waiting for the runtime to start its pods"


def submit_and_wait(
    client: KubeClient,
    manifest: Mapping[str, Any],
    namespace: str,
    *,
    poll: float = 30.0,
    timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Create the TrainJob (or attach to the one of the same name), print a line each
    time its state changes, and return its last object once it is ``Complete``.

    Raises :class:`TrainJobError` with one line when: Kubeflow Trainer is not installed
    (its API group or ``trainjobs`` resource is missing), the API refuses the call,
    the job fails (its ``Failed`` condition's reason and message, and where the logs
    are), a job of that name exists with another spec, or ``timeout`` seconds pass.
    A job of that name that failed before is deleted and created again (it resumes
    from its checkpoint); one running or complete is attached to.
    """
    echo = echo or (lambda line: print(line, flush=True))
    name = manifest["metadata"]["name"]
    where = f"{namespace}/{name}"
    logs = f"kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name}"
    body_manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    _ensure_installed(client)

    status, job = client.request("GET", client.jobs_path(namespace, name))
    if status == 200:
        theirs = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC)
        ours = manifest["metadata"].get("annotations", {}).get(ANNOTATION_SPEC)
        if theirs and ours and theirs != ours:
            raise TrainJobError(f"TrainJob {where} exists with another spec: delete it "
                                f"(kubectl -n {namespace} delete trainjob {name}) or choose another name")
        state, detail = job_state(job)
        if state == "Failed":
            echo(f"trainjob {where}: an earlier attempt failed ({detail}); deleting it and starting again "
                 "(the training resumes from its last checkpoint)")
            _delete_and_wait(client, namespace, name, poll=poll, sleep=sleep)
            status = 404
        else:
            echo(f"trainjob {where}: exists ({state}); attaching to it")
    elif status != 404:
        _check(status, job, f"read TrainJob {name}", namespace)
    if status == 404:
        status, job = client.request("POST", client.jobs_path(namespace), body_manifest)
        if status == 404:
            raise _not_installed(f"POST {client.jobs_path(namespace)} answered 404")
        created = status != 409
        if not created:
            echo(f"trainjob {where}: created meanwhile by another attempt; attaching to it")
            status, job = client.request("GET", client.jobs_path(namespace, name))
        _check(status, job, "create TrainJobs", namespace)
        if created:
            trainer = manifest["spec"]["trainer"]
            echo(f"trainjob {where}: created on runtime {manifest['spec']['runtimeRef']['name']} "
                 f"({trainer['numNodes']} nodes x {trainer['numProcPerNode']} processes)")

    start, last = time.monotonic(), None
    while True:
        state, detail = job_state(job)
        if (state, detail) != last:
            echo(f"trainjob {where}: {state}" + (f" ({detail})" if detail else ""))
            last = (state, detail)
        if state == "Complete":
            return dict(job)
        if state == "Failed":
            raise TrainJobError(f"TrainJob {where} failed: {detail or 'no reason given'} (logs: {logs})")
        if timeout is not None and time.monotonic() - start > timeout:
            raise TrainJobError(f"TrainJob {where} did not finish in {timeout:.0f} s (still {state}); it keeps "
                                f"running: kubectl -n {namespace} delete trainjob {name} stops it")
        sleep(poll)
        status, job = client.request("GET", client.jobs_path(namespace, name))
        if status == 404:
            raise TrainJobError(f"TrainJob {where} was deleted while it ran")
        _check(status, job, f"read TrainJob {name}", namespace)


def _delete_and_wait(client: KubeClient, namespace: str, name: str, *, poll: float, sleep, limit: int = 120) -> None:
    path = client.jobs_path(namespace, name)
    status, body = client.request("DELETE", path, {"propagationPolicy": "Foreground"})
    if status not in (200, 202, 404):
        _check(status, body, f"delete the failed TrainJob {name}", namespace)
    for _ in range(limit):
        status, body = client.request("GET", path)
        if status == 404:
            return
        sleep(min(poll, 5.0))
    raise TrainJobError(f"TrainJob {namespace}/{name} was deleted but is still there after {limit} checks")


# ------------------------------------------------------------------ the entry point


def _namespace(namespace: str | None) -> str:
    if namespace:
        return namespace
    path = SERVICE_ACCOUNT_DIR / "namespace"
    if path.exists():
        return path.read_text().strip()
    raise TrainJobError("no namespace for the TrainJob: not running in a pod, give one (--namespace)")


def run_final_trainjob(
    train_args: Sequence[str],
    *,
    nodes: int,
    gpus_per_node: int,
    image: str,
    namespace: str | None = None,
    name: str | None = None,
    search_name: str = "",
    task: str = "",
    run_id: str = "",
    dry_run: bool = False,
    k8s_api: str = "",
    poll: float = 30.0,
    timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
    **options: Any,
) -> dict:
    """Run ``paploss train <train_args>`` as a TrainJob on ``nodes`` × ``gpus_per_node``
    GPUs and wait for it; return the finished TrainJob (with ``dry_run``: the manifest,
    contacting nothing).

    ``name`` default: ``paploss-<search_name>-<task>-<digest>`` (:func:`trainjob_name`; the
    digest of search name, task, KFP run id, arguments, size and image), so a retry of
    the same task in the same run attaches to its job and nothing else does. ``namespace`` default: the
    pod's own. ``options``: the other :class:`TrainJobOptions` fields (``runtime``,
    ``s3_secret``, ``s3_endpoint``, ``mlflow_secret``, ``tracking_uri``,
    ``service_account``, ``cpu``, ``memory``, ``shm``, ``node_selector``, ``tolerations``,
    ``accelerator``). ``--data`` and ``--out`` must be ``s3://`` URIs (:func:`check_remote_args`).
    """
    args = [str(a) for a in train_args]
    check_remote_args(args)
    prefix = "-".join(p for p in ("paploss", search_name, task) if p) if (search_name or task) else "paploss-train"
    name = name or trainjob_name(prefix, search_name, task, run_id, args, nodes, gpus_per_node, image)
    opts = TrainJobOptions(name=name, image=image, nodes=nodes, gpus_per_node=gpus_per_node,
                           namespace=namespace or "", search_name=search_name, run_id=run_id, **options)
    if not dry_run:
        namespace = _namespace(namespace)
        opts = replace(opts, namespace=namespace)
    manifest = build_trainjob(args, opts)
    if dry_run:
        return manifest
    return submit_and_wait(KubeClient(api=k8s_api), manifest, namespace, poll=poll, timeout=timeout, echo=echo)


def manifest_yaml(manifest: Mapping[str, Any]) -> str:
    """The manifest as YAML (``kubectl apply -f -`` takes it)."""
    import yaml

    return yaml.safe_dump(dict(manifest), sort_keys=False, default_flow_style=False)



def read_result(train_args: Sequence[str], job: Mapping[str, Any] | None = None) -> dict:
    """What the finished job's rank 0 wrote to ``--out``: ``metrics.json`` (metrics,
    diverged, iterations, seconds, …) and the checkpoint's URI. Raises
    :class:`TrainJobError` (one line) when the file cannot be read."""
    from paploss import storage

    out = _option_values(train_args, "--out")[-1]
    where = f"TrainJob {job['metadata'].get('namespace', '')}/{job['metadata']['name']} " if job else "the TrainJob "
    uri = storage.join(out, "metrics.json")
    try:
        result = storage.read_json(uri)
    except (OSError, ValueError) as exc:  # StorageError is an OSError
        raise TrainJobError(f"{where}completed, but {uri} cannot be read: {' '.join(str(exc).split())}") from None
    result.pop("config", None)
    return {**result, "checkpoint": storage.join(out, "checkpoint.pt")}


# ------------------------------------------------------------------ `paploss train --trainjob`

#: Options of ``paploss train`` that place the training (not passed on to the job).
PLACEMENT = ("nodes", "gpus_per_node", "trainjob", "dry_run", "image", "namespace", "k8s_api", "runtime",
             "s3_secret", "mlflow_secret", "service_account")


def wants_trainjob(params: Mapping[str, Any]) -> bool:
    """Whether ``paploss train``'s options ask for a TrainJob; refuses a size with
    more than one GPU without ``--trainjob`` (one machine: torchrun yourself)."""
    import click

    nodes, gpus = params.get("nodes") or 1, params.get("gpus_per_node")
    gpus = 1 if gpus is None else gpus
    if params.get("trainjob"):
        return True
    if params.get("dry_run"):
        raise click.UsageError("--dry-run prints the TrainJob of --trainjob: add --trainjob")
    if nodes > 1 or gpus > 1:
        raise click.UsageError(
            f"--nodes {nodes} x --gpus-per-node {gpus} needs --trainjob (a Kubeflow Trainer TrainJob); on this "
            f"machine's GPUs run `torchrun --nproc-per-node {gpus} -m paploss.cli train ...` instead")
    return False


def train_command(ctx, params: Mapping[str, Any]) -> None:
    """``paploss train … --trainjob``: the same training as a TrainJob (the options the
    user gave, minus the placement ones, become the job's ``paploss train`` arguments);
    ``--dry-run`` prints the manifest as YAML and contacts nothing."""
    import click
    from click.core import ParameterSource

    given = {n for n in params if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE,
                                                                   ParameterSource.ENVIRONMENT)}
    args = forward_args(ctx.command, params, given, exclude=PLACEMENT)
    options = {k: params[k] for k in ("runtime", "s3_secret", "mlflow_secret", "service_account") if params.get(k)}
    for env, key in (("AWS_ENDPOINT_URL", "s3_endpoint"), ("MLFLOW_TRACKING_URI", "tracking_uri")):
        if os.environ.get(env):
            options[key] = os.environ[env]
    try:
        result = run_final_trainjob(
            args, nodes=params["nodes"], gpus_per_node=params["gpus_per_node"], image=params.get("image") or "",
            namespace=params.get("namespace"), dry_run=params["dry_run"], k8s_api=params.get("k8s_api") or "",
            poll=float(os.environ.get("PAPLOSS_TRAINJOB_POLL", "30")), echo=click.echo, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except TrainJobError as exc:
        raise click.ClickException(str(exc)) from None
    if params["dry_run"]:
        click.echo(manifest_yaml(result), nl=False)
        return
    try:
        done = read_result(args, result)
    except TrainJobError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({**done, "trainjob": result["metadata"]["name"]}))


# ------------------------------------------------------------------ the pipeline's final-train task


def final_trainer(placement: Mapping[str, Any], *, search_name: str, task: str, run_id: str = "",
                  tracking_uri: str = "", s3_secret: str = "paploss-s3", mlflow_secret: str = "",
                  node_selector: Mapping[str, str] | None = None, tolerations: Sequence[Mapping[str, Any]] = (),
                  dry_run: bool = False, k8s_api: str = "", echo: Callable[[str], None] | None = print):
    """The ``trainer`` of :func:`paploss.steps.final_train` for a final on several GPUs: a
    function of the training's options that runs them as a TrainJob (``placement``:
    ``{"nodes", "gpus_per_node", "image", "runtime", "service_account"}``, the pipeline's
    compile options), waits, and returns what rank 0 wrote; None when ``placement`` asks
    for one GPU (the final trains in the task itself). With ``dry_run`` the function
    returns the manifest under ``"trainjob"`` and trains nothing."""
    nodes, gpus = int(placement.get("nodes", 1)), int(placement.get("gpus_per_node", 1))
    if not FinalResources(nodes, gpus).distributed:
        return None
    extra = {k: placement[k] for k in ("runtime", "service_account") if placement.get(k)}
    if mlflow_secret:
        extra["mlflow_secret"] = mlflow_secret

    def train_there(options: Mapping[str, Any]) -> dict:
        args = train_args_from_options({**options, "quiet": True})
        job = run_final_trainjob(
            args, nodes=nodes, gpus_per_node=gpus, image=str(placement.get("image", "")), search_name=search_name,
            task=task, run_id=run_id, dry_run=dry_run, k8s_api=k8s_api, echo=echo, s3_secret=s3_secret,
            s3_endpoint=os.environ.get("AWS_ENDPOINT_URL", ""),
            tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""),
            node_selector=dict(node_selector or {}), tolerations=list(tolerations), **extra)
        if dry_run:
            return {"metrics": {}, "diverged": False, "checkpoint": "", "trainjob": job}
        return read_result(args, job)

    return train_there
