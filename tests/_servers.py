"""Real servers on loopback for integration tests: ``moto_server`` (S3) and
``mlflow server`` (sqlite backend, artifacts proxied into a bucket of that S3).

Import the fixtures into a test module (``from tests._servers import s3_server,
mlflow_server``). Each server runs as a child process on a free port, is waited for
until it answers, and is stopped (by its own pid) at the end of the test session.
Nothing here is a mock: the code under test talks HTTP to the same programs users
run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers, even if not with 200
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise RuntimeError(f"server for {url} did not answer within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@dataclass
class S3Server:
    endpoint: str
    env: dict  # the environment a client needs (endpoint + dummy credentials)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@dataclass
class MlflowServer:
    uri: str
    s3: S3Server
    artifact_bucket: str


@contextlib.contextmanager
def start_s3(workdir: Path) -> Iterator[S3Server]:
    port = free_port()
    log = workdir / "moto_server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_http(endpoint + "/moto-api/", proc, log)
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        yield S3Server(endpoint, env)
    finally:
        _stop(proc)


@contextlib.contextmanager
def start_mlflow(workdir: Path, s3: S3Server, bucket: str = "mlflow") -> Iterator[MlflowServer]:
    s3.make_bucket(bucket)
    port = free_port()
    log = workdir / "mlflow_server.log"
    env = {**os.environ, **s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"), "server",
                "--backend-store-uri", f"sqlite:///{workdir / 'mlflow-server.db'}",
                "--artifacts-destination", f"s3://{bucket}/artifacts",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            ],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", proc, log, timeout=180)
        yield MlflowServer(uri, s3, bucket)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A ``moto_server`` on a free loopback port; its env vars are *not* set globally."""
    if shutil.which("moto_server", path=str(BIN)) is None:
        pytest.fail("moto_server is missing: install the dev extra (moto[server])")
    with start_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server) -> Iterator[MlflowServer]:
    """An ``mlflow server`` (sqlite) whose artifacts go to a bucket of ``s3_server``."""
    with start_mlflow(tmp_path_factory.mktemp("mlflow"), s3_server) as server:
        yield server
