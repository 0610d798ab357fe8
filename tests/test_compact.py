"""The post-compile pass that merges identical component definitions (pipelines/compact.py).

- the paper preset's compiled spec stays under 200 KB, and compacting changes no task,
  input or dependency (every reference expanded, before == after);
- the output parses as a KFP PipelineSpec / PlatformSpec and loads with kfp's loader;
- a compiled pipeline of the same shape as the search (rounds as sub-pipelines in a
  Python loop, a ParallelFor with a Kubernetes secret inside, Collected results) runs
  in ``kfp.local`` from its compacted YAML with the same result as from kfp's YAML;
- a loop body is never shared between two different parents (the KFP backend's Argo
  compiler names a loop's templates after its body component).
"""

# no `from __future__ import annotations`: kfp reads the components' annotations as types
import copy
from typing import List, NamedTuple

import pytest
from google.protobuf import json_format

from pipelines.compact import _iterated_uses, compact, compact_file, expand, load_documents
from pipelines.compile import compile_pipeline

LIMIT = 200_000  # bytes: the workflow object is ~3x the spec; the API server takes ~1.5 MB


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """The paper preset compiled by kfp (not compacted) and compacted."""
    d = tmp_path_factory.mktemp("paper")
    raw = compile_pipeline(str(d / "raw.yaml"), preset="paper", compact=False)
    small = compile_pipeline(str(d / "paper.yaml"), preset="paper")
    return raw, small


def test_paper_preset_spec_is_small_and_runs_the_same_tasks(paper):
    raw, small = paper
    size_raw, size = (len(open(p, "rb").read()) for p in (raw, small))
    assert size < LIMIT, f"compacted paper spec is {size} bytes (kfp wrote {size_raw})"
    assert size_raw > 2 * size  # the pass did the work, not a smaller preset
    _, before = load_documents(raw)
    _, after = load_documents(small)
    assert expand(before) == expand(after)
    rounds = [t for name, t in after[0]["root"]["dag"]["tasks"].items() if name.startswith("search-round")]
    assert len(rounds) == 40 and {t["componentRef"]["name"] for t in rounds} == {"comp-search-round"}
    assert 5 * len(after[0]["components"]) < len(before[0]["components"])  # one definition per kind, not per use
    # every executor keeps its Kubernetes settings, and nothing points at a dropped name
    executors = after[0]["deploymentSpec"]["executors"]
    assert set(after[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) == set(executors)
    for c in after[0]["components"].values():
        assert "executorLabel" not in c or c["executorLabel"] in executors
        for t in c.get("dag", {}).get("tasks", {}).values():
            assert t["componentRef"]["name"] in after[0]["components"]


def test_compacted_spec_parses_and_loads_with_kfp(paper):
    from kfp import components
    from kfp.pipeline_spec import pipeline_spec_pb2

    _, small = paper
    _, docs = load_documents(small)
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    assert spec.pipeline_info.name == "paploss-search"
    loaded = components.load_component_from_file(small)
    assert loaded.name == "paploss-search"
    assert "dataset" in loaded.component_spec.inputs and "s3_secret" in loaded.component_spec.inputs
    assert open(small).read().startswith("# PIPELINE DEFINITION")  # kfp's header kept


def test_expand_sees_a_changed_edge(paper):
    """The equality the size test relies on is not vacuous: one changed input differs."""
    raw, _ = paper
    _, docs = load_documents(raw)
    other = copy.deepcopy(docs)
    round2 = other[0]["components"]["comp-search-round-2"]["dag"]["tasks"]["controller-update"]
    round2["dependentTasks"] = []
    expanded = expand(other)
    assert expanded != expand(docs)
    small = compact(other)
    assert expand(small) == expanded  # an odd round stays apart, faithfully
    assert "comp-search-round-2" in small[0]["components"]


def _body(label: str) -> dict:
    return {"executorLabel": label, "inputDefinitions": {"parameters": {"x": {"parameterType": "STRING"}}}}


def _loop_parent(extra_task: str) -> dict:
    return {"dag": {"tasks": {
        "for-loop-1": {"componentRef": {"name": ""}, "taskInfo": {"name": "for-loop-1"},
                       "parameterIterator": {"itemInput": "x", "items": {"raw": "[1, 2]"}}},
        extra_task: {"componentRef": {"name": "comp-leaf"}, "taskInfo": {"name": extra_task}},
    }}}


def test_a_loop_body_is_not_shared_between_different_parents():
    a, b = _loop_parent("first"), _loop_parent("second")  # different parents, identical bodies
    a["dag"]["tasks"]["for-loop-1"]["componentRef"]["name"] = "comp-for-loop-1"
    b["dag"]["tasks"]["for-loop-1"]["componentRef"]["name"] = "comp-for-loop-1-2"
    spec = {
        "components": {"comp-for-loop-1": _body("exec-leaf"), "comp-for-loop-1-2": _body("exec-leaf-2"),
                       "comp-leaf": {"executorLabel": "exec-leaf-3"}, "comp-a": a, "comp-b": b},
        "deploymentSpec": {"executors": {k: {"container": {"image": "i"}}
                                         for k in ("exec-leaf", "exec-leaf-2", "exec-leaf-3")}},
        "root": {"dag": {"tasks": {n: {"componentRef": {"name": f"comp-{n}"}, "taskInfo": {"name": n}}
                                   for n in ("a", "b")}}},
    }
    out = compact([spec])
    assert len(out[0]["deploymentSpec"]["executors"]) == 1  # the three executors are one
    assert {"comp-for-loop-1", "comp-for-loop-1-2"} <= set(out[0]["components"])  # the bodies stay two
    assert all(len(uses) == 1 for uses in _iterated_uses(out[0]).values())
    assert expand(out) == expand([spec])
    # with equal parents, parents and bodies merge: one loop, used from one place
    b2 = copy.deepcopy(a)
    b2["dag"]["tasks"]["for-loop-1"]["componentRef"]["name"] = "comp-for-loop-1-2"
    spec2 = copy.deepcopy(spec)
    spec2["components"]["comp-b"] = b2
    out2 = compact([spec2])
    assert sorted(out2[0]["components"]) == ["comp-a", "comp-for-loop-1", "comp-leaf"]
    assert expand(out2) == expand([spec2])


def test_not_a_pipeline_is_named():
    with pytest.raises(ValueError, match="not a compiled KFP pipeline"):
        compact([{"apiVersion": "v1"}])


# ------------------------------------------------------------------ kfp.local runs the compacted YAML


def _tiny_pipeline():
    """The search's shape at toy size: rounds as sub-pipelines in a Python loop, each a
    ParallelFor (with a Kubernetes secret, as the trials) and an update of Collected results."""
    from kfp import dsl, kubernetes

    Out = NamedTuple("Out", [("state", int), ("items", List[str])])

    @dsl.component(install_kfp_package=False, base_image="python:3.11")
    def start() -> NamedTuple("Out", [("state", int), ("items", List[str])]):
        Out = NamedTuple("Out", [("state", int), ("items", List[str])])
        return Out(1, ["1", "2"])

    @dsl.component(install_kfp_package=False, base_image="python:3.11")
    def trial(item: str, state: int) -> int:
        return int(item) * 10 + state

    @dsl.component(install_kfp_package=False, base_image="python:3.11")
    def update(state: int, results: List[int]) -> NamedTuple("Out", [("state", int), ("items", List[str])]):
        Out = NamedTuple("Out", [("state", int), ("items", List[str])])
        return Out(int(state + sum(results)), [str(int(r) % 7) for r in results])

    @dsl.pipeline(name="round")
    def one_round(state: int, items: List[str], secret: str) -> Out:
        with dsl.ParallelFor(items, parallelism=2) as item:
            t = trial(item=item, state=state)
            kubernetes.use_secret_as_env(t, secret_name=secret, secret_key_to_env={"K": "K"}, optional=True)
        u = update(state=state, results=dsl.Collected(t.output))
        return Out(u.outputs["state"], u.outputs["items"])

    @dsl.pipeline(name="tiny")
    def tiny(secret: str = "none") -> int:
        s = start()
        state, items = s.outputs["state"], s.outputs["items"]
        for _ in range(3):
            r = one_round(state=state, items=items, secret=secret)
            state, items = r.outputs["state"], r.outputs["items"]
        return state

    return tiny


def _expected() -> int:
    state, items = 1, ["1", "2"]
    for _ in range(3):
        results = [int(i) * 10 + state for i in items]
        state, items = state + sum(results), [str(r % 7) for r in results]
    return state


@pytest.mark.slow
def test_compacted_yaml_runs_in_kfp_local(tmp_path):
    from kfp import compiler, components, local

    raw, small = tmp_path / "raw.yaml", tmp_path / "small.yaml"
    compiler.Compiler().compile(_tiny_pipeline(), str(raw))
    stats = compact_file(raw, small)
    assert stats["components_after"] < stats["components_before"]
    assert stats["bytes_after"] < stats["bytes_before"]
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               enable_caching=False, raise_on_error=True)
    results = [components.load_component_from_file(str(p))().output for p in (raw, small)]
    assert results == [_expected(), _expected()]
