"""One writer per search: a lease on the search's name in its work folder.

A search (``paploss run``, ``paploss search``, a pipeline run on a cluster) holds the
lease file ``{work}/searches/<name>/lease.json`` while it works::

    {"format": "paploss-lease/1", "search_name": ..., "owner": ..., "host": ..., "pid": ...,
     "started": t0, "heartbeat": t, "ttl": seconds}

- **Taken atomically.** On a local folder the file is created with
  ``O_CREAT | O_EXCL`` (under an ``flock`` on ``lease.json.lock``, which also
  serialises take-overs, heartbeats and releases); on ``s3://`` with a conditional
  create, ``PutObject`` with ``If-None-Match: *``, and every later change with
  ``If-Match: <etag>``, so two writers never both win.
- **Keyed by its owner**: the KFP run id on a cluster (``KFP_RUN_ID``), else
  ``host:pid:start time``. The owner taking it again (a retried task) gets it back.
- **Kept alive by a heartbeat** every ``ttl / 4`` seconds (a daemon thread); a lease
  whose heartbeat is older than ``ttl`` (its owner died without releasing it), or
  whose owner process is gone from this host, is stale and is taken over.
- **Released at the end**, also on failure (``with hold(...)``).

A second writer gets :class:`LeaseHeld` (one line naming the owner and since when),
or with ``wait`` > 0 waits up to that many seconds for the lease to be free.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from paploss import storage
from paploss.errors import RunError

__all__ = ["LeaseHeld", "LeaseLost", "Lease", "acquire", "hold", "claim", "release", "lease_uri", "owner_id",
           "file_lock", "LEASE_FORMAT", "DEFAULT_TTL", "RUN_TTL", "OWNER_ENV"]

LEASE_FORMAT = "paploss-lease/1"
LEASE_FILE = "lease.json"
#: Seconds without a heartbeat after which a lease is stale.
DEFAULT_TTL = 120.0
_STARTED = time.time()


class LeaseHeld(RunError):
    """Another run holds the search's lease; the message names it."""


class LeaseLost(RunError):
    """This run's lease was taken over (its heartbeat stopped for longer than its ttl)."""


#: The environment variable through which a lease's owner hands its id to the tasks it
#: starts (``paploss run``'s kfp.local subprocesses): they take the lease as the same owner.
OWNER_ENV = "PAPLOSS_LEASE_OWNER"


def owner_id(run_id: str | None = None) -> str:
    """Who takes a lease: the owner handed down in ``PAPLOSS_LEASE_OWNER`` (``paploss run``
    holds the lease and its kfp.local tasks re-enter it); else ``run_id`` (a KFP run id)
    when given; else the KFP run id of this pod (``KFP_RUN_ID``); else ``host:pid:start``
    of this process."""
    handed = os.environ.get(OWNER_ENV, "").strip()
    if handed:
        return handed
    run_id = (run_id or "").strip() or os.environ.get("KFP_RUN_ID", "").strip()
    if run_id:
        return f"kfp-run:{run_id}"
    return f"{socket.gethostname()}:{os.getpid()}:{int(_STARTED)}"


def lease_uri(work: str, search_name: str) -> str:
    return storage.join(work, "searches", search_name, LEASE_FILE)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _alive_here(record: dict) -> bool | None:
    """Whether the record's process still runs (None: not a process of this host)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return None
    if str(record.get("owner", "")).startswith("kfp-run:"):
        return None
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(record: dict | None, now: float | None = None) -> bool:
    """A lease nobody keeps: unreadable and old, no heartbeat for ``ttl`` seconds, or its
    process gone from this host."""
    now = time.time() if now is None else now
    if not isinstance(record, dict):
        return True
    try:
        beat, ttl = float(record["heartbeat"]), float(record.get("ttl", DEFAULT_TTL))
    except (KeyError, TypeError, ValueError):
        return True
    if now - beat > ttl:
        return True
    return _alive_here(record) is False


def describe(record: dict | None) -> str:
    if not isinstance(record, dict):
        return "an unreadable lease"
    since = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"{record.get('owner', '?')} (since {when}, last heartbeat {time.time() - float(record.get('heartbeat', 0)):.0f} s ago)"


@dataclass
class Lease:
    """A held lease; :meth:`release` it (or use :func:`hold`)."""

    uri: str
    search_name: str
    owner: str
    ttl: float = DEFAULT_TTL
    record: dict = field(default_factory=dict)
    etag: str | None = None  # S3: the ETag of our last write
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    lost: bool = False

    # -- the backend ---------------------------------------------------------------
    def _new_record(self) -> dict:
        now = time.time()
        return {"format": LEASE_FORMAT, "search_name": self.search_name, "owner": self.owner,
                "host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now, "ttl": self.ttl}

    def _read(self) -> tuple[dict | None, str | None, bool]:
        """(record, etag, exists) of the lease file now."""
        if storage.is_s3(self.uri):
            bucket, key = storage.split_s3(self.uri)
            try:
                obj = storage._client().get_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001
                err = storage._s3_error(self.uri, exc)
                if isinstance(err, FileNotFoundError):
                    return None, None, False
                raise err from exc
            body, etag = obj["Body"].read(), obj.get("ETag")
        else:
            try:
                body, etag = Path(self.uri).read_bytes(), None
            except FileNotFoundError:
                return None, None, False
        try:
            record = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            record = None
        return (record if isinstance(record, dict) else None), etag, True

    def _put(self, record: dict, *, if_match: str | None = None, create: bool = False) -> bool:
        """Write ``record``: ``create`` only if absent, else only if unchanged since ``if_match``
        (S3); False when the condition failed."""
        data = (json.dumps(record, indent=1) + "\n").encode()
        if storage.is_s3(self.uri):
            from botocore.exceptions import ClientError

            bucket, key = storage.split_s3(self.uri)
            kwargs = {"IfNoneMatch": "*"} if create else ({"IfMatch": if_match} if if_match else {})
            try:
                resp = storage._client().put_object(Bucket=bucket, Key=key, Body=data, **kwargs)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                    return False
                raise storage._s3_error(self.uri, exc) from exc
            except Exception as exc:  # noqa: BLE001
                raise storage._s3_error(self.uri, exc) from exc
            self.etag = resp.get("ETag")
            return True
        path = Path(self.uri)
        if create:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return True
        storage.write_bytes(str(path), data)
        return True

    def _delete(self) -> None:
        if storage.is_s3(self.uri):
            bucket, key = storage.split_s3(self.uri)
            try:
                storage._client().delete_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001
                raise storage._s3_error(self.uri, exc) from exc
        else:
            Path(self.uri).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if storage.is_s3(self.uri):
            yield  # S3's conditional writes do the locking
        else:
            with file_lock(self.uri + ".lock"):
                yield

    # -- the protocol --------------------------------------------------------------
    def try_take(self) -> dict | None:
        """Take the lease if it is free, stale or ours; returns None on success, else the
        record of the run that holds it."""
        with self._locked():
            record, etag, exists = self._read()
            mine = exists and isinstance(record, dict) and record.get("owner") == self.owner
            if exists and not mine and not is_stale(record):
                return record or {}
            new = self._new_record()
            if mine:
                new["started"] = record.get("started", new["started"])
            if not exists:
                ok = self._put(new, create=True)
            else:  # ours, or stale: replace exactly the record we read
                ok = self._put(new, if_match=etag)
            if not ok:
                record, _, _ = self._read()
                return record or {}
            self.record = new
            return None

    def refresh(self) -> bool:
        """One heartbeat; False (and ``lost``) when another run took the lease over."""
        with self._locked():
            record, etag, exists = self._read()
            if not exists or not isinstance(record, dict) or record.get("owner") != self.owner:
                self.lost = True
                return False
            new = {**record, "heartbeat": time.time()}
            if not self._put(new, if_match=etag):
                self.lost = True
                return False
            self.record = new
            return True

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl / 4):
                try:
                    if not self.refresh():
                        return
                except Exception:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                    continue

        self._thread = threading.Thread(target=beat, name=f"lease-{self.search_name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception), self._locked():
            record, _, exists = self._read()
            if exists and isinstance(record, dict) and record.get("owner") == self.owner:
                self._delete()


def acquire(work: str, search_name: str, *, owner: str | None = None, ttl: float = DEFAULT_TTL,
            wait: float = 0.0, poll: float = 1.0, heartbeat: bool = True) -> Lease:
    """Take the lease of search ``search_name`` in ``work`` (see the module's doc).

    Raises :class:`LeaseHeld` naming the holder when another live run holds it, after
    waiting up to ``wait`` seconds for it to be released or to go stale."""
    if ttl <= 0:
        raise ValueError(f"ttl must be > 0, got {ttl}")
    lease = Lease(lease_uri(work, search_name), search_name, owner or owner_id(), ttl)
    if not storage.is_s3(work):
        Path(lease.uri).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        holder = lease.try_take()
        if holder is None:
            break
        if time.monotonic() >= deadline:
            hint = f" after waiting {wait:.0f} s" if wait > 0 else ""
            raise LeaseHeld(
                f"--search-name {search_name}",
                f"the search is running elsewhere{hint}: {describe(holder)} holds {lease.uri}; wait for it "
                "(--wait-lease SECONDS), or choose another --search-name",
            )
        time.sleep(min(poll, max(0.05, deadline - time.monotonic())))
    if heartbeat:
        lease.start_heartbeat()
    return lease


@contextlib.contextmanager
def hold(work: str, search_name: str, **kwargs) -> Iterator[Lease]:
    """:func:`acquire` for the block; released at its end, also when it raises."""
    lease = acquire(work, search_name, **kwargs)
    try:
        yield lease
    finally:
        lease.release()


#: The ttl of a lease a pipeline run holds without a heartbeat thread (:func:`claim`):
#: each of its tasks renews it when it starts; longer than its longest task.
RUN_TTL = 6 * 3600.0


def claim(work: str, search_name: str, run_id: str | None = None, ttl: float = RUN_TTL) -> Lease:
    """The lease for a pipeline run whose tasks are separate pods: taken (or renewed,
    when this run holds it already) by each task as it starts, with no heartbeat
    thread; :func:`release` at the run's end. Raises :class:`LeaseHeld` when another
    run holds the search."""
    return acquire(work, search_name, owner=owner_id(run_id), ttl=ttl, heartbeat=False)


def release(work: str, search_name: str, run_id: str | None = None) -> None:
    """Give back the lease of :func:`claim` if this run (``run_id``, or :func:`owner_id`) holds it."""
    Lease(lease_uri(work, search_name), search_name, owner_id(run_id)).release()


def release_run(work: str, search_name: str, run_id: str | None = None) -> None:
    """At a pipeline run's end: :func:`release` its lease, unless a command that hands its
    lease down (``PAPLOSS_LEASE_OWNER``: ``paploss run``) holds it and releases it itself."""
    if not os.environ.get(OWNER_ENV, "").strip():
        release(work, search_name, run_id)
