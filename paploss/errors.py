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

__all__ = ["PaplossError", "InputError", "RunError", "one_line"]


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
    """``exc`` as the single line the command line prints (newlines folded)."""
    return " ".join(str(exc).split()) or type(exc).__name__
