"""Talk to a remote Kubeflow Pipelines endpoint: connect, submit a compiled package, wait.

A thin layer over ``kfp.Client`` whose only job is to turn the ways a remote
submission goes wrong into errors that say which: no host given, a host that does
not answer, credentials the server refuses, a parameter the pipeline does not
take, a run that does not finish in time. ``paploss submit`` and ``paploss
retrain`` use it; the client is injectable (``client_factory``) so tests replace
only the network boundary.

    client = connect("https://kfp.example.org", existing_token=token)
    run_id = submit_package(client, "build/search_pipeline.yaml", {"dataset_uri": uri},
                            experiment="paploss", run_name="search-2026-11-26")
    state = wait_for_run(client, run_id, timeout_s=6 * 3600)   # "SUCCEEDED", "FAILED", ...
    print(run_url("https://kfp.example.org", run_id))
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import yaml

from paploss.errors import RunError

__all__ = [
    "KfpError",
    "KfpHostError",
    "KfpUnreachableError",
    "KfpAuthError",
    "TERMINAL_STATES",
    "connect",
    "check_reachable",
    "probe_api",
    "pipeline_parameters",
    "submit_package",
    "wait_for_run",
    "run_url",
]

#: Run states after which a Kubeflow run never changes again (KFP v2 API names).
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "ERROR"})


class KfpError(RunError):
    """Base class of the errors of this module: expected failures, one line each."""


class KfpHostError(KfpError, ValueError):
    """The Kubeflow host is missing or is not an http(s) URL (bad input: exit 2)."""

    exit_code = 2


class KfpUnreachableError(KfpError, ConnectionError):
    """Nothing answers at the Kubeflow host."""


class KfpAuthError(KfpError, PermissionError):
    """The Kubeflow endpoint refused the credentials (HTTP 401/403)."""


def _parse_host(host: str | None) -> tuple[str, str, int]:
    """``host`` -> (normalised URL, hostname, port); raises :class:`KfpHostError`."""
    if host is None or not str(host).strip():
        raise KfpHostError(
            "no Kubeflow Pipelines host given: pass --host URL (or set KFP_HOST), "
            "e.g. https://kubeflow.example.org/pipeline"
        )
    host = str(host).strip().rstrip("/")
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise KfpHostError(f"Kubeflow host {host!r} is not an http:// or https:// URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a port that is not a number
        raise KfpHostError(f"Kubeflow host {host!r} has a bad port: {exc}") from None
    return host, parts.hostname, port


def check_reachable(host: str, *, timeout_s: float = 5.0) -> None:
    """Open (and close) a TCP connection to ``host``'s address and port.

    Raises :class:`KfpHostError` for a missing or malformed host and
    :class:`KfpUnreachableError` when the name does not resolve or nothing
    accepts the connection within ``timeout_s`` seconds."""
    url, hostname, port = _parse_host(host)
    try:
        with socket.create_connection((hostname, port), timeout=timeout_s):
            pass
    except socket.gaierror as exc:
        raise KfpUnreachableError(f"Kubeflow host {url} is unreachable: cannot resolve {hostname!r} ({exc})") from None
    except OSError as exc:  # refused, timed out, no route
        raise KfpUnreachableError(
            f"Kubeflow host {url} is unreachable: no answer on {hostname}:{port} within {timeout_s:g} s ({exc})"
        ) from None


def probe_api(host: str, *, token: str | None = None, timeout_s: float = 10.0) -> dict:
    """GET ``{host}/apis/v2beta1/healthz`` once; return its JSON answer.

    One plain HTTP request (no retries), so that wrong credentials fail in
    milliseconds rather than after ``kfp.Client``'s five healthz retries.
    Raises :class:`KfpAuthError` on HTTP 401/403 or a redirect to a login page,
    :class:`KfpUnreachableError` when no HTTP answer comes, :class:`KfpError`
    when the answer is not the Kubeflow Pipelines API's."""
    import json
    import urllib.error
    import urllib.request

    url, _, _ = _parse_host(host)
    probe = f"{url}/apis/v2beta1/healthz"
    request = urllib.request.Request(probe, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    hint = (
        "the token given was refused"
        if token
        else "no token was given: pass --token or set KF_PIPELINES_TOKEN (or KFP_TOKEN)"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310 - http(s) checked above
            final_url, body = resp.geturl(), resp.read(65536)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise KfpAuthError(
                f"Kubeflow Pipelines at {url} refused the credentials (HTTP {exc.code} on {probe}); {hint}"
            ) from None
        raise KfpError(
            f"{url} answered HTTP {exc.code} on {probe}: is it the Kubeflow Pipelines API endpoint?"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KfpUnreachableError(f"Kubeflow host {url} is unreachable: {probe} gave no answer ({reason})") from None
    if final_url.rstrip("/") != probe:
        raise KfpAuthError(f"Kubeflow Pipelines at {url} redirected {probe} to {final_url} (a login page?); {hint}")
    try:
        answer = json.loads(body)
    except ValueError:
        raise KfpError(
            f"{url} answered {probe} with something that is not JSON: is it the Kubeflow Pipelines API?"
        ) from None
    if not isinstance(answer, dict):
        raise KfpError(f"{url} answered {probe} with {answer!r}, not the Kubeflow Pipelines healthz object")
    return answer


def _api_status(exc: BaseException) -> int | None:
    """The HTTP status of a kfp_server_api.ApiException (or None for other errors)."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _raise_for_api(exc: BaseException, host: str, doing: str, token_given: bool) -> None:
    status = _api_status(exc)
    if status in (401, 403):
        hint = (
            "the token given was refused"
            if token_given
            else "no token was given: pass --token or set KF_PIPELINES_TOKEN (or KFP_TOKEN)"
        )
        raise KfpAuthError(
            f"Kubeflow Pipelines at {host} refused the credentials while {doing} "
            f"(HTTP {status} {getattr(exc, 'reason', '')}); {hint}"
        ) from None
    if status is not None:
        body = str(getattr(exc, "body", "") or "")[:300]
        raise KfpError(f"Kubeflow Pipelines at {host} answered HTTP {status} while {doing}: {body}") from None
    raise KfpError(f"Kubeflow Pipelines at {host} failed while {doing}: {type(exc).__name__}: {exc}") from None


def connect(
    host: str | None,
    *,
    namespace: str | None = None,
    existing_token: str | None = None,
    client_factory: Callable[..., Any] | None = None,
    connect_timeout_s: float = 5.0,
):
    """A ``kfp.Client`` for ``host`` that has been checked to answer and accept us.

    Order of checks: the host is a non-empty http(s) URL; a TCP connection to it
    opens (before anything else is sent); its healthz endpoint answers without an
    authentication error (:func:`probe_api`); then the client is built and lists
    one experiment (which needs valid credentials on an authenticated deployment).

    Args:
        host: the Kubeflow Pipelines API endpoint, e.g. ``https://kf.example.org/pipeline``.
        namespace: the Kubeflow profile namespace (multi-user deployments).
        existing_token: a bearer token (e.g. a service-account token) sent with each call.
        client_factory: builds the client; ``kfp.Client`` by default. Tests pass a stand-in.
        connect_timeout_s: how long the reachability check waits.

    Raises:
        KfpHostError, KfpUnreachableError, KfpAuthError, KfpError.
    """
    url, _, _ = _parse_host(host)
    check_reachable(url, timeout_s=connect_timeout_s)
    probe_api(url, token=existing_token, timeout_s=max(connect_timeout_s, 10.0))
    if client_factory is None:
        import kfp  # imported here: the rest of paploss never needs kfp

        client_factory = kfp.Client
    kwargs: dict[str, Any] = {"host": url, "existing_token": existing_token}
    if namespace:
        kwargs["namespace"] = namespace
    try:
        client = client_factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - classified
        _raise_for_api(exc, url, "creating the client", bool(existing_token))
    try:
        client.list_experiments(page_size=1, namespace=namespace)
    except Exception as exc:  # noqa: BLE001 - classified
        _raise_for_api(exc, url, "listing experiments", bool(existing_token))
    return client


def pipeline_parameters(package_path: str | Path) -> dict[str, dict]:
    """The root parameters of a compiled pipeline: ``{name: {"parameterType": ..., ...}}``."""
    path = Path(package_path)
    if not path.is_file():
        raise FileNotFoundError(f"no compiled pipeline package at {path}: run `paploss compile` first")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except yaml.YAMLError as exc:
        raise ValueError(f"pipeline package {path} is not valid YAML: {exc}") from None
    spec = next((d for d in docs if isinstance(d, dict) and "root" in d), None)
    if spec is None:
        raise ValueError(f"pipeline package {path} has no 'root' section: is it a compiled KFP v2 pipeline?")
    return dict(spec["root"].get("inputDefinitions", {}).get("parameters", {}) or {})


def submit_package(client, package_path: str | Path, params: dict, *, experiment: str, run_name: str) -> str:
    """Submit a compiled pipeline with ``params``; returns the run id.

    Every key of ``params`` must be a root parameter of the package (checked
    before anything is sent), so a typo fails here and not an hour into a run."""
    if not experiment:
        raise ValueError("experiment name is empty")
    if not run_name:
        raise ValueError("run name is empty")
    accepted = pipeline_parameters(package_path)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"pipeline package {package_path} takes no parameter(s) {unknown}; it takes {sorted(accepted)}"
        )
    host = getattr(client, "_uihost", None) or "the Kubeflow endpoint"
    try:
        result = client.create_run_from_pipeline_package(
            pipeline_file=str(package_path),
            arguments=dict(params),
            run_name=run_name,
            experiment_name=experiment,
        )
    except Exception as exc:  # noqa: BLE001 - classified
        _raise_for_api(exc, host, f"submitting {package_path}", True)
    run_id = getattr(result, "run_id", None)
    if not run_id:
        raise KfpError(f"{host} accepted {package_path} but returned no run id")
    return str(run_id)


def _state_name(state: Any) -> str:
    return str(state or "RUNTIME_STATE_UNSPECIFIED").upper()


def wait_for_run(
    client,
    run_id: str,
    *,
    timeout_s: float,
    poll_s: float = 10,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Poll the run until it reaches a terminal state; return that state's name.

    Returns one of :data:`TERMINAL_STATES` (``"SUCCEEDED"`` when all went well).
    Raises ``TimeoutError`` naming the run, the timeout and the last state seen
    when ``timeout_s`` seconds pass first; :class:`KfpAuthError` if the
    credentials stop working. The run itself is left alone (not cancelled)."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if poll_s <= 0:
        raise ValueError(f"poll_s must be positive, got {poll_s}")
    host = getattr(client, "_uihost", None) or "the Kubeflow endpoint"
    deadline = clock() + timeout_s
    state = "RUNTIME_STATE_UNSPECIFIED"
    while True:
        try:
            state = _state_name(client.get_run(run_id).state)
        except Exception as exc:  # noqa: BLE001 - classified
            if _api_status(exc) in (401, 403):
                _raise_for_api(exc, host, f"reading run {run_id}", True)
            if _api_status(exc) == 404:
                raise KfpError(f"run {run_id} does not exist at {host}") from None
            # a transient network or server error: keep polling until the deadline
        if state in TERMINAL_STATES:
            return state
        remaining = deadline - clock()
        if remaining <= 0:
            raise TimeoutError(
                f"run {run_id} did not finish within the timeout of {timeout_s:g} s (last state {state})"
            )
        sleep(min(poll_s, remaining))


def run_url(host: str, run_id: str) -> str:
    """The Kubeflow UI page of a run: ``{host}/#/runs/details/{run_id}``."""
    url, _, _ = _parse_host(host)
    return f"{url}/#/runs/details/{run_id}"
