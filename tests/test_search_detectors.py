"""Searching any detector: θ's length follows the detector's PAP-loss heads (41 per
head: RetinaNet and Deformable DETR 41, Faster R-CNN 82 = RPN + RoI head), θ → loss is
a SpecSet for a multi-head detector, and the search runs end to end for each."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from paploss import plots, storage
from paploss.search import Controller
from paploss.spec import LossSpec
from paploss.spec_set import SpecSet, from_theta, mmdet_config, read_spec, resolve_detector, theta_dim
from paploss.steps.errors import SearchExists, StepError
from paploss.steps.state import _read_state
from paploss.steps.update import init_search, trials_detector

FRCNN = "faster_rcnn_mobilenet_v3"
DETR = "deformable_detr_tiny"


def test_faster_rcnn_controller_has_82_numbers_and_samples_spec_sets():
    c = Controller(heads=("rpn", "roi"), rounds=3, samples=4, seed=7)
    assert c.dim == 82 == theta_dim(FRCNN)
    assert c.parameter_names[0] == "rpn.H2.theta1" and c.parameter_names[41] == "roi.H2.theta1"
    assert c.parameter_names[40] == "rpn.grad_scale" and c.parameter_names[-1] == "roi.grad_scale"
    thetas = c.sample(4)
    assert list(thetas.shape) == [4, 82]
    for theta in thetas.tolist():
        spec = c.spec_of(theta)
        assert isinstance(spec, SpecSet) and spec.names == ("rpn", "roi")
        # each head gets its own 41 numbers: the slow twin builds each head alone
        assert spec["rpn"] == LossSpec.from_theta(theta[:41]) and spec["roi"] == LossSpec.from_theta(theta[41:])
        assert spec == from_theta(FRCNN, theta)
        assert spec["rpn"] != spec["roi"]  # the two blocks are drawn independently
        assert read_spec(spec.to_json()) == spec
    # the starting mean is the one-head controller's mean on every head
    one = Controller(rounds=3)
    assert c.mu.tolist() == one.mu.tolist() * 2
    assert c.spec() == SpecSet.of(rpn=one.spec(), roi=one.spec())


def test_multi_head_controller_state_round_trips_and_old_states_load():
    c = Controller(heads=("rpn", "roi"), rounds=2, samples=3)
    c.update(c.sample(3), [0.1, 0.3, 0.2])
    d = json.loads(json.dumps(c.state_dict()))
    assert d["options"]["heads"] == ["rpn", "roi"]
    back = Controller.from_state_dict(d)
    assert back.dim == 82 and back.mu.tolist() == c.mu.tolist() and back.spec() == c.spec()
    # a state written before heads existed is a one-loss search
    old = json.loads(json.dumps(Controller(rounds=2).state_dict()))
    del old["options"]["heads"]
    assert Controller.from_state_dict(old).dim == 41 and isinstance(Controller.from_state_dict(old).spec(), LossSpec)


@pytest.mark.parametrize("heads, message", [(("rpn",), "two or more"), (("rpn", "rpn"), "two or more"),
                                            ("rpn", "sequence of head names")])
def test_bad_heads_are_named(heads, message):
    with pytest.raises(ValueError, match=message):
        Controller(heads=heads)


@pytest.mark.parametrize("detector, dim", [(FRCNN, 82), ("faster_rcnn_mobilenet_v3_small", 82),
                                           ("retinanet_mobilenet_v3_small", 41), (DETR, 41), ("", 41)])
def test_init_search_sizes_the_controller_from_the_detector(tmp_path, detector, dim):
    out = init_search(str(tmp_path), "s", rounds=2, samples=2, detector=detector)
    _doc, c = _read_state(out["state"])
    assert c.dim == dim and all(len(json.loads(t)["theta"]) == dim for t in out["trials"])
    assert isinstance(c.spec(), SpecSet if dim == 82 else LossSpec)


def test_init_search_reads_the_detector_its_params_record(tmp_path):
    """The pipeline's init-search passes the run-time ``detector`` parameter in params;
    without one, the proxy options' detector (a training preset's) decides."""
    assert trials_detector({"detector": FRCNN, "proxy": {"preset": "smoke"}}) == FRCNN
    assert trials_detector({"detector": "", "proxy": {"preset": "smoke"}}) == "retinanet_mobilenet_v3_small"
    assert trials_detector({"proxy": {"detector": FRCNN}}) == FRCNN and trials_detector(None) == ""
    out = init_search(str(tmp_path), "p", 2, 2, params={"detector": FRCNN, "proxy": {"preset": "smoke"}})
    assert _read_state(out["state"])[1].dim == 82
    out = init_search(str(tmp_path), "q", 2, 2, params={"detector": "", "proxy": {"preset": "smoke"}})
    assert _read_state(out["state"])[1].dim == 41


def test_a_search_resumed_with_another_detector_or_heads_is_refused(tmp_path):
    init_search(str(tmp_path), "s", 2, 2, detector=FRCNN)
    with pytest.raises(SearchExists, match="heads"):
        init_search(str(tmp_path), "s", 2, 2, detector="retinanet_mobilenet_v3_small")
    with pytest.raises(StepError, match=r"heads=\['roi', 'rpn'\] does not fit detector"):
        init_search(str(tmp_path), "t", 2, 2, detector=FRCNN, controller={"heads": ["roi", "rpn"]})
    with pytest.raises(StepError, match="unknown detector"):
        init_search(str(tmp_path), "u", 2, 2, detector="yolo")


def test_deformable_detr_tiny_names_a_config_of_the_installed_package():
    """The name is what travels; each machine finds the config in its own installed package."""
    path = Path(mmdet_config(DETR))
    assert path.is_file() and path.parts[-4:] == ("paploss", "configs", "mmdet", "paploss_deformable_detr_tiny_shapes.py")
    assert resolve_detector(DETR) == f"mmdet:{path}"
    assert resolve_detector(FRCNN) == FRCNN and resolve_detector("") == ""


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_functions_figure_draws_a_row_per_head_and_detectors_figure_a_column_per_head():
    c = Controller(heads=("rpn", "roi"))
    one, two = _png_size(plots.functions_figure(Controller().spec())), _png_size(plots.functions_figure(c.spec()))
    assert two[0] == one[0] and two[1] == 2 * one[1]  # same width, twice the height
    a = _png_size(plots.detectors_figure({"retinanet": Controller().spec()}))
    b = _png_size(plots.detectors_figure({"retinanet": Controller().spec(), FRCNN: c.spec()}))
    assert b[1] == a[1] and b[0] == 3 * a[0]  # three columns: retinanet, rpn, roi
    with pytest.raises(ValueError, match="at least one"):
        plots.detectors_figure({})


def test_the_compiled_pipeline_takes_the_detector_at_run_time(tmp_path):
    """The detector is a run-time parameter of the compiled pipeline, and init-search's
    component function sizes θ from it (not from the compile-time preset)."""
    import components
    from pipelines.compile import compile_pipeline

    package = compile_pipeline(str(tmp_path / "p.yaml"), preset="smoke")
    spec = next(yaml.safe_load_all(open(package)))  # the pipeline spec (a platform spec may follow)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["detector"]["parameterType"] == "STRING"
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["init-search"]["inputs"]["parameters"]["detector"]["componentInputParameter"] == "detector"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for detector, dim in ((FRCNN, 82), ("", 41)):
        out = components.init_search(
            work=str(tmp_path / "w"), search_name=f"d{dim}", rounds=2, samples=2, seed=0, controller={},
            tracking_uri=uri, experiment="e", params={}, detector=detector, proxy={"preset": "smoke"}, final={},
            proxy_epochs=0.0, final_epochs=0.0, max_failed_trials=0, attempts=1, model_name="m", promote=False,
            promote_rule="beat-baselines")
        assert _read_state(out[0])[1].dim == dim and len(json.loads(out[1][0])["theta"]) == dim


# ----------------------------------------------------------------------------- end to end (slow)
def _search(cli_env, detector: str, name: str):
    from paploss.cli import main

    result = CliRunner().invoke(main, ["search", "--preset", "smoke", "--detector", detector, "--rounds", "1",
                                       "--search-name", name, "--work", "w", "--parallelism", "1", "--no-promote",
                                       "--final", '{"iterations": 4}'])
    assert result.exit_code == 0, result.output
    folder = cli_env / "w" / "searches" / name
    return result, folder, storage.read_json(folder / "report.json")


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    torch.set_num_threads(1)
    return tmp_path


@pytest.mark.slow
def test_faster_rcnn_search_end_to_end(cli_env):
    from mlflow import MlflowClient

    _result, folder, report = _search(cli_env, FRCNN, "frcnn")
    doc, c = _read_state(str(folder / "state" / "round-001.json"))
    assert c.dim == 82 and c.round == 1
    trials = [storage.read_json(folder / "trials" / f"r000-s0{k}.json") for k in range(2)]
    for t in trials:
        assert not t["failed"] and len(t["theta"]) == 82
        assert read_spec(t["spec"]) == from_theta(FRCNN, t["theta"])
    searched = read_spec(report["searched_spec"])
    assert isinstance(searched, SpecSet) and searched == c.spec()
    assert {"searched", "focal+l1", "focal+giou"} <= set(report["final"])
    uri = f"sqlite:///{cli_env / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    parent = [r for r in client.search_runs([client.get_experiment_by_name("paploss").experiment_id])
              if r.data.tags.get("paploss.kind") == "search"][0]
    assert "mu.roi.grad_scale" in parent.data.metrics and "mu.rpn.H2.theta1" in parent.data.metrics
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "functions")] == ["functions/round-000.png"]


@pytest.mark.slow
def test_deformable_detr_search_end_to_end(cli_env):
    _result, folder, report = _search(cli_env, DETR, "detr")
    _doc, c = _read_state(str(folder / "state" / "round-001.json"))
    assert c.dim == 41
    for k in range(2):
        t = storage.read_json(folder / "trials" / f"r000-s0{k}.json")
        assert not t["failed"] and len(t["theta"]) == 41 and isinstance(read_spec(t["spec"]), LossSpec)
    assert isinstance(read_spec(report["searched_spec"]), LossSpec)
    assert {"searched", "focal+l1", "focal+giou"} <= set(report["final"])


def test_the_search_benchmark_takes_the_detector():
    """bench.search's --detector (shared with paploss search): the preset's detector, a
    starting mean with one block per head, and an unknown name refused."""
    from bench.search import SHARED_OPTIONS, BenchConfig

    assert "detector" in SHARED_OPTIONS
    cfg = BenchConfig(detector=FRCNN, start="square")
    p = cfg.preset("shapes")
    assert p.detector == FRCNN and len(cfg.controller(p, "searched")["mu"]) == 82
    assert BenchConfig(detector=DETR).preset("shapes").detector == DETR  # the name travels
    assert len(BenchConfig(start="square").controller(BenchConfig().preset("shapes"), "searched")["mu"]) == 41
    with pytest.raises(ValueError, match="detector 'yolo' is unknown"):
        BenchConfig(detector="yolo")
