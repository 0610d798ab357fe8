"""A loopback fake of the few Kubernetes API endpoints a TrainJob needs.

``FakeKube()`` serves on 127.0.0.1 (a free port, a daemon thread):

- ``GET /apis/trainer.kubeflow.org/v1alpha1``: the API group's resource list
  (``trainjobs``), or 404 when ``installed`` is False (the Trainer's CRDs missing);
- ``POST …/namespaces/<ns>/trainjobs``: stores the object (201), 409 if the name
  exists, 404 when not installed;
- ``GET …/trainjobs/<name>``: the object, its ``status`` advanced one step of
  ``script`` per GET (``"created"``, ``"running"``, ``"suspended"``, ``"complete"``,
  ``"failed"``; the last step stays; each job walks its own copy), 404 if absent;
- ``DELETE …/trainjobs/<name>``: removes it.

``token``: when set, requests without ``Authorization: Bearer <token>`` get 403.
Every request is recorded in ``requests`` as (method, path, parsed body).
The statuses are shaped like the Trainer's (conditions with reason and message,
``jobsStatus`` per child job); the tests parse them with the kubeflow-trainer-api models.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GROUP_PATH = "/apis/trainer.kubeflow.org/v1alpha1"
_JOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
TIME = "2026-12-07T00:00:00Z"


def _condition(kind: str, reason: str, message: str) -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": TIME}


def status_for(step: str, nodes: int = 2) -> dict:
    """The ``status`` of a TrainJob at a scripted step."""
    child = {"name": "node", "active": 0, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}
    if step == "created":
        return {}
    if step == "running":
        return {"jobsStatus": [{**child, "active": nodes, "ready": nodes}]}
    if step == "suspended":
        return {"conditions": [_condition("Suspended", "Suspended", "TrainJob is suspended")]}
    if step == "complete":
        return {"conditions": [_condition("Complete", "JobsCompleted", "TrainJob is completed")],
                "jobsStatus": [{**child, "succeeded": nodes}]}
    if step == "failed":
        return {"conditions": [_condition("Failed", "FailedJobs",
                                          "jobset failed: node-0 exited 1\n(OOMKilled on rank 3)")],
                "jobsStatus": [{**child, "failed": 1}]}
    raise ValueError(f"unknown step {step!r}")


class FakeKube:
    def __init__(self, installed: bool = True, script: list[str] | None = None, token: str | None = None) -> None:
        self.installed, self.token = installed, token
        self.script = list(script or ["running", "complete"])
        self.jobs: dict[tuple[str, str], dict] = {}
        self.steps: dict[tuple[str, str], int] = {}
        self.scripts: dict[tuple[str, str], list[str]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with fake.lock:
                    fake.requests.append((method, self.path, body))
                    code, answer = fake.answer(method, self.path, body, self.headers.get("Authorization"))
                self._send(code, answer)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ the API

    def answer(self, method: str, path: str, body: Any, auth: str | None) -> tuple[int, Any]:
        if self.token and auth != f"Bearer {self.token}":
            return 403, _status(403, "Forbidden", 'trainjobs.trainer.kubeflow.org is forbidden: User '
                                "\"system:serviceaccount:kubeflow-user:default-editor\" cannot create resource")
        if path == GROUP_PATH and method == "GET":
            if not self.installed:
                return 404, _status(404, "NotFound", "the server could not find the requested resource")
            return 200, {"kind": "APIResourceList", "groupVersion": "trainer.kubeflow.org/v1alpha1",
                         "resources": [{"name": "trainjobs", "namespaced": True, "kind": "TrainJob"},
                                       {"name": "trainjobs/status", "namespaced": True, "kind": "TrainJob"}]}
        m = _JOBS.match(path)
        if not m or not self.installed:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        namespace, name = m.group(1), m.group(2)
        if method == "POST" and name is None:
            key = (namespace, body["metadata"]["name"])
            if key in self.jobs:
                return 409, _status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{key[1]}" already exists')
            job = copy.deepcopy(body)
            job["metadata"].update(namespace=namespace, uid=f"uid-{len(self.requests)}", creationTimestamp=TIME)
            job["status"] = {}
            self.jobs[key], self.steps[key], self.scripts[key] = job, 0, list(self.script)
            return 201, job
        key = (namespace, name)
        if key not in self.jobs:
            return 404, _status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
        if method == "GET":
            job = self.jobs[key]
            step = self.steps[key]
            nodes = job["spec"]["trainer"].get("numNodes", 1)
            script = self.scripts[key]
            job["status"] = status_for(script[min(step, len(script) - 1)], nodes)
            self.steps[key] = step + 1
            return 200, job
        if method == "DELETE":
            del self.jobs[key]
            return 200, _status(200, "Success", "deleted")
        return 405, _status(405, "MethodNotAllowed", method)

    def put_job(self, manifest: dict, namespace: str, step: str) -> None:
        """A TrainJob that already exists (an earlier attempt) at ``step``; unless that
        step is final it then goes on with ``script``."""
        job = copy.deepcopy(manifest)
        job["metadata"]["namespace"] = namespace
        key = (namespace, job["metadata"]["name"])
        self.jobs[key], self.steps[key] = job, 0
        self.scripts[key] = [step] if step in ("complete", "failed") else [step, *self.script]

    def calls(self, method: str) -> list[str]:
        return [p for m, p, _ in self.requests if m == method]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure" if code >= 400 else "Success",
            "reason": reason, "message": message, "code": code}
