"""The expected failures of ``paploss``: one typed family, one line each.

Every failure a user can cause or meet — bad data, a bad or missing file, an
unwritable output, a bad option, an unreachable service — is a :class:`PaplossError`.
The command line prints it as one line on stderr::

    Error: <file or option>: <what is wrong>

and exits with :attr:`PaplossError.exit_code`: 2 for bad input (:class:`InputError`),
1 for a failure while running (:class:`RunError`). Anything else is a bug and keeps
its traceback. ``PAPLOSS_DEBUG=1`` shows the traceback of expected failures too.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

__all__ = ["PaplossError", "InputError", "RunError", "one_line", "expected", "check_writable", "mask"]


class PaplossError(Exception):
    """An expected failure: ``PaplossError(where, what)``, where ``where`` names the
    file, option or field at fault, or ``PaplossError(message)`` whose message names it."""

    exit_code = 1

    def __init__(self, where: str, what: str | None = None):
        self.where, self.what = ("", str(where)) if what is None else (str(where), str(what))
        super().__init__(f"{self.where}: {self.what}" if self.where else self.what)


class InputError(PaplossError, ValueError):
    """Bad input (a file, an option, a value), found before any work: exit 2."""

    exit_code = 2


class RunError(PaplossError, RuntimeError):
    """A failure while running (a service that stopped answering, a failed job): exit 1."""

    exit_code = 1


def one_line(exc: BaseException) -> str:
    """``exc`` as the single line the command line prints (newlines folded, credentials
    in URIs masked: :func:`mask`)."""
    return mask(" ".join(str(exc).split())) or type(exc).__name__


#: ``scheme://user:password@host`` (or ``scheme://token@host``): the part before ``@``.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s?#]*)(?::(?P<pw>[^/@\s?#]*))?@")
#: Query parameters that carry a secret (``?token=...``, ``&X-Amz-Signature=...``): the
#: secret word is the whole name or its last part after ``_``, ``-`` or ``.`` (so
#: ``access_key`` is masked and MLflow's ``viewStateShareKey`` is not).
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_.-]*[_.-])?(?:token|password|passwd|pwd|secret|signature|credential|apikey|"
    r"auth|sig|key)=)(?P<value>[^&;#\s'\"]+)",
    re.IGNORECASE,
)
MASK = "***"


def mask(text: str | None) -> str | None:
    """``text`` with the credentials inside any URI in it replaced by ``***``: the
    password of ``user:password@`` (a lone ``token@`` too), and the values of query
    parameters that carry a secret (``token``, ``password``, ``secret``, ``key``,
    ``signature``, ...). Use it wherever a URI is printed, logged or recorded::

        mask("https://me:pw@mlflow.example/?token=abc")  # 'https://me:***@mlflow.example/?token=***'
    """
    if not text:
        return text
    def _userinfo(m: re.Match) -> str:
        if m.group("pw") is not None:
            return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
        return f"{m.group('scheme')}{MASK}@" if m.group("user") else m.group(0)
    return _SECRET_QUERY.sub(lambda m: m.group("key") + MASK, _USERINFO.sub(_userinfo, str(text)))


@contextlib.contextmanager
def expected(*types: type[BaseException], where: str = "", error: type[PaplossError] = None) -> Iterator[None]:
    """Within the block, an exception of ``types`` that is not yet a :class:`PaplossError`
    becomes one (``error``, :class:`InputError` by default) naming ``where``. For
    library functions whose documented failures are plain ``ValueError`` / ``OSError``
    (their messages name the file or value): the command line says them in one line."""
    try:
        yield
    except PaplossError:
        raise
    except types as exc:
        raise (error or InputError)(where, one_line(exc)) from exc


def check_writable(target: str | os.PathLike, option: str, *, folder: bool = True) -> None:
    """Prove before any work that ``target`` (a folder, or a file when ``folder`` is
    False) can be written: its nearest existing ancestor is a writable folder, and
    ``target`` itself, if it exists, is a folder (or a file). ``s3://`` targets are
    not checked here (their endpoint is). Raises :class:`InputError` naming ``option``;
    writes nothing."""
    target = str(target)
    if target.startswith("s3://"):
        return
    path = Path(target)
    if path.exists():
        if folder and not path.is_dir():
            raise InputError(option, f"{target} is a file, not a folder")
        if not folder and path.is_dir():
            raise InputError(option, f"{target} is a folder, not a file")
        if not os.access(path if folder else path.parent, os.W_OK):
            raise InputError(option, f"{target} is not writable")
        return
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(option, f"{target} cannot be created: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(option, f"{target} cannot be created: {parent} is not writable")
            return
