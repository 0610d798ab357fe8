"""Draw the search pipeline, as compiled, to a PNG (``docs/pipeline.png``).

::

    .venv/bin/python docs/pipeline_figure.py                      # quick preset -> docs/pipeline.png
    .venv/bin/python docs/pipeline_figure.py --preset smoke --out /tmp/p.png

The figure is read from the compiled Kubeflow Pipelines IR, not drawn by hand: the
pipeline is compiled for the preset (``pipelines.compile.compile_pipeline``) into a
temporary YAML, read back with ``yaml.safe_load_all``, and every task of the root DAG
and of its sub-pipelines (the search rounds, their ``ParallelFor`` of proxy trials) is
a box. An arrow A → B means "B runs after A" (``dependentTasks`` and the tasks whose
outputs B reads). The top panel is the root DAG; each further panel is one
sub-pipeline, drawn once per distinct shape (the rounds, compiled once each, share one).

Layout (no graphviz): a task's column is its longest path from a task with no
predecessor; within a column, tasks are ordered by the mean row of their predecessors
(two sweeps). Arrows implied by others (A → B when A → C → B) are left out of the
drawing, not of :func:`pipeline_graph`'s edges.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "pipeline.png"

__all__ = ["Node", "Graph", "compile_spec", "pipeline_graph", "layers", "render", "main"]


@dataclass(frozen=True)
class Node:
    """One task of a DAG of the compiled pipeline.

    ``task`` is its key in the DAG (``final-train-2``), ``label`` its display name
    (``taskInfo.name``: ``final-focal-l1``), ``component`` the component it runs,
    ``dag`` the DAG it belongs to (``root`` or a sub-pipeline's component name),
    ``kind`` ``"task"`` (a container), ``"pipeline"`` (a sub-pipeline) or ``"loop"``
    (a ``ParallelFor``), ``parallelism`` the loop's limit (0: none or not a loop),
    ``items`` what a loop runs over: the name of the list it is given (``trials``) or,
    for a list fixed at compile time, its values (``searched, focal+l1, focal+giou``).
    """

    task: str
    label: str
    component: str
    dag: str
    kind: str
    parallelism: int = 0
    items: str = ""


@dataclass
class Graph:
    """The tasks and run-after edges of every DAG of a compiled pipeline.

    ``nodes[dag]`` lists the DAG's tasks; ``edges[dag]`` holds ``(before, after)``
    pairs of task keys within that DAG; ``children[(dag, task)]`` names the DAG a
    sub-pipeline or loop task runs.
    """

    name: str
    nodes: dict[str, list[Node]] = field(default_factory=dict)
    edges: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    children: dict[tuple[str, str], str] = field(default_factory=dict)

    def task_names(self) -> set[str]:
        """Every task key, in every DAG."""
        return {n.task for ns in self.nodes.values() for n in ns}


def compile_spec(preset: str = "quick", select_top: int | None = None) -> dict:
    """Compile the search pipeline for ``preset`` into a temporary YAML and return its
    pipeline spec (the YAML's first document, the one with ``root``)."""
    import yaml

    sys.path.insert(0, str(ROOT))
    from pipelines.compile import compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = compile_pipeline(str(Path(tmp) / "pipeline.yaml"), preset=preset, select_top=select_top)
        with open(path, encoding="utf-8") as f:
            documents = list(yaml.safe_load_all(f))
    for doc in documents:
        if isinstance(doc, dict) and "root" in doc:
            return doc
    raise ValueError(f"the pipeline compiled for preset {preset!r} has no document with a 'root' DAG")


def _producers(task: dict) -> set[str]:
    """Tasks whose outputs ``task`` reads (``taskOutputParameter`` / ``taskOutputArtifact``)."""
    found = set()
    for group in ("parameters", "artifacts"):
        for value in task.get("inputs", {}).get(group, {}).values():
            for key in ("taskOutputParameter", "taskOutputArtifact"):
                if key in value:
                    found.add(value[key]["producerTask"])
    return found


def _loop_items(task: dict) -> str:
    """What a ``ParallelFor`` task runs over ("" for other tasks)."""
    items = (task.get("parameterIterator") or task.get("artifactIterator") or {}).get("items", {})
    if "raw" in items:
        values = json.loads(items["raw"]) if isinstance(items["raw"], str) else items["raw"]
        return ", ".join(str(v) for v in values)
    name = (items.get("inputParameter") or items.get("inputArtifact") or "").removeprefix("pipelinechannel--")
    if name.endswith("-Output"):  # a task's return value: name the task
        return f"output of {name.removesuffix('-Output')}"
    return name


def pipeline_graph(spec: dict) -> Graph:
    """The tasks and edges of ``spec`` (a compiled pipeline spec), root DAG and every
    sub-pipeline it reaches."""
    if "root" not in spec or "components" not in spec:
        raise ValueError("pipeline spec: expected the keys 'root' and 'components' of a compiled KFP pipeline")
    graph = Graph(name=spec.get("pipelineInfo", {}).get("name", "pipeline"))
    components = spec["components"]

    def visit(dag_name: str, dag: dict) -> None:
        tasks = dag.get("tasks", {})
        graph.nodes[dag_name] = []
        graph.edges[dag_name] = set()
        for key in sorted(tasks):
            task = tasks[key]
            comp_name = task["componentRef"]["name"]
            comp = components.get(comp_name, {})
            loop = "parameterIterator" in task or "artifactIterator" in task
            kind = "loop" if loop else ("pipeline" if "dag" in comp else "task")
            graph.nodes[dag_name].append(Node(
                task=key, label=task.get("taskInfo", {}).get("name", key), component=comp_name, dag=dag_name,
                kind=kind, parallelism=int(task.get("iteratorPolicy", {}).get("parallelismLimit", 0)),
                items=_loop_items(task)))
            for before in set(task.get("dependentTasks", [])) | _producers(task):
                if before in tasks:
                    graph.edges[dag_name].add((before, key))
            if "dag" in comp:
                graph.children[(dag_name, key)] = comp_name
                if comp_name not in graph.nodes:
                    visit(comp_name, comp["dag"])

    visit("root", spec["root"]["dag"])
    return graph


def layers(names: list[str], edges: set[tuple[str, str]]) -> dict[str, int]:
    """Column of each task: the length of its longest path from a task without
    predecessors. Raises ``ValueError`` on a cycle."""
    preds = {n: {a for a, b in edges if b == n} for n in names}
    depth: dict[str, int] = {}
    visiting: set[str] = set()

    def walk(n: str) -> int:
        if n in depth:
            return depth[n]
        if n in visiting:
            raise ValueError(f"pipeline graph: cycle through task {n!r}")
        visiting.add(n)
        depth[n] = 1 + max((walk(p) for p in preds[n]), default=-1)
        visiting.discard(n)
        return depth[n]

    for n in names:
        walk(n)
    return depth


def _reduced(names: list[str], edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """``edges`` without those implied by a longer path (transitive reduction of a DAG)."""
    succ = {n: {b for a, b in edges if a == n} for n in names}

    def reachable(start: str, skip: tuple[str, str]) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            n = todo.pop()
            for m in succ[n]:
                if (n, m) != skip and m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    return {(a, b) for a, b in edges if b not in reachable(a, (a, b))}


def _layout(names: list[str], edges: set[tuple[str, str]]):
    """(column, row) of each task and the route of each drawn arrow.

    Columns come from :func:`layers`. An arrow that spans several columns gets a
    waypoint in each column it crosses, which takes a row there like a task, so that
    no arrow runs through a box. Rows are ordered by the mean row of the neighbours in
    the previous column, then of those in the next (two sweeps), and each column is
    centred. Returns ``(pos, routes)``: ``pos[name] = (column, row)`` for tasks and
    waypoints, ``routes[(a, b)]`` the waypoints of arrow a -> b, in order."""
    depth = layers(names, edges)
    col = dict(depth)
    links: set[tuple[str, str]] = set()
    routes: dict[tuple[str, str], list[str]] = {}
    for a, b in sorted(_reduced(names, edges)):
        chain = [f"~{a}~{b}~{c}" for c in range(depth[a] + 1, depth[b])]
        for c, v in zip(range(depth[a] + 1, depth[b]), chain):
            col[v] = c
        hops = [a, *chain, b]
        links.update(zip(hops, hops[1:]))
        routes[(a, b)] = chain
    columns: dict[int, list[str]] = {}
    for n in sorted(col, key=lambda n: (n.startswith("~"), n)):
        columns.setdefault(col[n], []).append(n)
    row = {n: float(i) for c in columns.values() for i, n in enumerate(c)}
    for _ in range(2):
        for order, side in ((sorted(columns), 0), (sorted(columns, reverse=True), 1)):
            for c in order:
                def key(n: str) -> tuple[float, float]:
                    near = [row[l[side]] for l in links if l[1 - side] == n]
                    return (sum(near) / len(near) if near else row[n], row[n])
                columns[c].sort(key=key)
                for i, n in enumerate(columns[c]):
                    row[n] = float(i)
    height = max(len(c) for c in columns.values())
    pos = {n: (col[n], row[n] + (height - len(columns[col[n]])) / 2) for n in col}
    return pos, routes


_COLOURS = {  # fill, edge
    "data": ("#dbe9f6", "#3b6ea5"),
    "search": ("#fde6cf", "#c46a12"),
    "final": ("#d9f0d3", "#3a8a3a"),
    "report": ("#e8def3", "#6a4c93"),
}


def _family(node: Node, graph: Graph) -> str:
    if node.kind == "loop":  # a loop is what it runs
        inside = graph.nodes.get(graph.children.get((node.dag, node.task), ""), [])
        if inside:
            return _family(inside[0], graph)
    name = f"{node.task} {node.component}"
    if "final" in name:
        return "final"
    if "report" in name:
        return "report"
    if any(w in name for w in ("search", "round", "trial", "controller", "select", "loop")):
        return "search"
    return "data"


def _label(node: Node, graph: Graph) -> str:
    if node.kind == "loop":
        inside = graph.nodes.get(graph.children.get((node.dag, node.task), ""), [])
        names = ", ".join(n.label for n in inside) or node.label
        limit = f", {node.parallelism} at a time" if node.parallelism else ""
        if "," in node.items or not node.items:  # values fixed at compile time
            head = [f"{names} for each of"] + textwrap.wrap(node.items, 26)
        else:
            head = textwrap.wrap(f"{names} × {node.items}", 26)
        return "\n".join(head + [f"(ParallelFor{limit})"])
    text = node.label if node.label == node.task else f"{node.label}\n({node.task})"
    if node.kind == "pipeline":
        text += "\n[sub-pipeline]"
    return text


def _height(label: str) -> float:
    return max(_BOX_H, 0.2 * label.count("\n") + 0.45)


_BOX_W, _BOX_H, _DX, _DY = 2.5, 0.8, 3.3, 1.15


def _draw_dag(ax, graph: Graph, dag: str, title: str, top: float) -> float:
    """Draw one DAG with its title at height ``top``; return the lowest y used."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    nodes = {n.task: n for n in graph.nodes[dag]}
    pos, routes = _layout(list(nodes), graph.edges[dag])
    y0 = top - 0.9 - _BOX_H / 2
    xy = {n: (c * _DX + _BOX_W / 2, y0 - r * _DY) for n, (c, r) in pos.items()}
    ax.text(0, top, title, fontsize=11, fontweight="bold", va="top")
    for (a, b), chain in sorted(routes.items()):
        points = [(xy[a][0] + _BOX_W / 2, xy[a][1])]
        for v in chain:
            points += [(xy[v][0] - _BOX_W / 2, xy[v][1]), (xy[v][0] + _BOX_W / 2, xy[v][1])]
        points.append((xy[b][0] - _BOX_W / 2, xy[b][1]))
        for p, q in zip(points[:-2], points[1:-1]):
            ax.plot([p[0], q[0]], [p[1], q[1]], color="#555555", lw=1.3, zorder=1, solid_capstyle="round")
        ax.add_patch(FancyArrowPatch(points[-2], points[-1], arrowstyle="-|>", mutation_scale=14, lw=1.3,
                                     color="#555555", shrinkA=0, shrinkB=2, zorder=1))
    for n, node in nodes.items():
        x, y = xy[n]
        fill, edge = _COLOURS[_family(node, graph)]
        label = _label(node, graph)
        h = _height(label)
        style = dict(boxstyle="round,pad=0.02,rounding_size=0.12", fc=fill, ec=edge, lw=1.6, zorder=2)
        if node.kind == "loop":  # a deck of cards: several trials side by side
            for k in (2, 1):
                ax.add_patch(FancyBboxPatch((x - _BOX_W / 2 + 0.09 * k, y - h / 2 - 0.09 * k), _BOX_W, h,
                                            **{**style, "zorder": 2 - 0.1 * k}))
        if node.kind == "pipeline":
            style.update(ls="--", lw=2.0)
        ax.add_patch(FancyBboxPatch((x - _BOX_W / 2, y - h / 2), _BOX_W, h, **style))
        ax.text(x, y, label, ha="center", va="center", fontsize=8.5, zorder=3)
    tallest = max(_height(_label(n, graph)) for n in nodes.values())
    return min(y for _, y in xy.values()) - tallest / 2 - 0.3


def _panels(graph: Graph) -> list[tuple[str, str]]:
    """(dag, title) of each panel: the root, then each distinct sub-pipeline reached
    from it (loops are drawn inside their pipeline's panel, not on their own)."""
    panels = [("root", f"{graph.name}: the root DAG (each box is one task; an arrow: runs after)")]
    seen: dict[tuple, str] = {}
    for (parent, task), child in graph.children.items():
        node = next(n for n in graph.nodes[parent] if n.task == task)
        if node.kind == "loop":
            continue
        shape = (tuple(sorted(n.label for n in graph.nodes[child])), tuple(sorted(graph.edges[child])))
        if shape in seen:
            continue
        seen[shape] = child
        users = [next(n.label for n in graph.nodes[p] if n.task == t)
                 for (p, t), c in graph.children.items()
                 if (tuple(sorted(n.label for n in graph.nodes[c])), tuple(sorted(graph.edges[c]))) == shape]
        panels.append((child, f"inside {', '.join(users)} (sub-pipeline {child.removeprefix('comp-')})"))
    order = {child: _first_column(graph, child) for child, _ in panels[1:]}
    return panels[:1] + sorted(panels[1:], key=lambda p: (order[p[0]], p[1]))


def _first_column(graph: Graph, dag: str) -> tuple[int, ...]:
    """Where ``dag`` first runs: the columns of the tasks that lead to it from the root."""
    for (parent, task), child in graph.children.items():
        if child == dag:
            depth = layers([n.task for n in graph.nodes[parent]], graph.edges[parent])[task]
            return (*(_first_column(graph, parent) if parent != "root" else ()), depth)
    return ()


def render(graph: Graph, out: Path, preset: str) -> Path:
    """Draw ``graph`` to the PNG ``out`` (one panel per DAG, stacked, one scale); return
    its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, ax = plt.subplots()
    top, width = 0.2, 0.0
    for dag, title in _panels(graph):
        top = _draw_dag(ax, graph, dag, title, top) - 0.4
        pos, _ = _layout([n.task for n in graph.nodes[dag]], graph.edges[dag])
        width = max(width, max(c for c, _ in pos.values()) * _DX + _BOX_W)
    width = max(width, 12.0)
    legend = [Patch(fc=fc, ec=ec, label=name) for name, (fc, ec) in
              zip(("data, warm start", "search", "final trainings", "report"), _COLOURS.values())]
    ax.legend(handles=legend, loc="lower right", fontsize=8.5, frameon=False, ncol=4)
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(top - 0.2, 1.0)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.text(0, 0.95, f"The paploss search pipeline, compiled for preset '{preset}' (drawn by docs/pipeline_figure.py)",
            fontsize=12, va="top")
    fig.set_size_inches((width + 0.4) * 0.62, (1.2 - top) * 0.62)
    fig.tight_layout(pad=0.3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compile the paploss search pipeline and draw its tasks (root DAG and sub-pipelines) to a PNG.")
    parser.add_argument("--preset", default="demo", help="pipeline preset to compile (default: demo, as `make run`)")
    parser.add_argument("--select-top", type=int, default=None,
                        help="compile with the selection stage of the N best samples (default: the preset's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    graph = pipeline_graph(compile_spec(args.preset, select_top=args.select_top))
    path = render(graph, args.out, args.preset)
    print(f"wrote {path}: {sum(len(v) for v in graph.nodes.values())} tasks in {len(graph.nodes)} DAGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
