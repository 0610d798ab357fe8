"""Figures come back as bytes; nothing in the loss or the controller writes files."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from paploss import plots
from paploss.spec import FUNCTIONS, LossSpec

PNG = b"\x89PNG\r\n\x1a\n"


def _pixels(png: bytes) -> list:
    return list(Image.open(io.BytesIO(png)).convert("RGB").getdata())


def test_functions_figure_is_an_image_in_each_format():
    spec = LossSpec.from_theta([0.3, 0.6, 0.2, 0.5, 0.4, 0.4, 0.5, 0.5] * 5 + [0.7])
    png = plots.functions_figure(spec)
    assert png[:8] == PNG and len(png) > 5000
    assert plots.functions_figure(spec, fmt="svg").lstrip().startswith(b"<?xml")
    assert plots.functions_figure(spec, fmt="pdf")[:4] == b"%PDF"
    with pytest.raises(ValueError, match="figure format 'txt'"):
        plots.functions_figure(spec, fmt="txt")
    # the control points of a searched spec are drawn: the figure differs from the same curves without them
    assert _pixels(png) != _pixels(plots.functions_figure(LossSpec.handcrafted("linear")))


def test_draw_functions_draws_the_five_curves_on_a_given_axes():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    assert plots.draw_functions(LossSpec.handcrafted("sigmoid"), ax) is ax
    assert [line.get_label() for line in ax.get_lines()] == list(FUNCTIONS)


def test_reward_figure_bands_the_seed_noise():
    """With the rounds' noise the figure adds a band around the mean; rounds without
    it (None) add nothing, so a figure of no noise is the plain one."""
    history = [[0.10, 0.14, 0.12], [0.13, 0.18, 0.15]]
    plain = _pixels(plots.reward_figure(history))
    assert _pixels(plots.reward_figure(history, [None, None])) == plain
    changed = sum(a != b for a, b in zip(_pixels(plots.reward_figure(history, [(0.02, 0.01), (0.025, 0.015)])), plain))
    assert changed > 500  # the band's area (and its legend entry)


def test_reward_figure_marks_the_baseline_of_each_round_that_has_one():
    """Black crosses where a round has a baseline reward and a legend entry; all None
    draws nothing, so the figure is the plain one."""
    history = [[0.10, 0.14, 0.12], [0.13, 0.18, 0.15]]
    figs = {"plain": plots.reward_figure(history), "none": plots.reward_figure(history, baseline=[None, None]),
            "one": plots.reward_figure(history, baseline=[0.16, None], baseline_label="square"),
            "both": plots.reward_figure(history, baseline=[0.16, 0.11], baseline_label="square")}
    pixels = {k: _pixels(v) for k, v in figs.items()}
    black = {k: sum(1 for px in v if max(px) < 40) for k, v in pixels.items()}
    assert pixels["none"] == pixels["plain"]
    assert black["plain"] < black["one"] < black["both"]
