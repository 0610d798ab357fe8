"""The laboratory stays out of the product: nothing in ``paploss``, ``pipelines`` or
``components`` imports or names ``bench``, it is not installed, not a ``paploss``
command and not copied into the images; ``python -m bench`` lists its tools."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("paploss", "pipelines", "components")
BENCH_NAME = re.compile(r"^bench(\.|:|$)")  # a module path: bench, bench.search, bench.search:bench


def _product_files() -> list[Path]:
    return sorted(f for pkg in PRODUCT for f in (ROOT / pkg).rglob("*.py"))


def _bench_references(source: str) -> list[str]:
    """Imports of bench and strings that name one of its modules (``importlib`` targets)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if BENCH_NAME.match(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and BENCH_NAME.match(node.module or ""):
            found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and BENCH_NAME.match(node.value):
            found.append(node.value)
    return found


def test_bench_references_are_found():
    """The scan below can fail: it sees an import, a from-import and an importlib target."""
    src = "import bench.search\nfrom bench import baseline\nX = {'b': 'bench.search:bench'}\nY = 'benchmark'\n"
    assert _bench_references(src) == ["bench.search", "bench", "bench.search:bench"]


def test_no_product_module_names_bench():
    """No import of bench, no importlib target in it, and no docstring or comment that
    sends a reader to one of its modules (``bench.<module>``, ``python -m bench``): the
    product is read without the laboratory."""
    hits = {str(f.relative_to(ROOT)): refs for f in _product_files() if (refs := _bench_references(f.read_text()))}
    assert hits == {}
    named = {f"{f.relative_to(ROOT)}:{n}": line.strip() for f in [*_product_files(), *(ROOT / "docker").glob("*")]
             if f.is_file() for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
             if re.search(r"\bbench[.:][a-z_]|-m bench\b", line)}
    assert named == {}


_IMPORT_ALL = """
import importlib, json, pkgutil, sys
skipped = {}
for top in %r:
    pkg = importlib.import_module(top)
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        try:
            importlib.import_module(info.name)
        except ImportError as exc:  # an optional extra not installed here (mmdet, ...)
            if (exc.name or "").split(".")[0] == "bench":
                raise
            skipped[info.name] = str(exc)
from paploss.cli import COMMANDS
for target, _ in COMMANDS.values():
    try:
        importlib.import_module(target.split(":")[0])
    except ImportError as exc:
        skipped[target] = str(exc)
print(json.dumps({"bench": sorted(m for m in sys.modules if m == "bench" or m.startswith("bench.")),
                  "skipped": skipped}))
"""


def test_importing_every_product_module_imports_no_bench(tmp_path):
    """Every module of the product and every ``paploss`` command, imported in a fresh
    process that runs outside the repository (so ``bench`` could only come in through an
    import of the product's): no module named ``bench*`` gets loaded."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_ALL % (PRODUCT,)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["bench"] == []
    assert len(got["skipped"]) < 10, got["skipped"]  # most of the product was really imported


def test_bench_is_not_installed_nor_a_command():
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(ROOT), include=include)
    assert "paploss" in packages and "pipelines" in packages
    assert not [p for p in packages if BENCH_NAME.match(p)]
    from paploss.cli import COMMANDS

    assert "bench" not in COMMANDS and not [t for t, _ in COMMANDS.values() if BENCH_NAME.match(t)]


def test_images_do_not_copy_bench():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert not [line for line in ignored if line.strip().lstrip("!").rstrip("/") == "bench"]
    for dockerfile in sorted((ROOT / "docker").glob("Dockerfile.*")):
        copies = [line for line in dockerfile.read_text().splitlines() if line.split()[:1] in (["COPY"], ["ADD"])]
        assert not [line for line in copies if "bench" in line.split()[1:-1]], dockerfile.name


def test_python_m_bench_lists_every_tool():
    from bench.__main__ import HELPERS, TOOLS

    modules = {f.stem for f in (ROOT / "bench").glob("*.py")} - {"__init__", "__main__"}
    assert set(TOOLS) | set(HELPERS) == modules and not set(TOOLS) & set(HELPERS)
    out = subprocess.run([sys.executable, "-m", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()[2:] if line.strip()] == list(TOOLS)


_HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for tool in %r:
    sys.argv = ["python -m bench." + tool, "--help"]
    buf = io.StringIO()
    code = None
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_module("bench." + tool, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    out[tool] = [code, buf.getvalue()]
print(json.dumps(out))
"""

#: The tools with a command line whose help names options (the GPU and mmdet ones need their extras).
HELP_TOOLS = ("search", "device_search", "reeval", "paired", "collapse", "toy_search", "pipeline_overhead", "proxy",
              "eval_noise")


def test_bench_tools_run_as_modules_and_their_help_cites_no_finding():
    """Each tool has its ``__main__`` entry point: ``--help`` from the repository root
    (all in one process: torch imported once), with no finding or issue numbers in it
    (those are docs/research/'s)."""
    proc = subprocess.run([sys.executable, "-c", _HELP_ALL % (HELP_TOOLS,)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for tool, (code, text) in got.items():
        assert code in (0, None) and "python -m bench." in text.replace("usage: ", ""), (tool, code, text[:300])
        assert not re.search(r"finding \d+|issue \d+|paploss bench", text, re.I), (tool, text)
