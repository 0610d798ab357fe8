"""``paploss retrain`` and ``pipelines.kfp_remote`` against a real MLflow registry.

There is no Kubeflow cluster here, so the cluster is replaced at the network
boundary only: a loopback HTTP server that answers the few Kubeflow Pipelines v2
REST calls ``kfp.Client`` makes (healthz, experiments, create run, get run). Its
"run" does what the pipeline does at the end of a search: it logs a run with a
``loss_spec.json`` artifact in the real MLflow store (sqlite in tmp_path) and
registers a model version tagged ``paploss.search_name`` and ``AP``. Everything
else is the real thing: the ``retrain`` click command, the real ``kfp.Client``
speaking HTTP, a real compiled KFP package, the real MLflow registry.
"""

# No `from __future__ import annotations`: kfp reads the components' annotations as types.
import http.server
import json
import shutil
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner

from pipelines import kfp_remote
from pipelines.retrain import (
    AP_TAG,
    EXIT_DECIDED,
    EXIT_FAILURE,
    EXIT_NOT_PROMOTED,
    EXIT_PROMOTED,
    EXIT_USAGE,
    SEARCH_NAME_TAG,
    retrain,
)

pytestmark = pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")  # kfp.Client's banner

MODEL = "paploss-retinanet"
SPEC = {"form": "separate", "theta": [0.2, 0.2, 0.25, 0.25, 1 / 3, 1 / 3, 0.5, 0.5] * 5, "grad_scale_theta": 0.5}


# ------------------------------------------------------------------ the MLflow store


@pytest.fixture(scope="module")
def _template_db(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite store (creating one takes seconds: do it once)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(_template_db, tmp_path):
    """A fresh MLflow store for one test: (tracking URI, MlflowClient, artifact root)."""
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    shutil.copyfile(_template_db, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("paploss", artifact_location=(tmp_path / "artifacts").as_uri())
    return SimpleNamespace(uri=uri, client=client, root=tmp_path)


def register_version(store, *, search_name: str, ap: float | None, loss_spec: bool = True,
                     baselines: dict | None = None) -> str:
    """What the pipeline's final training does: a run with loss_spec.json, a registered version."""
    client = store.client
    exp = client.get_experiment_by_name("paploss")
    run = client.create_run(exp.experiment_id, run_name=f"final-{search_name}")
    if loss_spec:
        local = store.root / f"spec-{uuid.uuid4().hex}" / "loss_spec.json"
        local.parent.mkdir()
        local.write_text(json.dumps(SPEC))
        client.log_artifact(run.info.run_id, str(local), artifact_path="model")
    if ap is not None:
        client.log_metric(run.info.run_id, "AP", ap)
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(MODEL)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {SEARCH_NAME_TAG: search_name}
    if ap is not None:
        tags[AP_TAG] = repr(float(ap))  # a fraction, as versions before paploss.ap_unit hold it
    if baselines is not None:  # what the search's report writes: AP x 100 of each baseline
        tags["paploss.baselines"] = json.dumps(baselines)
        tags["paploss.ap_unit"] = "AP x 100"
        tags[AP_TAG] = repr(100 * float(ap))
    version = client.create_model_version(
        MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags
    )
    return str(version.version)


def make_champion(store, ap: float) -> str:
    version = register_version(store, search_name="earlier-search", ap=ap)
    store.client.set_registered_model_alias(MODEL, "champion", version)
    return version


def champion_version(store) -> str | None:
    try:
        version = store.client.get_registered_model(MODEL).aliases.get("champion")
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if version is None else str(version)


# ------------------------------------------------------------------ the Kubeflow stand-in


@dataclass
class Cluster:
    """How the stand-in cluster behaves, and what it was sent."""

    store: SimpleNamespace
    ap: float | None = 0.40          # AP the run's model gets
    final_state: str = "SUCCEEDED"
    register: bool = True            # does the run register a model version?
    loss_spec: bool = True
    baselines: dict | None = None    # the paploss.baselines tag the run's report writes, if any
    finishes: bool = True            # False: the run stays RUNNING forever
    token: str | None = None         # a token the API requires, if any
    runs: dict = field(default_factory=dict)
    experiments: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self, run: dict) -> None:
        """The pipeline's last step: register the trained model (as promote=False asks, no alias)."""
        params = run["runtime_config"]["parameters"]
        if self.register:
            register_version(self.store, search_name=params["search_name"], ap=self.ap, loss_spec=self.loss_spec,
                             baselines=self.baselines)
        run["state"] = self.final_state


def _handler(cluster: Cluster):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def _send(self, code: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if cluster.token is None or self.headers.get("Authorization") == f"Bearer {cluster.token}":
                return True
            self._send(401, {"error": "Unauthorized", "code": 16})
            return False

        def do_GET(self):  # noqa: N802
            if not self._authorised():
                return
            url = urlsplit(self.path)
            if url.path == "/apis/v2beta1/healthz":
                return self._send(200, {"multi_user": False})
            if url.path == "/apis/v2beta1/experiments":
                wanted = None
                flt = parse_qs(url.query).get("filter")
                if flt:
                    predicate = json.loads(flt[0])["predicates"][0]
                    wanted = predicate.get("string_value", predicate.get("stringValue"))
                exps = [e for e in cluster.experiments if wanted is None or e["display_name"] == wanted]
                return self._send(200, {"experiments": exps, "total_size": len(exps)})
            if url.path.startswith("/apis/v2beta1/runs/"):
                run_id = url.path.rsplit("/", 1)[1]
                with cluster.lock:
                    run = cluster.runs.get(run_id)
                    if run is None:
                        return self._send(404, {"error": f"run {run_id} not found", "code": 5})
                    if run["state"] == "PENDING":
                        run["state"] = "RUNNING"
                    elif run["state"] == "RUNNING" and cluster.finishes:
                        cluster.finish(run)
                    return self._send(200, {k: v for k, v in run.items() if k != "pipeline_spec"})
            return self._send(404, {"error": f"no route {url.path}", "code": 5})

        def do_POST(self):  # noqa: N802
            if not self._authorised():
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            path = urlsplit(self.path).path
            if path == "/apis/v2beta1/experiments":
                exp = {"experiment_id": uuid.uuid4().hex, "display_name": body["display_name"]}
                cluster.experiments.append(exp)
                return self._send(200, exp)
            if path == "/apis/v2beta1/runs":
                run = {
                    "run_id": uuid.uuid4().hex,
                    "display_name": body.get("display_name"),
                    "experiment_id": body.get("experiment_id"),
                    "state": "PENDING",
                    "runtime_config": body.get("runtime_config", {}),
                    "pipeline_spec": body.get("pipeline_spec"),
                }
                with cluster.lock:
                    cluster.runs[run["run_id"]] = run
                return self._send(200, {k: v for k, v in run.items() if k != "pipeline_spec"})
            return self._send(404, {"error": f"no route {path}", "code": 5})

    return Handler


@pytest.fixture
def cluster(store):
    state = Cluster(store=store)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.host = f"http://127.0.0.1:{server.server_port}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A real compiled KFP package with the parameters of the search pipeline's contract."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
    def final_train(
        dataset_uri: str, search_name: str, model_name: str, promote: bool, rounds: int, tracking_uri: str
    ) -> str:
        return f"{model_name}:{search_name}:{dataset_uri}:{promote}:{rounds}:{tracking_uri}"

    @dsl.pipeline(name="paploss-search")
    def search(
        dataset_uri: str,
        search_name: str = "",
        model_name: str = MODEL,
        promote: bool = True,
        rounds: int = 40,
        tracking_uri: str = "",
    ):
        final_train(
            dataset_uri=dataset_uri, search_name=search_name, model_name=model_name, promote=promote, rounds=rounds,
            tracking_uri=tracking_uri,
        )

    path = tmp_path_factory.mktemp("package") / "search_pipeline.yaml"
    compiler.Compiler().compile(search, str(path))
    return path


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invoke(cluster, package, *extra, env=None, host=None):
    args = [
        "--host", host if host is not None else cluster.host,
        "--dataset", "s3://data/shapes",
        *(["--package", str(package)] if package is not None else []),
        "--poll", "0.05",
        "--timeout", "60",
        *extra,
    ]
    environment = {"MLFLOW_TRACKING_URI": cluster.store.uri, "KFP_HOST": None}
    environment.update({"KF_PIPELINES_TOKEN": None, "KFP_TOKEN": None, "KFP_NAMESPACE": None})
    environment.update(env or {})
    return CliRunner().invoke(retrain, args, env=environment, catch_exceptions=False)


def the_run(cluster) -> dict:
    (run,) = cluster.runs.values()
    return run


# ------------------------------------------------------------------ promotion decisions


@pytest.mark.parametrize(
    "champion_ap, new_ap, promoted",
    [(0.30, 0.40, True), (0.40, 0.40, True), (0.50, 0.40, False), (None, 0.40, True)],
    ids=["better", "equal", "worse", "no-champion"],
)
def test_promotion_decision(cluster, package, tmp_path, champion_ap, new_ap, promoted):
    old = make_champion(cluster.store, champion_ap) if champion_ap is not None else None
    cluster.ap = new_ap
    report = tmp_path / "report.json"
    result = invoke(cluster, package, "--report", str(report))

    run = the_run(cluster)
    params = run["runtime_config"]["parameters"]
    assert params["promote"] is False  # the gate, not the pipeline, moves the alias
    assert params["model_name"] == MODEL
    assert params["dataset_uri"] == "s3://data/shapes"
    assert params["tracking_uri"] == cluster.store.uri  # the run logs where the gate looks
    new = store_version_of(cluster.store, params["search_name"])
    decision = json.loads(report.read_text())
    assert decision["new_version"] == new and decision["new_ap"] == pytest.approx(100 * new_ap)  # AP x 100
    assert decision["promoted"] is promoted
    assert decision["champion_version"] == old
    assert result.exit_code == EXIT_DECIDED, result.output  # a decision either way: CI reads promoted=
    if promoted:
        assert "promoted=true" in result.output.splitlines()
        assert champion_version(cluster.store) == new
        assert f"promoted {MODEL} version {new}" in result.output
    else:
        assert "promoted=false" in result.output.splitlines()
        assert champion_version(cluster.store) == old
        assert f"behind champion version {old} by 10.00 AP (40.00 < 50.00)" in result.output
        assert invoke(cluster, package, "--require-promotion").exit_code == EXIT_NOT_PROMOTED


@pytest.mark.parametrize("rule, promoted", [("beat-baselines", False), ("champion", True)])
def test_a_version_behind_a_baseline_of_its_run_is_not_promoted(cluster, package, tmp_path, rule, promoted):
    """The run's report tagged the version with its baselines' AP: focal+giou beat it,
    so by the default rule it is registered without the alias; the champion rule ignores it."""
    old = make_champion(cluster.store, 0.30)
    cluster.ap, cluster.baselines = 0.40, {"focal+l1": 35.0, "focal+giou": 42.5}
    report = tmp_path / "r.json"
    result = invoke(cluster, package, "--promote-rule", rule, "--report", str(report))
    assert result.exit_code == EXIT_DECIDED, result.output
    new = store_version_of(cluster.store, the_run(cluster)["runtime_config"]["parameters"]["search_name"])
    decision = json.loads(report.read_text())
    assert decision["promoted"] is promoted and decision["baselines"] == cluster.baselines
    assert f"promoted={str(promoted).lower()}" in result.output.splitlines()
    assert champion_version(cluster.store) == (new if promoted else old)
    if not promoted:
        assert "focal+giou beat it by 2.50 AP (42.50 > 40.00)" in result.output
        assert "focal+l1" not in decision["reason"]
    tag = cluster.store.client.get_model_version(MODEL, new).tags["paploss.promotion"]
    assert tag == decision["reason"]


def store_version_of(store, search_name: str) -> str:
    (version,) = [
        v for v in store.client.search_model_versions(f"name = '{MODEL}'") if v.tags.get(SEARCH_NAME_TAG) == search_name
    ]
    return str(version.version)


def test_each_retrain_uses_a_new_search_name(cluster, package):
    first = invoke(cluster, package)
    second = invoke(cluster, package)
    assert first.exit_code == second.exit_code == EXIT_PROMOTED, first.output + second.output
    names = [r["runtime_config"]["parameters"]["search_name"] for r in cluster.runs.values()]
    assert len(set(names)) == 2
    versions = {store_version_of(cluster.store, n) for n in names}
    assert champion_version(cluster.store) == max(versions, key=int)  # equal AP: the newer one wins


def test_extra_params_are_typed_as_the_pipeline_declares(cluster, package):
    result = invoke(cluster, package, "--param", "rounds=3")
    assert result.exit_code == EXIT_PROMOTED, result.output
    assert the_run(cluster)["runtime_config"]["parameters"]["rounds"] == 3


def test_cluster_side_tracking_uri_can_differ(cluster, package):
    result = invoke(cluster, package, "--param", "tracking_uri=http://mlflow.mlflow.svc:5000")
    # the stand-in registers in the test store either way; what matters is what was sent
    assert result.exit_code == EXIT_PROMOTED, result.output
    assert the_run(cluster)["runtime_config"]["parameters"]["tracking_uri"] == "http://mlflow.mlflow.svc:5000"


def test_compiles_the_search_pipeline_when_no_package_is_given(cluster):
    """Without --package: the real search pipeline (issue 7), compiled with --image, goes to the cluster."""
    pytest.importorskip("pipelines.compile", reason="pipelines/compile.py (issue 7) not there yet")
    image = "registry.example.org/ml/paploss-cuda:abc1234"
    result = invoke(cluster, None, "--image", image)
    assert result.exit_code == EXIT_PROMOTED, result.output
    run = the_run(cluster)
    params = run["runtime_config"]["parameters"]
    assert params["dataset"] == "s3://data/shapes" and params["promote"] is False
    assert params["tracking_uri"] == cluster.store.uri and params["model_name"] == MODEL
    spec = run["pipeline_spec"].get("pipeline_spec", run["pipeline_spec"])
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {image}


def test_a_token_is_sent_when_given(cluster, package):
    cluster.token = "s3cret"
    result = invoke(cluster, package, env={"KF_PIPELINES_TOKEN": "s3cret"})
    assert result.exit_code == EXIT_PROMOTED, result.output


# ------------------------------------------------------------------ failures never promote


def _assert_failed(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    for word in words:
        assert word in result.output, result.output


def test_missing_host(cluster, package):
    make_champion(cluster.store, 0.1)
    _assert_failed(invoke(cluster, package, host=""), EXIT_USAGE, "missing host")
    assert not cluster.runs


def test_malformed_host(cluster, package):
    _assert_failed(invoke(cluster, package, host="kubeflow.example.org"), EXIT_USAGE, "not an http:// or https:// URL")


def test_unreachable_host(cluster, package):
    old = make_champion(cluster.store, 0.1)
    host = f"http://127.0.0.1:{free_port()}"
    _assert_failed(invoke(cluster, package, host=host), EXIT_FAILURE, "unreachable", host)
    assert champion_version(cluster.store) == old


def test_missing_credentials(cluster, package):
    cluster.token = "s3cret"
    old = make_champion(cluster.store, 0.1)
    _assert_failed(invoke(cluster, package), EXIT_FAILURE, "credentials refused", "no token was given")
    assert not cluster.runs and champion_version(cluster.store) == old


def test_wrong_credentials(cluster, package):
    cluster.token = "s3cret"
    result = invoke(cluster, package, "--token", "guess")
    _assert_failed(result, EXIT_FAILURE, "credentials refused", "token given was refused")
    assert "guess" not in result.output  # never echo a credential


def test_missing_tracking_uri(cluster, package):
    _assert_failed(invoke(cluster, package, env={"MLFLOW_TRACKING_URI": None}), EXIT_USAGE, "MLFLOW_TRACKING_URI")
    assert not cluster.runs


def test_unreachable_mlflow_fails_before_submitting(cluster, package):
    uri = f"http://127.0.0.1:{free_port()}"
    _assert_failed(invoke(cluster, package, env={"MLFLOW_TRACKING_URI": uri}), EXIT_FAILURE, "MLflow unreachable", uri)
    assert not cluster.runs


@pytest.mark.parametrize("state", ["FAILED", "CANCELED"])
def test_run_fails(cluster, package, state):
    old = make_champion(cluster.store, 0.1)
    cluster.final_state = state
    cluster.ap = 0.9  # even a great model from a failed run is not promoted
    _assert_failed(invoke(cluster, package), EXIT_FAILURE, "run failed", state, "/#/runs/details/")
    assert champion_version(cluster.store) == old


def test_run_times_out(cluster, package):
    old = make_champion(cluster.store, 0.1)
    cluster.finishes = False
    result = invoke(cluster, package, "--timeout", "1", "--poll", "0.1")
    _assert_failed(result, EXIT_FAILURE, "run timed out", the_run(cluster)["run_id"], "timeout of 1 s")
    assert champion_version(cluster.store) == old


def test_no_new_model_version(cluster, package):
    old = make_champion(cluster.store, 0.1)
    cluster.register = False
    _assert_failed(invoke(cluster, package), EXIT_FAILURE, "no new model version", "paploss.search_name=retrain-")
    assert champion_version(cluster.store) == old


def test_new_version_without_loss_spec_is_not_promoted(cluster, package):
    old = make_champion(cluster.store, 0.1)
    cluster.loss_spec = False
    _assert_failed(invoke(cluster, package), EXIT_FAILURE, "no loss spec", "loss_spec.json")
    assert champion_version(cluster.store) == old


def test_new_version_without_ap_is_not_promoted(cluster, package):
    old = make_champion(cluster.store, 0.1)
    cluster.ap = None
    _assert_failed(invoke(cluster, package), EXIT_FAILURE, "has no AP")
    assert champion_version(cluster.store) == old


def test_reused_search_name_fails_before_submitting(cluster, package):
    old = make_champion(cluster.store, 0.1)  # registered with search name "earlier-search"
    _assert_failed(invoke(cluster, package, "--search-name", "earlier-search"), EXIT_USAGE, "already used")
    assert not cluster.runs and champion_version(cluster.store) == old


def test_champion_without_ap_is_an_error_not_a_verdict(cluster, package):
    version = register_version(cluster.store, search_name="hand-made", ap=None)
    cluster.store.client.set_registered_model_alias(MODEL, "champion", version)
    _assert_failed(invoke(cluster, package), EXIT_FAILURE, f"version {version} has no tag 'AP'")
    assert champion_version(cluster.store) == version


def test_unknown_param_fails_before_submitting(cluster, package):
    _assert_failed(invoke(cluster, package, "--param", "roundz=3"), EXIT_USAGE, "roundz", "rounds")
    assert not cluster.runs


def test_package_without_gate_parameters_is_refused(cluster, tmp_path):
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
    def step(dataset_uri: str) -> str:
        return dataset_uri

    @dsl.pipeline(name="no-gate")
    def pipe(dataset_uri: str):
        step(dataset_uri=dataset_uri)

    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipe, str(path))
    _assert_failed(invoke(cluster, path), EXIT_USAGE, "promote", "search_name")
    assert not cluster.runs


# ------------------------------------------------------------------ kfp_remote units


def test_wait_for_run_times_out_naming_the_run():
    class Stuck:
        def get_run(self, run_id):
            return SimpleNamespace(state="RUNNING")

    now = [0.0]
    with pytest.raises(TimeoutError, match=r"run r-1 did not finish within the timeout of 5 s \(last state RUNNING\)"):
        kfp_remote.wait_for_run(
            Stuck(), "r-1", timeout_s=5, poll_s=2, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0]
        )
    assert now[0] == pytest.approx(5.0)


def test_wait_for_run_survives_transient_errors():
    answers = iter([ConnectionResetError("blip"), SimpleNamespace(state="running"), SimpleNamespace(state="SUCCEEDED")])

    class Flaky:
        def get_run(self, run_id):
            answer = next(answers)
            if isinstance(answer, Exception):
                raise answer
            return answer

    assert kfp_remote.wait_for_run(Flaky(), "r", timeout_s=10, poll_s=1, sleep=lambda s: None) == "SUCCEEDED"


@pytest.mark.parametrize("host", [None, "", "   "])
def test_connect_without_host(host):
    with pytest.raises(kfp_remote.KfpHostError, match="no Kubeflow Pipelines host given"):
        kfp_remote.connect(host)


def test_connect_checks_reachability_before_building_a_client():
    built = []
    with pytest.raises(kfp_remote.KfpUnreachableError, match="unreachable"):
        kfp_remote.connect(f"http://127.0.0.1:{free_port()}", client_factory=lambda **kw: built.append(kw))
    assert built == []


def test_submit_package_rejects_unknown_parameters(package):
    with pytest.raises(ValueError, match=r"takes no parameter\(s\) \['datset'\]"):
        kfp_remote.submit_package(object(), package, {"datset": "x"}, experiment="e", run_name="r")


def test_submit_package_needs_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no compiled pipeline package"):
        kfp_remote.submit_package(object(), tmp_path / "missing.yaml", {}, experiment="e", run_name="r")


def test_run_url():
    assert kfp_remote.run_url("https://kf.example.org/", "abc") == "https://kf.example.org/#/runs/details/abc"


def test_search_pipeline_takes_the_gate_parameters(tmp_path):
    """The real search pipeline (issue 7) honours the contract retrain relies on."""
    compile_mod = pytest.importorskip("pipelines.compile", reason="pipelines/compile.py (issue 7) not there yet")
    path = compile_mod.compile_pipeline(str(tmp_path / "search_pipeline.yaml"))
    accepted = kfp_remote.pipeline_parameters(path)
    for name in ("search_name", "model_name", "promote"):
        assert name in accepted, sorted(accepted)
    assert {"dataset_uri", "dataset"} & set(accepted), sorted(accepted)
    assert accepted["promote"]["parameterType"] == "BOOLEAN"
    assert accepted["model_name"].get("defaultValue") == MODEL
