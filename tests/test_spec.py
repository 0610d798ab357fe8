"""LossSpec: θ <-> control points (SPEC §2), gradient scale, JSON, validation."""

from __future__ import annotations

import os
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def _examples(n: int) -> int:
    """Hypothesis examples; PAPLOSS_HYPOTHESIS_SCALE=20 runs a 20× deeper search."""
    return max(1, int(n * float(os.environ.get("PAPLOSS_HYPOTHESIS_SCALE", "1"))))

from paploss.spec import (
    FUNCTIONS,
    IDENTITY_THETA8,
    LossSpec,
    grad_scale_from_theta,
    points_to_theta,
    theta_from_grad_scale,
    theta_to_points,
)

unit = st.floats(0.0, 1.0, allow_nan=False)
grid = st.integers(0, 8).map(lambda k: k / 8)  # makes equal x's, zero-width segments, points at 1
theta8 = st.lists(st.one_of(unit, grid), min_size=8, max_size=8)


def test_function_order_is_the_spec_order():
    assert FUNCTIONS == ("H2", "I2", "I3", "I1", "H1")


def test_identity_theta_gives_the_diagonal():
    p = theta_to_points(IDENTITY_THETA8)
    expected = (0, 0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1, 1)
    assert len(p) == 12
    for a, b in zip(p, expected):
        assert a == pytest.approx(b, abs=1e-15)


def test_theta_to_points_is_cumulative_as_written_in_the_spec():
    t = (0.5, 0.1, 0.5, 0.2, 0.5, 0.3, 0.5, 0.4)
    p = theta_to_points(t)
    # x: 0.5, 0.75, 0.875, 0.9375; y: 0.1, 0.1+0.2*0.9, ...
    ys = [0.1]
    for k in (0.2, 0.3, 0.4):
        ys.append(k * (1 - ys[-1]) + ys[-1])
    assert p[2::2][:4] == (0.5, 0.75, 0.875, 0.9375)
    assert p[3::2][:4] == pytest.approx(tuple(ys), abs=1e-15)


@given(theta8)
def test_points_are_monotone_and_in_the_unit_square(t):
    p = theta_to_points(t)
    xs, ys = p[0::2], p[1::2]
    assert xs[0] == ys[0] == 0 and xs[-1] == ys[-1] == 1
    assert all(0 <= v <= 1 for v in p)
    assert all(a <= b for a, b in zip(xs, xs[1:])) and all(a <= b for a, b in zip(ys, ys[1:]))


@given(theta8)
def test_points_to_theta_inverts_theta_to_points(t):
    p = theta_to_points(t)
    back = points_to_theta(p)
    assert len(back) == 8
    # θ_k is not determined where the previous point is already at 1: compare the points instead
    assert theta_to_points(back) == pytest.approx(p, abs=1e-12)
    for k in range(4):
        for c in (0, 1):
            prev = p[2 * k + c]
            if 1 - prev > 1e-6:
                assert back[2 * k + c] == pytest.approx(t[2 * k + c], abs=1e-9)


def test_points_to_theta_uses_zero_where_undetermined():
    p = (0, 0, 1, 0.5, 1, 0.75, 1, 1, 1, 1, 1, 1)
    assert points_to_theta(p) == (1.0, 0.5, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0)


@given(unit)
def test_grad_scale_round_trip(t):
    g = grad_scale_from_theta(t)
    assert 0.1 - 1e-12 <= g <= 10 + 1e-12
    assert g == pytest.approx(10 ** (2 * t - 1))
    assert theta_from_grad_scale(g) == pytest.approx(t, abs=1e-12)


def test_grad_scale_end_points():
    assert grad_scale_from_theta(0.5) == 1.0
    assert grad_scale_from_theta(0.0) == pytest.approx(0.1)
    assert grad_scale_from_theta(1.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="grad-scale theta"):
        grad_scale_from_theta(1.5)
    with pytest.raises(ValueError, match="grad_scale"):
        theta_from_grad_scale(0.0)


@pytest.mark.parametrize("n, form, n_fun, has_g", [
    (41, "searched", 5, True), (40, "searched", 5, False), (33, "searched", 4, True),
    (32, "searched", 4, False), (9, "shared", 1, True), (8, "shared", 1, False),
])
def test_from_theta_lengths(n, form, n_fun, has_g):
    theta = [((7 * k) % 10) / 10 for k in range(n)]
    spec = LossSpec.from_theta(theta)
    assert spec.form == form and len(spec.points) == n_fun
    for k in range(n_fun):
        assert spec.points[k] == theta_to_points(theta[8 * k: 8 * k + 8])
    assert spec.grad_scale == (grad_scale_from_theta(theta[-1]) if has_g else 1.0)


@given(st.lists(st.one_of(unit, grid), min_size=41, max_size=41))
def test_to_theta_from_theta_round_trip(theta):
    spec = LossSpec.from_theta(theta)
    again = LossSpec.from_theta(spec.to_theta())
    for a, b in zip(again.points, spec.points):
        assert a == pytest.approx(b, abs=1e-12)
    assert again.grad_scale == pytest.approx(spec.grad_scale, rel=1e-12)


@pytest.mark.parametrize("bad, match", [
    ([0.5] * 40 + [1.5], r"theta\[40\] must be in \[0, 1\], got 1.5"),
    ([0.5] * 12, "theta must have 41 or 40 or 33 or 32 or 9 or 8 numbers, got 12"),
    ([0.5] * 7 + [float("nan")], r"theta\[7\] must be finite"),
    ("0.5", "theta must be a sequence"),
])
def test_from_theta_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        LossSpec.from_theta(bad)


@settings(max_examples=_examples(60))
@given(
    st.sampled_from(["searched4", "searched5", "shared", "sigmoid", "sqrt", "linear", "square"]),
    st.lists(st.one_of(unit, grid), min_size=41, max_size=41),
    st.floats(0.01, 100.0),
)
def test_json_round_trip_is_exact(kind, theta, g):
    if kind.startswith("searched"):
        n = int(kind[-1])
        spec = LossSpec.searched([theta_to_points(theta[8 * k: 8 * k + 8]) for k in range(n)], grad_scale=g)
    elif kind == "shared":
        spec = LossSpec.shared(theta_to_points(theta[:8]), grad_scale=g)
    else:
        spec = LossSpec.handcrafted(kind)
    text = spec.to_json()
    back = LossSpec.from_json(text)
    assert back == spec
    assert back.to_json() == text
    assert LossSpec.from_dict(json.loads(text)) == spec
    assert LossSpec.from_dict(spec.to_dict()) == spec


def test_from_json_errors_name_the_field():
    good = LossSpec.searched([theta_to_points(IDENTITY_THETA8)] * 5).to_dict()
    cases = [
        ({**good, "form": "cubic"}, "form must be one of"),
        ({k: v for k, v in good.items() if k != "form"}, "'form' is missing"),
        ({**good, "extra": 1}, r"unknown field\(s\) in loss spec: \['extra'\]"),
        ({**good, "grad_scale": -1}, "grad_scale must be a finite number > 0, got -1"),
        ({**good, "points": "abc"}, "'points' must be a list"),
        ({**good, "points": [good["points"][0]] * 3}, "must hold 4 or 5 functions, got 3"),
        ({**good, "points": [good["points"][0]] * 4 + [[0, 0, 1, 1]]}, r"points\[4\] \(H1\) must be 12 numbers"),
        ({**good, "points": [good["points"][0]] * 4 + [5]}, r"'points\[4\]' must be a list"),
    ]
    for d, match in cases:
        with pytest.raises(ValueError, match=match):
            LossSpec.from_json(json.dumps(d))
    with pytest.raises(ValueError, match="not valid JSON"):
        LossSpec.from_json("{form:")
    with pytest.raises(ValueError, match="JSON object"):
        LossSpec.from_json("[1, 2]")


@pytest.mark.parametrize("points, match", [
    ((0, 0, 0.5, 0.5, 1, 1), "must be 12 numbers"),
    ((0, 0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 1.2, 1, 1), r"\[9\] must be in \[0, 1\], got 1.2"),
    ((0.1, 0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1, 1), r"must start at \(0, 0\)"),
    ((0, 0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1, 0.9), r"must end at \(1, 1\)"),
    ((0, 0, 0.2, 0.2, 0.4, 0.4, 0.3, 0.6, 0.8, 0.8, 1, 1), "must not decrease: x3 = 0.3 < x2 = 0.4"),
    ((0, 0, 0.2, 0.5, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1, 1), "must not decrease: y2 = 0.4 < y1 = 0.5"),
    ((0, 0, 0.2, 0.2, 0.4, "a", 0.6, 0.6, 0.8, 0.8, 1, 1), r"\[5\] must be a number, got 'a'"),
    ((0, 0, 0.2, 0.2, 0.4, math.inf, 0.6, 0.6, 0.8, 0.8, 1, 1), r"\[5\] must be finite"),
])
def test_bad_control_points_are_rejected_with_their_place(points, match):
    with pytest.raises(ValueError, match=r"points\[0\] \(shared\)"):
        LossSpec.shared(points)
    with pytest.raises(ValueError, match=match):
        LossSpec.shared(points)
    ident = theta_to_points(IDENTITY_THETA8)
    with pytest.raises(ValueError, match=r"points\[2\] \(I3\)"):
        LossSpec.searched([ident, ident, points, ident])


def test_constructors_and_fields():
    ident = theta_to_points(IDENTITY_THETA8)
    s5 = LossSpec.searched([list(ident)] * 5, grad_scale=2)
    assert s5.form == "searched" and len(s5.points) == 5 and s5.grad_scale == 2.0
    assert isinstance(s5.points[0], tuple) and all(isinstance(v, float) for v in s5.points[0])
    assert LossSpec.searched([ident] * 4).points_of("H1") is None
    assert LossSpec.shared(ident).points_of("I3") == ident
    assert LossSpec.handcrafted("square").points == ()
    with pytest.raises(ValueError, match="name must be one of"):
        LossSpec.handcrafted("searched")
    with pytest.raises(ValueError, match="'sqrt' spec must hold 0 functions, got 1"):
        LossSpec("sqrt", (ident,))
    with pytest.raises(ValueError, match="a 'linear' spec has no θ"):
        LossSpec.handcrafted("linear").to_theta()
    with pytest.raises(ValueError, match="name must be one of"):
        s5.function("H3")
    # frozen and hashable: usable as a cache key
    assert hash(s5) == hash(LossSpec.from_json(s5.to_json()))
    with pytest.raises(Exception):
        s5.form = "shared"  # type: ignore[misc]
