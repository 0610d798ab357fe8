"""Checkpoints, backbones and warm starts: data on disk, never code.

Every ``.pt`` file paploss reads goes through :func:`load`, which unpickles with
``torch.load(weights_only=True)``: only tensors, numbers, strings and plain
containers are accepted, so a crafted file (a pickle whose ``__reduce__`` calls
``os.system``, say) is refused before anything in it runs. Our own formats hold
nothing else (the training config is stored through ``TrainConfig.to_dict``).

A file that is missing, empty, truncated, not a torch file, or of another format
gives an :class:`~paploss.errors.InputError` naming the file and what it is not.

Formats (the ``"format"`` key of the saved dict):

- ``paploss-checkpoint/1``: a training run (``paploss train``; model, optimizer, config, …)
- ``paploss-backbone/1``: a pre-trained backbone body (``paploss pretrain``; the warm start)
"""

from __future__ import annotations

import io
import pickle
import zipfile
from typing import Any

import torch

from paploss import storage
from paploss.errors import InputError

__all__ = ["CHECKPOINT", "BACKBONE", "save", "load"]

CHECKPOINT = "paploss-checkpoint/1"
BACKBONE = "paploss-backbone/1"
_WHAT = {CHECKPOINT: "a checkpoint written by `paploss train`", BACKBONE: "a backbone written by `paploss pretrain`"}


def save(uri: str, obj: dict) -> str:
    """Write ``obj`` (a dict with a ``"format"``) to ``uri`` atomically; returns ``uri``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return storage.write_bytes(uri, buf.getvalue())


def load(uri: str, fmt: str, *, keys: tuple[str, ...] = ()) -> dict:
    """The dict saved at ``uri`` in format ``fmt``, read as data only.

    Raises :class:`InputError` if the file is missing or unreadable, is not a torch
    file, holds anything but data (the unpickler refuses it and nothing runs), is of
    another format, or lacks one of ``keys``."""
    what = _WHAT.get(fmt, fmt)
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise InputError(str(uri), "no such file") from None
    except IsADirectoryError:
        raise InputError(str(uri), f"is a folder, not {what}") from None
    if not raw:
        raise InputError(str(uri), f"the file is empty, not {what}")
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _reason(exc)
        if "global" in reason.lower():  # the pickle names a function or class: code, not data
            raise InputError(str(uri), f"refused to load: it holds more than data ({reason}); "
                                       f"only {what} is accepted") from None
        raise InputError(str(uri), f"not a readable torch file ({reason}); expected {what}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(str(uri), f"not a readable torch file ({_reason(exc)}); expected {what}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise InputError(str(uri), f"format {found!r}, expected {what} ({fmt!r})")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InputError(str(uri), f"{what} without {', '.join(map(repr, missing))}: the file is damaged")
    return obj


_BOILERPLATE = ("weights only load failed", "please file an issue", "check the documentation", "weightsunpickler error")


def _reason(exc: BaseException) -> str:
    """The informative line of a loader's message (torch wraps it in advice)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.lower().startswith(_BOILERPLATE)]
    return (useful or lines or [type(exc).__name__])[0][:200]
