"""The ``paploss`` command line.

Each sub-command lives next to the code it drives and is imported only when it is
called, so ``paploss --help`` answers at once and ``paploss train`` never imports kfp.
Register a command by adding ``name: "module:attribute"`` to ``COMMANDS``; the
attribute is a ``click.Command``.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click

from paploss.errors import PaplossError, mask, one_line

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:attribute", one-line help shown by `paploss --help`)
    "data": ("paploss.data.cli:data", "Make bundled datasets, convert VOC, split for search."),
    "pretrain": ("paploss.engine_cli:pretrain", "Pre-train the warm-start backbone on a classification task."),
    "train": ("paploss.engine_cli:train", "Train a detector with a loss (paploss spec or a baseline)."),
    "evaluate": ("paploss.engine_cli:evaluate", "COCO AP of a checkpoint on a split."),
    "search": ("paploss.search_cli:search", "Run the PPO loss search in-process (no Kubeflow)."),
    "run": ("pipelines.run_local:run", "Run the search pipeline locally through kfp.local."),
    "compile": ("pipelines.compile:compile_cmd", "Compile the search pipeline to Kubeflow YAML."),
    "submit": ("pipelines.submit:submit", "Submit the compiled pipeline to a Kubeflow endpoint."),
    "retrain": ("pipelines.retrain:retrain", "Submit, wait, and promote the new model if it beats the champion."),
}


#: Expected failures of modules whose error classes are not (yet) in paploss.errors'
#: family: "module:Class" -> exit code. They print as one line too.
EXPECTED: dict[str, int] = {
    "paploss.tracking:TrackingError": 1,
}


#: File-system errors about a path the user gave (a missing file, a file where a folder
#: should be, no permission): bad input, exit 2. Other errors of a named file (a full
#: disk, an I/O error) are failures while running, exit 1.
_PATH_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
                errno.ENAMETOOLONG}


def exit_code_of(exc: BaseException) -> int | None:
    """The exit code of an expected failure (a :class:`PaplossError`, one of
    :data:`EXPECTED`, or an ``OSError`` naming its file), or None for anything else
    (a bug: it keeps its traceback)."""
    if isinstance(exc, PaplossError):
        return exc.exit_code
    if isinstance(exc, OSError) and exc.filename is not None:
        return 2 if exc.errno in _PATH_ERRNOS else 1
    for target, code in EXPECTED.items():
        module_name, cls_name = target.split(":")
        module = sys.modules.get(module_name)  # an exception of it means it was imported
        cls = getattr(module, cls_name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            return code
    return None


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise click.ClickException(
                f"command {name!r} needs module {module_name!r}, which is not installed: {exc}"
            ) from exc
        return getattr(module, attr)

    def invoke(self, ctx: click.Context):
        """Expected failures (:class:`~paploss.errors.PaplossError`) as one line on
        stderr with their exit code; ``PAPLOSS_DEBUG=1`` keeps the traceback."""
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:  # click's own and the commands' usage errors: URIs masked
            exc.message = mask(exc.message)
            raise
        except Exception as exc:  # noqa: BLE001 - expected failures become one line, the rest re-raised
            code = exit_code_of(exc)
            if code is None or os.environ.get("PAPLOSS_DEBUG") == "1":
                raise
            message = one_line(exc)
            if isinstance(exc, OSError) and not isinstance(exc, PaplossError) and exc.filename is not None:
                message = f"{exc.filename}: {exc.strerror or message}"  # "Error: <file>: <what is wrong>"
            error = click.ClickException(message)
            error.exit_code = code
            raise error from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="paploss")
def main() -> None:
    """Search a Parameterized AP Loss for object detection, track it in MLflow,
    and run it as a Kubeflow pipeline (locally through kfp.local by default)."""


if __name__ == "__main__":  # pragma: no cover
    main()
