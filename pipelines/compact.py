"""Merge identical component definitions of a compiled pipeline (a post-compile pass).

kfp 2.17 copies a component's definition (and its executor) at every use: the
search pipeline's R rounds are R copies of the same ``search-round`` sub-pipeline
(``comp-search-round``, ``comp-search-round-2``, …, each with its own
``comp-controller-update-k``, ``comp-for-loop-1-k``, ``comp-proxy-trial-k`` and
``exec-…-k``), so the paper preset (40 rounds) compiles to ~600 KB. A Kubeflow
backend turns the spec into one Kubernetes object about 3× that size, near the API
server's limit. This pass keeps one copy of each distinct definition:

1. executors: two executors are the same when their ``deploymentSpec`` entry *and*
   their platform configuration (``platforms.<p>.deploymentSpec.executors[label]``:
   secrets, node selector, …) are equal; the duplicates are dropped and every
   ``executorLabel`` points at the kept one;
2. components: two components are the same when their specs are equal once their
   references (``executorLabel``, ``componentRef.name`` of their DAG's tasks) are
   rewritten to the kept names; merged bottom-up until nothing changes (merging the
   controller updates makes the rounds' loop bodies equal, which makes the rounds
   equal).

The kept name of a group is its shortest (then alphabetically first) name, e.g.
``comp-search-round`` for all rounds. Names of *tasks* are not touched: the run
graph (tasks, their inputs and dependencies) is unchanged, only definitions are
shared — :func:`expand` inlines every reference, and ``expand(before) == expand(after)``
is what the tests check.

One rule keeps the output compilable by the KFP backend's Argo compiler, which
visits each component once but names a loop's Argo templates after the loop body's
component: a component iterated by a ``ParallelFor`` task stays unshared unless all its
uses are the same task in the same (shared) parent.

Pure functions on the parsed YAML documents; :func:`compact_file` rewrites a file in
place the way kfp writes it (its comment header, then the documents with sorted keys).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

__all__ = ["compact", "compact_file", "expand", "load_documents", "CompactStats"]

Doc = dict[str, Any]


def _key(value: Any) -> str:
    """A canonical string of a JSON-like value (dict order does not matter)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _keep(names: list[str]) -> str:
    return min(names, key=lambda n: (len(n), n))


def _platform_executors(platform: Doc | None) -> list[dict[str, Any]]:
    """The ``executors`` maps of every platform in the platform spec (``kubernetes``, …)."""
    if not platform:
        return []
    out = []
    for config in (platform.get("platforms") or {}).values():
        executors = (config.get("deploymentSpec") or {}).get("executors")
        if executors is not None:
            out.append(executors)
    return out


def _tasks(component: Doc) -> dict[str, Doc]:
    return (component.get("dag") or {}).get("tasks") or {}


def _rename_refs(spec: Doc, comp_map: dict[str, str], exec_map: dict[str, str]) -> None:
    """Point every ``componentRef`` / ``executorLabel`` of ``spec`` at the kept names (in place)."""
    for component in [*spec["components"].values(), spec["root"]]:
        label = component.get("executorLabel")
        if label in exec_map:
            component["executorLabel"] = exec_map[label]
        for task in _tasks(component).values():
            ref = task.get("componentRef", {})
            if ref.get("name") in comp_map:
                ref["name"] = comp_map[ref["name"]]


def _iterated_uses(spec: Doc) -> dict[str, set[tuple[str, str]]]:
    """For each component run by a ``ParallelFor`` task: the (parent, task) pairs that run it."""
    uses: dict[str, set[tuple[str, str]]] = {}
    for parent, component in [*spec["components"].items(), ("root", spec["root"])]:
        for task_name, task in _tasks(component).items():
            if "parameterIterator" in task or "artifactIterator" in task:
                uses.setdefault(task["componentRef"]["name"], set()).add((parent, task_name))
    return uses


def _merge_once(spec: Doc, platform: Doc | None, frozen: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """One merge round: returns (component renames, executor renames) applied in place."""
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    platform_execs = _platform_executors(platform)
    groups: dict[str, list[str]] = {}
    for label, executor in executors.items():
        extra = [pe.get(label) for pe in platform_execs]
        groups.setdefault(_key([executor, extra]), []).append(label)
    exec_map = {n: _keep(g) for g in groups.values() if len(g) > 1 for n in g if n != _keep(g)}
    groups = {}
    for name, component in spec["components"].items():
        key = name if name in frozen else _key(component)
        groups.setdefault(key, []).append(name)
    comp_map = {n: _keep(g) for g in groups.values() if len(g) > 1 for n in g if n != _keep(g)}
    for name in comp_map:
        del spec["components"][name]
    for label in exec_map:
        del executors[label]
        for pe in platform_execs:
            pe.pop(label, None)
    _rename_refs(spec, comp_map, exec_map)
    return comp_map, exec_map


def compact(documents: list[Doc]) -> list[Doc]:
    """The compiled pipeline (``[pipeline spec]`` or ``[pipeline spec, platform spec]``,
    as parsed from kfp's YAML) with identical component and executor definitions merged.
    The input is not modified."""
    if not documents or "components" not in documents[0] or "root" not in documents[0]:
        raise ValueError("not a compiled KFP pipeline: the first document has no 'components' and 'root'")
    frozen: set[str] = set()
    while True:
        docs = copy.deepcopy(documents)
        spec, platform = docs[0], (docs[1] if len(docs) > 1 else None)
        origin = {n: {n} for n in spec["components"]}  # kept name -> the original names merged into it
        while True:
            comp_map, exec_map = _merge_once(spec, platform, frozen)
            if not comp_map and not exec_map:
                break
            for old, new in comp_map.items():
                origin[new] |= origin.pop(old)
        unsafe = {n for n, pairs in _iterated_uses(spec).items() if len(pairs) > 1}
        if not unsafe:
            return docs
        frozen |= {o for n in unsafe for o in origin[n]}  # keep those apart and start over


def expand(documents: list[Doc]) -> Doc:
    """The run graph with every reference inlined: each task's component (its DAG
    expanded the same way, recursively) and each executor with its platform
    configuration. Names of definitions disappear; task names, inputs, dependencies,
    iterators and triggers stay. Two specs that expand equal run the same tasks."""
    spec, platform = documents[0], (documents[1] if len(documents) > 1 else None)
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    platform_execs = _platform_executors(platform)

    def component(c: Doc, depth: int = 0) -> Doc:
        if depth > 100:
            raise ValueError("component references nest deeper than 100: a cycle?")
        out = {k: v for k, v in c.items() if k not in ("dag", "executorLabel")}
        if "executorLabel" in c:
            label = c["executorLabel"]
            out["executor"] = [executors[label], [pe.get(label) for pe in platform_execs]]
        if "dag" in c:
            dag = dict(c["dag"])
            dag["tasks"] = {
                name: {**{k: v for k, v in t.items() if k != "componentRef"},
                       "component": component(spec["components"][t["componentRef"]["name"]], depth + 1)}
                for name, t in _tasks(c).items()
            }
            out["dag"] = dag
        return out

    rest = {k: v for k, v in spec.items() if k not in ("components", "root", "deploymentSpec")}
    other_platform = copy.deepcopy(platform) if platform else None
    for pe in _platform_executors(other_platform):
        pe.clear()
    return {"root": component(spec["root"]), "rest": rest, "platform": other_platform}


def load_documents(path: str | Path) -> tuple[str, list[Doc]]:
    """(comment header, documents) of a compiled pipeline file (YAML, or kfp's JSON)."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".json"):
        return "", [json.loads(text)]
    header = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        header.append(line)
    return "".join(header), [d for d in yaml.safe_load_all(text) if d is not None]


class CompactStats(dict):
    """``{"bytes_before", "bytes_after", "components_before", "components_after",
    "executors_before", "executors_after"}`` of one :func:`compact_file`."""


def compact_file(path: str | Path, out: str | Path | None = None) -> CompactStats:
    """Compact the compiled pipeline at ``path`` and write it (atomically) to ``out``
    (default: ``path`` itself), in kfp's layout. Returns the sizes before and after."""
    path = Path(path)
    out = Path(out) if out is not None else path
    before = path.stat().st_size
    header, docs = load_documents(path)
    small = compact(docs)
    if str(out).endswith(".json"):
        text = json.dumps(small[0], indent=2, sort_keys=True)
    else:
        text = header + yaml.safe_dump_all(small, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    def count(d: list[Doc], what: str) -> int:
        return len(d[0]["components"]) if what == "c" else len(d[0].get("deploymentSpec", {}).get("executors", {}))

    return CompactStats(
        bytes_before=before,
        bytes_after=len(text.encode()), components_before=count(docs, "c"), components_after=count(small, "c"),
        executors_before=count(docs, "e"), executors_after=count(small, "e"),
    )

