"""The steps' expected failures (part of :mod:`paploss.errors`' family)."""

from __future__ import annotations

from paploss.errors import InputError, RunError


class StepError(InputError):
    """A step got input it cannot use; the message names the argument and value."""


class SearchExists(StepError):
    """A search of that name already exists in the work folder with other settings (it is
    not overwritten); the message names what differs."""


class SearchFailed(RunError):
    """The search cannot go on (for instance: too many failed trials)."""
