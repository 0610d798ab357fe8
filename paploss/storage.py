"""Read and write local paths and ``s3://`` URIs, atomically.

Every write goes to a temporary name first and is then renamed (local) or is a
single ``PutObject`` (S3, which is atomic per object), so a reader never sees a
half-written file and a crash never destroys what was there before. Whole local
folders are published the same way with :func:`atomic_dir`.

S3 goes through boto3; the endpoint comes from the environment as boto3 reads it
(``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``), so the same code talks to AWS,
MinIO or a local ``moto_server``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from paploss.errors import InputError, PaplossError

__all__ = [
    "StorageError",
    "NotFound",
    "is_s3",
    "split_s3",
    "join",
    "exists",
    "read_bytes",
    "read_text",
    "read_json",
    "write_bytes",
    "write_text",
    "write_json",
    "list_files",
    "atomic_dir",
    "upload_dir",
    "download_dir",
    "localize",
    "copy",
    "WORK_MARK",
    "location_id",
    "at_location",
    "sweep_temp",
    "umask",
]


class StorageError(PaplossError, OSError):
    """A storage operation failed (an S3 endpoint that does not answer, no credentials,
    a refused request); the message names the URI and the reason. Exit code 1."""

    exit_code = 1


class NotFound(InputError, FileNotFoundError):
    """A file, folder, object or bucket that is not there; the message names it. Exit code 2."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise InputError(str(uri), "not an s3:// URI")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(uri, "the s3:// URI has no bucket")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    base = str(base)
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts) if parts else base
    return str(Path(base, *parts))


def _client():
    import boto3  # imported lazily: most local runs never touch S3

    return boto3.client("s3")


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"


def _s3_error(uri: str, exc: Exception) -> Exception:
    """Turn boto's exceptions into errors that say what went wrong and where."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"cannot reach the S3 endpoint {_endpoint()} for {uri}: {exc}")
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            return NotFound(uri, "no such object")
        if code == "NoSuchBucket":
            return NotFound(uri, "no such bucket")
        return StorageError(f"S3 error {code or exc} for {uri} at {_endpoint()}")
    return exc


def exists(uri: str | os.PathLike) -> bool:
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    client = _client()
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except Exception as exc:  # noqa: BLE001 - classified below
        err = _s3_error(uri, exc)
        if not isinstance(err, FileNotFoundError):
            raise err from exc
    # a "directory": any object under the prefix
    try:
        resp = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    except Exception as exc:  # noqa: BLE001
        err = _s3_error(uri, exc)
        if isinstance(err, FileNotFoundError):
            return False
        raise err from exc
    return resp.get("KeyCount", 0) > 0


def read_bytes(uri: str | os.PathLike) -> bytes:
    uri = str(uri)
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise NotFound(uri, "no such file") from None
    bucket, key = split_s3(uri)
    try:
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(uri, exc) from exc


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str | os.PathLike) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(str(uri), f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def write_bytes(uri: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``uri`` atomically; returns the URI."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(uri, exc) from exc
        return uri
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600: the team shares the folder
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return uri


#: The suffix of every temporary file and folder :func:`write_bytes` and :func:`atomic_dir`
#: make beside their target (``.<name>.<random>.tmp``); :func:`sweep_temp` finds them by it.
TMP_SUFFIX = ".tmp"
#: The prefixes of the steps' temporary folders under the system temp dir.
TEMP_PREFIXES = ("paploss-trial-", "paploss-final-", "paploss-data-", "paploss-pretrain-")


def umask() -> int:
    """This process's umask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _newest_mtime(path: Path, limit: int = 2000) -> float:
    """The newest modification time of ``path`` and (up to ``limit`` of) the things under it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for i, (root, dirs, files) in enumerate(os.walk(path)):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            if i >= limit:
                break
    return newest


def sweep_temp(work: str | os.PathLike | None = None, *, older_than: float = 1800.0,
               temp_dir: str | os.PathLike | None = None, now: float | None = None) -> list[str]:
    """Remove what killed processes left behind; returns the removed paths.

    Under the local folder ``work``: hidden temporary files and folders of
    :func:`write_bytes` / :func:`atomic_dir` (``.<name>.<random>.tmp``); under the
    system temp dir (``temp_dir``): the steps' folders (:data:`TEMP_PREFIXES`). Only
    those untouched for ``older_than`` seconds (nothing in them newer) are removed, so
    a write or a trial that is still running elsewhere keeps its files. An ``s3://``
    work folder has no temporary objects (each put is atomic) and is skipped."""
    now = time.time() if now is None else now
    found: list[Path] = []
    if work is not None and not is_s3(work) and Path(work).is_dir():
        for root, dirs, files in os.walk(work):
            for name in dirs + files:
                if name.startswith(".") and name.endswith(TMP_SUFFIX):
                    found.append(Path(root, name))
            dirs[:] = [d for d in dirs if not (d.startswith(".") and d.endswith(TMP_SUFFIX))]
    base = Path(temp_dir or tempfile.gettempdir())
    if base.is_dir():
        found += [p for p in base.iterdir() if p.name.startswith(TEMP_PREFIXES) and p.is_dir()]
    removed = []
    for path in found:
        try:
            if now - _newest_mtime(path) < older_than:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(str(path))
        except OSError:
            continue  # gone meanwhile, or another user's: not ours to remove
    return removed


def write_text(uri: str | os.PathLike, text: str) -> str:
    return write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str | os.PathLike, obj: Any, indent: int | None = 2) -> str:
    return write_text(uri, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def list_files(uri: str | os.PathLike) -> Iterator[str]:
    """Every file below a folder or prefix, as relative POSIX paths, sorted."""
    uri = str(uri)
    if not is_s3(uri):
        root = Path(uri)
        if not root.is_dir():
            raise NotFound(uri, "no such folder")
        yield from sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        return
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    paginator = _client().get_paginator("list_objects_v2")
    try:
        keys = [
            obj["Key"][len(prefix):]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        ]
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(uri, exc) from exc
    yield from sorted(k for k in keys if k and not k.endswith("/"))


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Build a local folder under a temporary name, then rename it to ``dest``.

    Yields a new empty folder, a hidden sibling of ``dest`` (``.<name>.<random>.tmp`` in
    the same parent, created if missing, so the rename stays on one filesystem and is
    atomic). When the ``with`` block ends normally, the folder is renamed to ``dest``;
    a ``dest`` that exists by then is removed first: whatever it holds if ``replace``,
    else only if it is an empty folder (a non-empty one raises ``FileExistsError`` and
    is left as it was). When the block raises (``KeyboardInterrupt`` included), the
    temporary folder is removed, ``dest`` is untouched and the exception propagates::

        with atomic_dir("data/shapes") as tmp:
            (tmp / "annotations").mkdir()
            ...
    """
    if is_s3(dest):
        raise ValueError(f"atomic_dir needs a local folder, got {str(dest)!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=TMP_SUFFIX))
    try:
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes it 0700: the team shares the folder
        yield tmp
        if dest.exists():
            if replace:
                shutil.rmtree(dest)
            else:
                try:
                    dest.rmdir()
                except OSError as exc:
                    raise FileExistsError(f"{dest} appeared meanwhile and is not empty; left as it is") from exc
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def upload_dir(local_dir: str | os.PathLike, uri: str) -> str:
    """Copy a local folder to ``uri`` (local or S3), file by file, each atomically."""
    local_dir = Path(local_dir)
    for rel in list_files(local_dir):
        dst = join(uri, rel)
        if is_s3(uri):
            bucket, key = split_s3(dst)
            try:
                _client().upload_file(str(local_dir / rel), bucket, key)
            except Exception as exc:  # noqa: BLE001
                raise _s3_error(dst, exc) from exc
        else:
            write_bytes(dst, (local_dir / rel).read_bytes())
    return uri


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy a folder or prefix to ``local_dir`` with :func:`atomic_dir`: into a temporary
    sibling, then renamed into place, replacing what ``local_dir`` held."""
    local_dir = Path(local_dir)
    files = list(list_files(uri))
    if not files:
        raise NotFound(uri, "no files under it")
    with atomic_dir(local_dir, replace=True) as tmp:
        for rel in files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if is_s3(uri):
                bucket, key = split_s3(join(uri, rel))
                try:
                    _client().download_file(bucket, key, str(dst))
                except Exception as exc:  # noqa: BLE001
                    raise _s3_error(join(uri, rel), exc) from exc
            else:
                shutil.copyfile(join(uri, rel), dst)
    return local_dir


def cache_dir() -> Path:
    """Where remote datasets and files are cached (``PAPLOSS_CACHE`` or ~/.cache/paploss)."""
    return Path(os.environ.get("PAPLOSS_CACHE", Path.home() / ".cache" / "paploss"))


def localize(uri: str | os.PathLike) -> Path:
    """A local path holding ``uri``: the path itself if local, else a cached download.

    The cache key is the URI; a finished download is reused (datasets are immutable
    by convention: write a new URI for new data)."""
    uri = str(uri)
    if not is_s3(uri):
        if not Path(uri).exists():
            raise NotFound(uri, "no such file or folder")
        return Path(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_dir() / digest / posixpath.basename(uri.rstrip("/"))
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    bucket, key = split_s3(uri)
    try:
        _client().head_object(Bucket=bucket, Key=key)
        is_file = True
    except Exception as exc:  # noqa: BLE001
        err = _s3_error(uri, exc)
        if not isinstance(err, FileNotFoundError):
            raise err from exc
        is_file = False
    if is_file:
        write_bytes(target, read_bytes(uri))
        return target
    return download_dir(uri, target)


WORK_MARK = "<work>/"


def location_id(uri: str | os.PathLike | None, work: str | os.PathLike) -> str | None:
    """``uri`` as a cache key sees it: where it lies inside the folder ``work``, its path
    relative to ``work`` after :data:`WORK_MARK` (``<work>/data/shapes-1f2e``); elsewhere
    the absolute, normalised path (local) or the URI as given (S3). So the same file gets
    the same key however ``work`` is spelled (relative, absolute, through a symlink) and
    wherever the work folder is moved or mounted. An empty ``uri`` (no warm start, no
    state) and one that is an id already come back as they are."""
    if not uri:
        return uri
    uri, work = str(uri), str(work)
    if uri.startswith(WORK_MARK):
        return uri
    if is_s3(uri) or is_s3(work):
        base = work.rstrip("/") + "/"
        return WORK_MARK + uri[len(base):] if is_s3(work) and uri.startswith(base) else uri
    path, top = os.path.realpath(uri), os.path.realpath(work)
    if path.startswith(top.rstrip(os.sep) + os.sep):
        return WORK_MARK + Path(os.path.relpath(path, top)).as_posix()
    return path


def at_location(location: str | None, work: str | os.PathLike) -> str | None:
    """Where :func:`location_id`'s ``location`` lies now: one inside the work folder
    (``<work>/data/shapes-1f2e``) under ``work``, any other as it is. So a record that
    names its inputs by location ids still finds them after the work folder moved."""
    if not location or not str(location).startswith(WORK_MARK):
        return location
    return join(str(work), str(location)[len(WORK_MARK):])


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Copy one file between any two locations (local or S3), atomically at the target."""
    return write_bytes(dst, read_bytes(src))
