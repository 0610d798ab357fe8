"""One writer per search (paploss.lease): local folders, s3:// on a moto server, and
two real concurrent ``paploss search`` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from paploss import lease, storage
from tests._servers import s3_server  # noqa: F401 - fixture


def _record(uri: str) -> dict:
    return json.loads(storage.read_text(uri))


def _age(uri: str, seconds: float) -> None:
    """Make the lease at ``uri`` look as if its owner stopped beating ``seconds`` ago."""
    rec = _record(uri)
    rec["heartbeat"] -= seconds
    storage.write_text(uri, json.dumps(rec))


def _lease_protocol(work: str) -> None:
    first = lease.acquire(work, "s", owner="A", ttl=30, heartbeat=False)
    uri = lease.lease_uri(work, "s")
    assert _record(uri)["owner"] == "A" and _record(uri)["format"] == lease.LEASE_FORMAT
    with pytest.raises(lease.LeaseHeld, match="--search-name s: the search is running elsewhere: A"):
        lease.acquire(work, "s", owner="B", ttl=30)
    again = lease.acquire(work, "s", owner="A", ttl=30, heartbeat=False)  # a retried task of the same run
    assert again.record["started"] == first.record["started"]
    assert first.refresh() and _record(uri)["heartbeat"] >= first.record["started"]
    _age(uri, 31)  # the owner died without releasing it
    taker = lease.acquire(work, "s", owner="B", ttl=30, heartbeat=False)
    assert _record(uri)["owner"] == "B"
    assert not first.refresh() and first.lost  # the old owner learns it lost the lease
    first.release()  # and its release leaves the new owner's lease alone
    assert _record(uri)["owner"] == "B"
    taker.release()
    assert not storage.exists(uri)
    with lease.hold(work, "s", owner="C", ttl=30):
        assert _record(uri)["owner"] == "C"
    assert not storage.exists(uri)
    with pytest.raises(RuntimeError), lease.hold(work, "s", owner="C", ttl=30):
        raise RuntimeError("the search failed")
    assert not storage.exists(uri)  # released on failure too


def test_local_lease(tmp_path):
    _lease_protocol(str(tmp_path / "work"))


def test_s3_lease_with_conditional_writes(s3_server, monkeypatch):  # noqa: F811
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    work = s3_server.make_bucket("lease-work") + "/w"
    _lease_protocol(work)
    # the conditional create itself: If-None-Match: * refuses a second create
    held = lease.acquire(work, "t", owner="A", ttl=30, heartbeat=False)
    probe = lease.Lease(lease.lease_uri(work, "t"), "t", "B", 30)
    assert probe._put(probe._new_record(), create=True) is False
    assert probe._put(probe._new_record(), if_match='"not-the-etag"') is False
    assert _record(held.uri)["owner"] == "A"
    held.release()


def test_a_dead_local_owner_is_taken_over_at_once(tmp_path):
    work = str(tmp_path / "w")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held = lease.acquire(work, "s", owner="dead", ttl=3600, heartbeat=False)
    rec = {**held.record, "pid": dead.pid}  # a process of this host that is gone
    storage.write_text(held.uri, json.dumps(rec))
    assert lease.acquire(work, "s", owner="B", heartbeat=False).record["owner"] == "B"


def test_wait_for_the_lease_and_the_heartbeat(tmp_path):
    work = str(tmp_path / "w")
    first = lease.acquire(work, "s", owner="A", ttl=0.4)  # beats every 0.1 s
    beat = first.record["heartbeat"]
    time.sleep(0.6)
    assert _record(first.uri)["heartbeat"] > beat  # kept alive past its ttl
    with pytest.raises(lease.LeaseHeld, match="after waiting"):
        lease.acquire(work, "s", owner="B", wait=0.3, poll=0.05)
    threading.Timer(0.3, first.release).start()
    second = lease.acquire(work, "s", owner="B", wait=10, poll=0.05, heartbeat=False)
    assert second.record["owner"] == "B"
    second.release()


@pytest.mark.slow
def test_the_sqlite_store_is_created_once_under_a_lock(tmp_path):
    from paploss.search_cli import ensure_tracking_store

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    ids, failures = [], []

    def make():
        try:
            ids.append(ensure_tracking_store(uri, "paploss"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=make) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len(set(ids)) == 1


@pytest.mark.slow
def test_two_real_searches_of_one_name(tmp_path):
    """Two ``paploss search --preset smoke`` of the same search at once: the second
    refuses within seconds with one line naming the first; the first, killed, leaves a
    lease that the next run takes over (its owner is gone)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "paploss.cli", "search", "--preset", "smoke", "--work", str(tmp_path / "w"),
           "--search-name", "twice"]
    uri = lease.lease_uri(str(tmp_path / "w"), "twice")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not Path(uri).exists():
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first search never took its lease"
            time.sleep(0.2)
        start = time.monotonic()
        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert second.stderr.startswith("Error: --search-name twice: the search is running elsewhere: ")
        assert second.stderr.count("\n") == 1 and f":{first.pid}:" in second.stderr
        assert time.monotonic() - start < 60
        assert first.poll() is None  # the first goes on
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert _record(uri)["pid"] == first.pid  # killed: its lease stays behind ...
    third = lease.acquire(str(tmp_path / "w"), "twice", heartbeat=False)  # ... and is taken over (owner gone)
    assert third.record["pid"] == os.getpid()
    third.release()


def test_a_pipeline_run_claims_renews_and_releases(tmp_path, monkeypatch):
    """On a cluster each task of a run claims the lease as that run (no heartbeat thread);
    a task of another run is refused; the tasks a CLI run starts are its owner."""
    work = str(tmp_path / "w")
    monkeypatch.delenv(lease.OWNER_ENV, raising=False)
    first = lease.claim(work, "s", run_id="run-1")
    assert first.record["owner"] == "kfp-run:run-1" and first.ttl == lease.RUN_TTL
    assert lease.claim(work, "s", run_id="run-1").record["started"] == first.record["started"]  # the next task
    with pytest.raises(lease.LeaseHeld, match="kfp-run:run-1"):
        lease.claim(work, "s", run_id="run-2")
    monkeypatch.setenv("KFP_RUN_ID", "run-1")
    assert lease.owner_id() == "kfp-run:run-1"
    monkeypatch.setenv(lease.OWNER_ENV, "host:1:2")
    assert lease.owner_id() == "host:1:2"  # handed down by paploss run to its tasks
    assert lease.owner_id("run-1") == "host:1:2"  # ... which re-enter the command's lease whatever their run id
    monkeypatch.delenv(lease.OWNER_ENV)
    lease.release(work, "s", run_id="run-2")  # not its lease: left alone
    assert storage.exists(lease.lease_uri(work, "s"))
    lease.release(work, "s", run_id="run-1")
    assert not storage.exists(lease.lease_uri(work, "s"))


def test_a_pipeline_run_claims_the_search_and_gives_it_back_at_its_end(tmp_path, monkeypatch):
    """On a cluster the init-search task claims the search for its KFP run and the report
    gives it back; another run is refused in between; under ``paploss run`` (a handed-down
    owner) the tasks re-enter the command's lease and leave its release to the command."""
    from paploss import lease

    work = str(tmp_path)
    monkeypatch.delenv(lease.OWNER_ENV, raising=False)
    lease.claim(work, "s", run_id="run-a")
    lease.claim(work, "s", run_id="run-a")  # a retried task of the same run renews it
    with pytest.raises(lease.LeaseHeld):
        lease.claim(work, "s", run_id="run-b")
    lease.release_run(work, "s", run_id="run-a")
    lease.claim(work, "s", run_id="run-b")  # free again
    lease.release_run(work, "s", run_id="run-b")
    monkeypatch.setenv(lease.OWNER_ENV, "paploss-run-cli")
    lease.claim(work, "t", run_id="ignored-under-the-cli")
    assert lease.owner_id("x") == "paploss-run-cli"
    lease.release_run(work, "t", run_id="x")  # the command releases, not the task
    monkeypatch.delenv(lease.OWNER_ENV)
    with pytest.raises(lease.LeaseHeld):
        lease.claim(work, "t", run_id="run-c")
