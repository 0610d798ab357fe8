"""``python -m bench``: the benchmarks and research tools, one module each.

The laboratory beside the product: nothing in ``paploss``, ``pipelines`` or
``components`` imports it, and it is not installed (run it from the repository
root, ``.venv/bin/python -m bench.<tool> --help``, or through ``make bench``,
``make bench-controller``, ``make bench-search``).
"""

from __future__ import annotations

import ast
from pathlib import Path

#: The tools, in the order a reader meets them: what the product costs, then how good its search is.
TOOLS = ("loss", "train_step", "faster_rcnn_step", "mmdet_step", "detr_step", "pipeline_overhead", "toy_search",
         "search", "device_search", "gpu_check", "table1", "frcnn_baseline", "reeval", "paired", "proxy", "eval_noise", "collapse")
#: Modules the tools share, with no command of their own.
HELPERS = ("baseline",)


def summary(tool: str) -> str:
    """The first sentence of a tool's module docstring (read, not imported: no torch)."""
    doc = ast.get_docstring(ast.parse((Path(__file__).parent / f"{tool}.py").read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def main() -> None:
    width = max(map(len, TOOLS))
    print("python -m bench.<tool> --help   (from the repository root)\n")
    for tool in TOOLS:
        print(f"  {tool:<{width}}  {summary(tool)}")


if __name__ == "__main__":
    main()
