"""The docs hold: the pipeline figure is drawn from the compiled pipeline, every
relative link points at a file, and the README stays a short page for a new user."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _figure_module():
    spec = importlib.util.spec_from_file_location("pipeline_figure", ROOT / "docs" / "pipeline_figure.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _tasks_in_yaml(path: Path) -> set[str]:
    """Every task key of every DAG, read straight from the compiled YAML."""
    with open(path, encoding="utf-8") as f:
        spec = next(d for d in yaml.safe_load_all(f) if isinstance(d, dict) and "root" in d)
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return {task for dag in dags for task in dag["tasks"]}


def test_pipeline_figure_draws_the_compiled_smoke_pipeline(tmp_path):
    from pipelines.compile import compile_pipeline

    figure = _figure_module()
    yaml_path = Path(compile_pipeline(str(tmp_path / "smoke.yaml"), preset="smoke"))
    expected = _tasks_in_yaml(yaml_path)
    assert {"prepare-data", "pretrain", "final-train", "report"} <= expected

    graph = figure.pipeline_graph(figure.compile_spec("smoke"))
    assert graph.task_names() == expected
    root = {n.task for n in graph.nodes["root"]}
    assert {"prepare-data", "pretrain"} <= root
    # pretrain reads prepare-data's output, so it runs after it
    assert ("prepare-data", "pretrain") in graph.edges["root"]

    def in_root(task: str) -> str:
        """The root task that runs ``task`` (itself, or the sub-pipeline holding it)."""
        dag = next(d for d, ns in graph.nodes.items() if any(n.task == task for n in ns))
        while dag != "root":
            dag, task = next(k for k, child in graph.children.items() if child == dag)
        return task

    depth = figure.layers(sorted(root), graph.edges["root"])
    order = [depth[in_root(t)] for t in ("prepare-data", "pretrain", "proxy-trial", "final-train", "report")]
    assert order[0] < order[1] < order[2] <= order[3] <= order[4] == max(depth.values())
    # the trials of a round are a ParallelFor inside a sub-pipeline
    loops = [n for ns in graph.nodes.values() for n in ns if n.kind == "loop"]
    assert loops and all(graph.children[(n.dag, n.task)] in graph.nodes for n in loops)
    assert any(n.task == "proxy-trial" and n.dag != "root" for ns in graph.nodes.values() for n in ns)

    out = tmp_path / "pipeline.png"
    assert figure.main(["--preset", "smoke", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_pipeline_figure_refuses_a_cycle_and_a_spec_without_root():
    figure = _figure_module()
    with pytest.raises(ValueError, match="cycle through task"):
        figure.layers(["a", "b"], {("a", "b"), ("b", "a")})
    with pytest.raises(ValueError, match="'root' and 'components'"):
        figure.pipeline_graph({"pipelineInfo": {"name": "x"}})


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    files += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs" / "research").glob("*.md"))
    return [f for f in files if f.exists()]


def test_every_relative_link_in_the_docs_points_to_a_file():
    broken = []
    checked = 0
    for doc in _doc_files():
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
        for match in LINK.finditer(text):
            target = match.group(1) or match.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            checked += 1
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert checked > 10, "expected the README and docs to link to each other"
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_readme_is_short_and_names_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert "make run" in text and "make test" in text
    assert "docs/pipeline.png" in text and (ROOT / "docs" / "pipeline.png").stat().st_size > 10_000
