"""bench.table1's table on recorded numbers: means, spreads, the AP floor, the markdown."""

from __future__ import annotations

import statistics

import pytest

from bench import table1

RECORDED = {
    "retinanet_mobilenet_v3": {"focal+giou": [12.0, 14.0, 13.0], "pap": [20.0, 22.0, 21.0],
                               "pap+detach_i3": [19.0, 25.0, 22.0], "searched": [24.0]},
    "faster_rcnn_mobilenet_v3": {"focal+giou": [4.0, 5.0, 5.5], "pap": [9.0, 8.0, 10.0]},
    "deformable_detr_tiny": {"focal+giou": [6.5], "pap": [3.0], "searched": [2.5]},
}


def test_cells_are_the_seeds_mean_and_sample_std():
    t = table1.table(RECORDED, seeds_note={"deformable_detr_tiny": "1 (one seed)"})
    cell = t["detectors"]["retinanet_mobilenet_v3"]["cells"]["pap+detach_i3"]
    assert cell["mean"] == pytest.approx(22.0) and cell["std"] == pytest.approx(statistics.stdev([19, 25, 22]))
    assert cell["n"] == 3 and cell["aps"] == [19.0, 25.0, 22.0]
    assert t["detectors"]["deformable_detr_tiny"]["cells"]["pap"] == {"mean": 3.0, "std": None, "n": 1, "aps": [3.0]}
    assert t["detectors"]["faster_rcnn_mobilenet_v3"]["cells"]["searched"] is None
    assert t["detectors"]["deformable_detr_tiny"]["seeds"] == "1 (one seed)"


def test_a_row_counts_only_when_its_baseline_reaches_the_floor():
    t = table1.table(RECORDED, floor=5.0)
    counts = {det: d["counts"] for det, d in t["detectors"].items()}
    # faster_rcnn's baseline mean is 4.83 < 5: not converged, whatever its PAP rows read
    assert counts == {"retinanet_mobilenet_v3": True, "faster_rcnn_mobilenet_v3": False, "deformable_detr_tiny": True}
    assert table1.table(RECORDED, floor=4.8)["detectors"]["faster_rcnn_mobilenet_v3"]["counts"]
    assert not table1.table({"x": {"pap": [30.0]}})["detectors"]["x"]["counts"]  # no baseline: does not count


def test_markdown_reads_not_converged_below_the_floor_and_numbers_above():
    md = table1.markdown(table1.table(RECORDED, floor=5.0))
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| `")}
    assert lines["`retinanet_mobilenet_v3`"].split("|")[3:7] == [" 13.0 ± 1.0 ", " 21.0 ± 1.0 ", " 22.0 ± 3.0 ",
                                                                " 24.0 "]
    assert lines["`faster_rcnn_mobilenet_v3`"].count(table1.NOT_CONVERGED) == len(table1.ROWS)
    assert "9.0" not in lines["`faster_rcnn_mobilenet_v3`"]
    assert lines["`deformable_detr_tiny`"].split("|")[3:7] == [" 6.5 ", " 3.0 ", " — ", " 2.5 "]
    assert "5 AP" in md


@pytest.mark.parametrize("results, message", [
    ({"d": {"focal": [1.0]}}, "unknown row"),
    ({"d": {"pap": [150.0]}}, "must be in \\[0, 100\\]"),
    ({"d": {"pap": [float("nan")]}}, "must be in \\[0, 100\\]"),
])
def test_bad_numbers_are_named(results, message):
    with pytest.raises(ValueError, match=message):
        table1.table(results)


def test_detr_trains_every_row_and_one_seed():
    sizes = table1.PRESETS["small"]
    assert table1.rows_of("deformable_detr_tiny") == table1.ROWS  # its head takes detach_i3 too
    assert table1.rows_of("faster_rcnn_mobilenet_v3") == table1.ROWS
    assert table1.seeds_of("deformable_detr_tiny", sizes) == (0,) and table1.seeds_of("retinanet_mobilenet_v3", sizes) == (0, 1, 2)
    assert table1.train_options("deformable_detr_tiny", sizes, 7)["detector"] == "deformable_detr_tiny"
