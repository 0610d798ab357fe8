"""Static checks of the images, the dev stack and the workflows (Docker cannot run here).

- Dockerfiles: hadolint finds nothing (an ignore pragma must come with a reason);
  every COPY source exists and passes .dockerignore; base images and tools pinned;
  a non-root numeric user; dependencies installed before the source.
- The packages the images install agree with pyproject.toml: the locks
  (docker/make_lock.py) pin every runtime requirement within its specifier, the
  exact pins identically, nothing from the dev extras, and the whole dependency
  closure; the images install those locks and the project with --no-deps. The locks
  include the mmdet extra (Deformable DETR), the build imports MMDetection and finds the
  shipped config of `deformable_detr_tiny`, and a wheel carries that config.
- compose.yaml: valid against the Compose spec, MinIO + PostgreSQL + MLflow with
  health checks, MLflow on PostgreSQL with artifacts in the bucket; and (slow) its
  bucket script and MLflow server command really run, against moto instead of MinIO
  and sqlite instead of PostgreSQL.
- Workflows: the GitHub workflow schema, zizmor --offline, actions pinned to commits.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCKERFILES = ["docker/Dockerfile.cpu", "docker/Dockerfile.cuda", "docker/Dockerfile.mlflow"]
IMAGES = ["docker/Dockerfile.cpu", "docker/Dockerfile.cuda"]  # the components' images
WORKFLOWS = [".github/workflows/ci.yml", ".github/workflows/retrain.yml", ".github/workflows/e2e.yml"]
GPU_ONLY = re.compile(r"^(nvidia-|cuda-|triton$)")


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: run `make install` (it is in the dev extra)")
    return str(path)


# ------------------------------------------------------------------ Dockerfile parsing


def instructions(dockerfile: str) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf, start = [], "", 0
    for no, line in enumerate((ROOT / dockerfile).read_text().splitlines(), 1):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = no
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out


def copy_sources(dockerfile: str) -> list[str]:
    """Build-context paths the Dockerfile COPYs (not those copied from another stage)."""
    sources = []
    for _, word, args in instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--chown") and not p.startswith("--chmod")]
        if any(p.startswith("--from") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        sources += parts[:-1]
    return sources


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore semantics (last matching pattern wins; '!' re-includes; a
    pattern matching a folder covers what is under it)."""
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    excluded = False
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pat[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pat) for prefix in prefixes)
        if hit:
            excluded = not negate
    return excluded


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_finds_nothing(dockerfile):
    proc = subprocess.run(
        [tool("hadolint"), "--format", "json", "--failure-threshold", "style", dockerfile],
        cwd=ROOT, capture_output=True, text=True,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_hadolint_ignore_is_explained(dockerfile):
    lines = (ROOT / dockerfile).read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            before = lines[i - 1].strip() if i else ""
            assert before.startswith("#") and len(before) > 10, f"{dockerfile}:{i + 1}: ignore without a reason"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_copy_source_exists_and_is_in_the_build_context(dockerfile):
    sources = copy_sources(dockerfile)
    assert sources, f"{dockerfile} copies nothing?"
    for src in sources:
        assert (ROOT / src).exists(), f"{dockerfile} copies {src}, which does not exist"
        assert not dockerignore_excludes(src), f"{dockerfile} copies {src}, which .dockerignore leaves out"
        if (ROOT / src).is_dir():
            py = [p for p in (ROOT / src).rglob("*.py") if "__pycache__" not in p.parts]
            assert py and not any(dockerignore_excludes(str(p.relative_to(ROOT))) for p in py)


def test_dockerignore_keeps_local_state_out():
    for path in [".venv/bin/python", ".git/HEAD", "mlflow.db", "build/search_pipeline.yaml", "tests/test_retrain.py",
                 "paploss/__pycache__/x.pyc", "runs/x", "data/x"]:
        assert dockerignore_excludes(path), path


def test_images_ship_every_package_setuptools_installs():
    """`pip install .` in the image installs what setuptools finds: each must be COPYed."""
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    top = {p.split(".")[0] for p in find_packages(str(ROOT), include=config["include"])}
    assert {"paploss", "pipelines", "components"} <= top, f"setuptools finds only {sorted(top)}: missing __init__.py?"
    for dockerfile in IMAGES:
        copied = {Path(s).parts[0] for s in copy_sources(dockerfile)}
        assert top <= copied, f"{dockerfile} does not copy {sorted(top - copied)}"


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_image_layout(dockerfile):
    ins = instructions(dockerfile)
    words = [w for _, w, _ in ins]
    runs = [a for _, w, a in ins if w == "RUN"]
    # dependencies from the lock before any source is copied (a code change rebuilds only the end)
    lock_install = next(i for i, (_, w, a) in enumerate(ins) if w == "RUN" and "-r /tmp/requirements.lock" in a)
    first_source = next(i for i, (_, w, a) in enumerate(ins) if w == "COPY" and "paploss" in a.split())
    assert lock_install < first_source
    # the project itself adds nothing unpinned
    assert any("--no-deps" in r and re.search(r"\s\.(\s|$)", r) for r in runs), runs
    # a non-root, numeric user (Kubernetes' runAsNonRoot can only verify a numeric one)
    user = [a for _, w, a in ins if w == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), user
    assert words.index("USER") > lock_install
    # pinned tool and base images
    text = (ROOT / dockerfile).read_text()
    assert re.search(r"ARG UV_VERSION=\d+\.\d+\.\d+", text)
    for base in re.findall(r"ARG \w+_IMAGE=(\S+)", text):
        assert re.search(r":\S*\d+\.\d+", base) and "latest" not in base, f"unpinned base image {base}"


def test_cpu_image_takes_cpu_torch_and_cuda_image_the_tested_cuda_build():
    from importlib.metadata import version

    cpu = (ROOT / "docker/Dockerfile.cpu").read_text()
    cuda = (ROOT / "docker/Dockerfile.cuda").read_text()
    assert "--torch-backend cpu" in cpu and "requirements-cuda.lock" not in cpu
    assert "-r /tmp/requirements-cuda.lock" in cuda and '--torch-backend "${TORCH_BACKEND}"' in cuda
    (backend,) = re.findall(r"ARG TORCH_BACKEND=(\S+)", cuda)
    (base_cuda,) = re.findall(r"CUDA_IMAGE=nvidia/cuda:(\d+\.\d+)\.\d+-", cuda)
    # the base image's CUDA is the one the wheels are built for: cu130 <-> nvidia/cuda:13.0.x
    assert backend == "cu" + base_cuda.replace(".", ""), (backend, base_cuda)
    local = Version(version("torch")).local  # "cu130" for the CUDA 13.0 build the tests ran with
    if local and local.startswith("cu"):
        assert backend == local, f"the CUDA image installs torch+{backend}, the tests ran torch+{local}"


# ------------------------------------------------------------------ the locks agree with pyproject.toml


def read_lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name}: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def load_make_lock():
    spec = importlib.util.spec_from_file_location("make_lock", ROOT / "docker" / "make_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_requirements() -> list[str]:
    """What the images install: pyproject's dependencies and the extras make_lock.py adds (mmdet)."""
    project = pyproject()["project"]
    extras = load_make_lock().IMAGE_EXTRAS
    return list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]


def test_lock_pins_every_runtime_requirement_within_pyproject():
    lock = read_lock("requirements.lock")
    for raw in image_requirements():
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} (pyproject.toml) is not in docker/requirements.lock: run docker/make_lock.py"
        assert Version(lock[name]) in req.specifier, (
            f"docker/requirements.lock pins {name}=={lock[name]}, outside pyproject's {req.specifier}"
        )
        for spec in req.specifier:
            if spec.operator == "==":
                assert lock[name] == spec.version, f"{name}: pyproject pins {spec.version}, the lock {lock[name]}"


def test_lock_holds_nothing_from_the_dev_extra_alone():
    """Test tools (pytest, moto, hadolint, ...) stay out of the images unless the runtime needs them too."""
    make_lock = load_make_lock()
    needed = set(make_lock.closure(make_lock.runtime_requirements(ROOT / "pyproject.toml"), skip_gpu=False))
    lock = read_lock("requirements.lock")
    dev_only = [
        canonicalize_name(Requirement(raw).name) for raw in pyproject()["project"]["optional-dependencies"]["dev"]
    ]
    dev_only = [n for n in dev_only if n not in needed]
    assert {"pytest", "hypothesis", "moto"} <= set(dev_only)
    assert not set(dev_only) & set(lock), f"dev tools in docker/requirements.lock: {set(dev_only) & set(lock)}"


def test_locks_split_cpu_and_cuda():
    common, cuda = read_lock("requirements.lock"), read_lock("requirements-cuda.lock")
    assert not [n for n in common if GPU_ONLY.match(n)]
    assert cuda and not set(cuda) & set(common)
    assert any(n.startswith("nvidia-") for n in cuda)


def test_lock_covers_the_whole_dependency_closure():
    """Every package the runtime requirements pull in (per the installed metadata) is pinned."""
    make_lock = load_make_lock()
    roots = make_lock.runtime_requirements(ROOT / "pyproject.toml")
    common = set(make_lock.closure(roots, skip_gpu=True))
    every = set(make_lock.closure(roots, skip_gpu=False))
    lock, cuda = set(read_lock("requirements.lock")), set(read_lock("requirements-cuda.lock"))
    assert common - lock == set(), "missing from docker/requirements.lock: run docker/make_lock.py"
    assert every - common - cuda == set(), "missing from docker/requirements-cuda.lock: run docker/make_lock.py"


def test_images_run_the_kfp_the_pipeline_is_compiled_with():
    import kfp

    assert read_lock("requirements.lock")["kfp"] == kfp.__version__


def test_images_use_the_python_of_the_locks():
    header = (ROOT / "docker/requirements.lock").read_text()
    (py,) = re.findall(r"CPython (\d+\.\d+)", header)
    cpu = (ROOT / "docker/Dockerfile.cpu").read_text()
    cuda = (ROOT / "docker/Dockerfile.cuda").read_text()
    assert re.search(rf"PYTHON_IMAGE=python:{re.escape(py)}\.\d+-", cpu)
    assert re.search(rf"PYTHON_VERSION={re.escape(py)}\.\d+", cuda)


def test_mlflow_server_image_is_constrained_by_the_lock():
    text = (ROOT / "docker/mlflow-server.txt").read_text().splitlines()
    assert "-c requirements.lock" in text
    wanted = [Requirement(t) for t in text if t and not t.startswith(("#", "-"))]
    lock = read_lock("requirements.lock")
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in lock or any(s.operator == "==" for s in req.specifier), f"{req} is neither locked nor pinned"
    assert "mlflow" in {canonicalize_name(r.name) for r in wanted}


def test_make_lock_render_round_trips(tmp_path):
    make_lock = load_make_lock()
    text = make_lock.render({"b-pkg": "1.0", "a-pkg": "2.0.1"}, "test")
    path = tmp_path / "requirements.lock"
    path.write_text(text)
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert lines == ["a-pkg==2.0.1", "b-pkg==1.0"]


# ------------------------------------------------------------------ MMDetection in the images


def test_images_lock_the_mmdet_extra():
    """The images train the MMDetection detectors (``deformable_detr_tiny``): make_lock.py
    roots the closure in the ``mmdet`` extra too, so the lock pins mmdet, mmengine and
    mmcv-lite at pyproject's pins, with what they pull in (opencv-python among them)."""
    make_lock = load_make_lock()
    assert "mmdet" in make_lock.IMAGE_EXTRAS
    extra = {canonicalize_name(Requirement(r).name): Requirement(r)
             for r in pyproject()["project"]["optional-dependencies"]["mmdet"]}
    assert {"mmdet", "mmengine", "mmcv-lite"} <= set(extra)
    roots = {canonicalize_name(r.name) for r in make_lock.runtime_requirements(ROOT / "pyproject.toml")}
    plain = {canonicalize_name(r.name) for r in make_lock.runtime_requirements(ROOT / "pyproject.toml", extras=())}
    assert set(extra) <= roots and not set(extra) & plain
    lock = read_lock("requirements.lock")
    for name, req in extra.items():
        assert name in lock and Version(lock[name]) in req.specifier, f"{req}: docker/requirements.lock has {lock.get(name)}"
    assert "opencv-python" in lock  # mmengine's and mmcv's image I/O: the images install its system libraries
    with pytest.raises(SystemExit, match=r"no \[project.optional-dependencies\].nope"):
        make_lock.runtime_requirements(ROOT / "pyproject.toml", extras=("nope",))


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_images_check_mmdetection_and_the_shipped_config_at_build(dockerfile):
    """The build fails unless MMDetection imports, the Deformable DETR head registers (with
    the mmcv.ops stand-in) and the installed package holds deformable_detr_tiny's config;
    opencv-python's system libraries (libGL, GLib) are installed before the lock."""
    ins = instructions(dockerfile)
    runs = [(i, a) for i, (_, w, a) in enumerate(ins) if w == "RUN"]
    ((_, project),) = [(i, a) for i, a in runs if "--no-deps" in a]
    checks = re.findall(r'python -c "([^"]*)"', project)
    assert any(re.search(r"\bimport mmdet\b", c) and "paploss.integrations.mmdet_detr" in c
               and "mmdet_config('deformable_detr_tiny')" in c for c in checks), checks
    lock_install = next(i for i, a in runs if "-r /tmp/requirements.lock" in a)
    ((i_apt, apt),) = [(i, a) for i, a in runs if "apt-get install" in a]
    assert i_apt < lock_install
    packages = apt.split("apt-get install", 1)[1].split("&&")[0].split()
    assert {"libgl1", "libglib2.0-0t64", "--no-install-recommends"} <= set(packages), packages
    assert apt.rstrip().endswith("rm -rf /var/lib/apt/lists/*")


def test_package_data_holds_the_configs_of_named_detectors():
    """Each MMDetection detector name's config is a file of the package that pyproject's
    package-data globs ship (so `pip install .` in an image carries it)."""
    from paploss.spec_set import MMDET_DETECTORS

    globs = pyproject()["tool"]["setuptools"]["package-data"]["paploss"]
    assert MMDET_DETECTORS
    for name, rel in MMDET_DETECTORS.items():
        assert (ROOT / "paploss" / rel).is_file(), f"{name}: paploss/{rel} is missing"
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{name}: paploss/{rel} matches no package-data glob {globs}"
        assert not dockerignore_excludes(f"paploss/{rel}")


@pytest.mark.slow
def test_the_wheel_ships_the_configs_of_named_detectors(tmp_path):
    """A wheel built from what the images copy (pyproject.toml, README.md, paploss,
    components, pipelines) holds each MMDetection detector name's config, byte for byte."""
    import shutil
    import zipfile

    from paploss.spec_set import MMDET_DETECTORS

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("paploss", "components", "pipelines"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("paploss-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for rel in MMDET_DETECTORS.values():
            assert zf.read(f"paploss/{rel}") == (ROOT / "paploss" / rel).read_bytes()


# ------------------------------------------------------------------ compose


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker/compose.yaml").read_text())


def test_compose_validates_against_the_compose_spec():
    proc = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker/compose.yaml"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_services_and_health_checks():
    services = compose()["services"]
    for name in ("minio", "postgres", "mlflow"):
        assert name in services, sorted(services)
        check = services[name].get("healthcheck", {})
        assert check.get("test") and check.get("interval"), f"{name} has no health check"
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")
    assert re.match(r"postgres:\d+\.\d+", services["postgres"]["image"])
    for name, svc in services.items():
        image = svc.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image!r}"
        build = svc.get("build")
        if build:
            assert (ROOT / "docker" / build["context"] / build["dockerfile"]).resolve().is_file()


def test_compose_mlflow_uses_postgres_and_the_bucket():
    services = compose()["services"]
    mlflow = services["mlflow"]
    args = mlflow["command"]
    backend = next(a for a in args if a.startswith("--backend-store-uri="))
    assert backend.split("=", 1)[1].startswith("postgresql://") and "@postgres:5432/" in backend
    dest = next(a for a in args if a.startswith("--artifacts-destination="))
    assert dest.split("=", 1)[1].startswith("s3://mlflow")
    assert "--serve-artifacts" in args
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["buckets"]["condition"] == "service_completed_successfully"
    assert services["buckets"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["postgres"]["environment"]["POSTGRES_DB"] in backend


def _expand(value: str) -> str:
    """Compose's ${VAR:-default} with the defaults (the variables are unset in tests)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


@pytest.mark.slow
def test_compose_bucket_script_and_mlflow_command_run(tmp_path):
    """The compose file's own bucket script and MLflow command line, run here for real:
    moto_server stands in for MinIO and sqlite for PostgreSQL (no Docker here)."""
    import os
    import urllib.request

    from tests._servers import _stop, _wait_http, free_port, start_s3

    services = compose()["services"]
    with start_s3(tmp_path) as s3:
        env = {**os.environ, **s3.env}
        script = services["buckets"]["command"]
        proc = subprocess.run([sys.executable, *script[1:]], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        buckets = {b["Name"] for b in s3.client().list_buckets()["Buckets"]}
        assert {"mlflow", "paploss"} <= buckets
        assert subprocess.run([sys.executable, *script[1:]], env=env, capture_output=True).returncode == 0  # idempotent

        port = free_port()
        args = []
        for arg in services["mlflow"]["command"]:
            arg = _expand(arg).replace("5000", str(port))
            if arg.startswith("--backend-store-uri="):
                arg = f"--backend-store-uri=sqlite:///{tmp_path / 'mlflow.db'}"
            if arg == "--host=0.0.0.0":
                arg = "--host=127.0.0.1"
            if arg.startswith("--workers="):
                arg = "--workers=1"
            args.append(arg)
        assert args[:2] == ["mlflow", "server"]
        server_env = {**env, **{k: _expand(v) for k, v in services["mlflow"]["environment"].items()
                                if k.startswith("AWS_")}, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
        log = tmp_path / "mlflow.log"
        with open(log, "wb") as fh:
            server = subprocess.Popen([str(BIN / "mlflow"), *args[1:]], stdout=fh, stderr=subprocess.STDOUT,
                                      env=server_env, cwd=tmp_path, start_new_session=True)
        try:
            uri = f"http://127.0.0.1:{port}"
            _wait_http(uri + "/health", server, log, timeout=180)
            health = services["mlflow"]["healthcheck"]["test"]
            probe = health[-1].replace("localhost:5000", f"127.0.0.1:{port}")
            assert subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            exp = client.create_experiment("compose-check")
            run = client.create_run(exp)
            (tmp_path / "loss_spec.json").write_text("{}")
            client.log_artifact(run.info.run_id, str(tmp_path / "loss_spec.json"))
            keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
            assert any(k.startswith("artifacts/") and k.endswith("loss_spec.json") for k in keys), keys
            with urllib.request.urlopen(uri + "/health", timeout=5) as resp:
                assert resp.status == 200
        finally:
            _stop(server)


# ------------------------------------------------------------------ workflows


def workflow(path: str) -> dict:
    data = yaml.safe_load((ROOT / path).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def test_workflows_validate_against_the_github_schema():
    proc = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *WORKFLOWS],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zizmor_offline_finds_nothing():
    proc = subprocess.run(
        [tool("zizmor"), "--offline", "--persona", "auditor", "--format", "json", *WORKFLOWS],
        cwd=ROOT, capture_output=True, text=True,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], json.dumps([(f["ident"], f["desc"]) for f in findings], indent=1)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", WORKFLOWS)
def test_actions_are_pinned_to_commits_and_permissions_are_least(path):
    data = workflow(path)
    assert data["permissions"] == {}, "top-level permissions must be empty; jobs ask for what they need"
    for name, job in data["jobs"].items():
        assert "timeout-minutes" in job, f"{path}: job {name} has no timeout"
        perms = job.get("permissions", {})
        assert set(perms) <= {"contents", "packages"} and perms.get("contents") in (None, "read"), perms
        for step in job["steps"]:
            if "uses" in step:
                action, _, ref = step["uses"].partition("@")
                assert re.fullmatch(r"[0-9a-f]{40}", ref), f"{path}: {step['uses']} is not pinned to a commit"
                if action == "actions/checkout":
                    assert step.get("with", {}).get("persist-credentials") is False
            assert "secrets." not in step.get("run", ""), f"{path}: a secret expanded inside a script"
    text = (ROOT / path).read_text()
    for uses in re.findall(r"uses: \S+@[0-9a-f]{40}(.*)", text):
        assert re.match(r" # v\d+\.\d+\.\d+", uses), f"{path}: pinned action without its version comment"


def test_ci_runs_make_test_on_push_and_pull_request():
    data = workflow(".github/workflows/ci.yml")
    assert "push" in data["on"] and "pull_request" in data["on"]
    runs = [s.get("run", "") for job in data["jobs"].values() for s in job["steps"]]
    assert "make test" in runs


def test_retrain_triggers_and_gate():
    data = workflow(".github/workflows/retrain.yml")
    on = data["on"]
    assert on["push"]["branches"] == ["main"]
    assert set(on["push"]["paths"]) == {"configs/**", "data/manifest.json"}
    assert on["schedule"] and "workflow_dispatch" in on
    steps = data["jobs"]["retrain"]["steps"]
    script = "\n".join(s.get("run", "") for s in steps)
    assert "paploss retrain" in script and "--gate champion" in script
    assert "paploss compile --image" in script
    build = [s for s in data["jobs"]["image"]["steps"] if s.get("uses", "").startswith("docker/build-push-action@")]
    assert build and build[0]["with"]["file"] == "docker/Dockerfile.cuda" and build[0]["with"]["push"] is True
    assert data["jobs"]["retrain"]["needs"] == "image"
    env = next(s["env"] for s in steps if "paploss retrain" in s.get("run", ""))
    for name in ("KFP_HOST", "MLFLOW_TRACKING_URI", "KF_PIPELINES_TOKEN"):
        assert env[name] == "${{ secrets.%s }}" % name


def test_e2e_builds_both_images_submits_smoke_and_checks_the_registry():
    data = workflow(".github/workflows/e2e.yml")
    assert "workflow_dispatch" in data["on"] and data["on"]["schedule"]
    script = "\n".join(s.get("run", "") for s in data["jobs"]["e2e"]["steps"])
    for dockerfile in ("docker/Dockerfile.cpu", "docker/Dockerfile.mlflow"):
        assert f"docker build -f {dockerfile}" in script
    assert "kind" in script and "load docker-image paploss:e2e paploss-mlflow:e2e" in script
    assert re.search(r"kubeflow/pipelines/manifests/kustomize/\S+\?ref=\$\{KFP_VERSION\}", script)
    assert re.fullmatch(r"\d+\.\d+\.\d+", data["env"]["KFP_VERSION"])  # a pinned release, not master
    assert "paploss compile --preset smoke --image paploss:e2e" in script
    assert "paploss submit" in script and "--wait" in script
    assert "search_model_versions" in script and "paploss.search_name" in script
    for manifest in (".github/e2e/stack.yaml", ".github/e2e/pipeline-secret.yaml"):
        assert f"kubectl apply -f {manifest}" in script
        docs = [d for d in yaml.safe_load_all((ROOT / manifest).read_text()) if d]
        assert all(d.get("apiVersion") and d.get("kind") and d["metadata"].get("name") for d in docs)
        for d in docs:  # the images built above, never pulled from a registry
            for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"].startswith("paploss"):
                    assert c["image"].endswith(":e2e") and c.get("imagePullPolicy") == "IfNotPresent"
