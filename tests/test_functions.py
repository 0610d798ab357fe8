"""The substitute functions: f(·; θ) (SPEC §2), the handcrafted forms (SPEC §1 table),
their piecewise description in d = s_j - s_i, and the Figure-1 plot."""

from __future__ import annotations

import os
import math

import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st


def _examples(n: int) -> int:
    """Hypothesis examples; PAPLOSS_HYPOTHESIS_SCALE=20 runs a 20× deeper search."""
    return max(1, int(n * float(os.environ.get("PAPLOSS_HYPOTHESIS_SCALE", "1"))))

from paploss.functions import (
    HANDCRAFTED_APPROX_ERROR,
    HANDCRAFTED_VERSION,
    _pieces_value,
    handcrafted_function,
    piecewise_linear,
    rank_function_handcrafted,
    rank_function_piecewise_linear,
    rank_function_step,
)
from paploss.spec import FUNCTIONS, IDENTITY_THETA8, LossSpec, theta_to_points

matplotlib.use("Agg")

# dyadic reals (k / 2^20) and a grid, plus tiny and near-one values for steep / collapsed
# segments; arbitrary floats could put a break point 2 x_k - 1 within one rounding of d.
unit = st.integers(0, 2**20).map(lambda k: k / 2**20)
grid = st.integers(0, 16).map(lambda k: k / 16)
tiny = st.sampled_from([5e-324, 1e-300, 1e-13, 1e-8, 1 - 1e-8, 1 - 1e-13])
theta8 = st.lists(st.one_of(unit, grid, tiny), min_size=8, max_size=8)
points12 = theta8.map(theta_to_points)


def f_reference(x: float, p) -> float:
    """Scalar, obviously-correct f: right-continuous, clamped, end values 0 and 1,
    segments narrower than 1e-12 collapsed (to 1 near the end, else to the left)."""
    xs, ys = list(p[0::2]), p[1::2]
    for k in range(1, 5):
        if 1 - xs[k] < 1e-12:
            xs[k] = 1.0
        elif xs[k] - xs[k - 1] < 1e-12:
            xs[k] = xs[k - 1]
    if x >= 1:
        return 1.0
    x = max(x, 0.0)
    value = None
    for k in range(5):  # the last segment with x_k <= x < x_{k+1} (zero-width ones are empty)
        if xs[k] <= x < xs[k + 1]:
            value = ys[k] + (x - xs[k]) * (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k])
    assert value is not None
    return value


@settings(max_examples=_examples(80), deadline=None)
@given(points12, st.lists(st.one_of(st.floats(-0.5, 1.5), grid), min_size=1, max_size=30))
def test_piecewise_linear_matches_a_scalar_reference(p, xs):
    x = torch.tensor(xs, dtype=torch.float64)
    got = piecewise_linear(x, p)
    want = torch.tensor([f_reference(v, p) for v in xs], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=_examples(60), deadline=None)
@given(points12)
def test_piecewise_linear_is_monotone_and_finite_with_zero_width_segments(p):
    x = torch.linspace(-0.2, 1.2, 701, dtype=torch.float64, requires_grad=True)
    y = piecewise_linear(x, p)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert (y[1:] >= y[:-1]).all()
    assert (g >= 0).all()
    assert y[0] == piecewise_linear(torch.zeros(1, dtype=torch.float64), p)[0]  # clamped below
    assert y[-1] == 1.0


def test_zero_width_segment_jumps_to_the_last_point():
    p = (0, 0, 0.5, 0.1, 0.5, 0.6, 0.5, 0.7, 0.9, 0.8, 1, 1)
    x = torch.tensor([0.25, 0.5 - 1e-12, 0.5, 0.7, 1.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    y = piecewise_linear(x, p)
    torch.testing.assert_close(
        y.detach(), torch.tensor([0.05, 0.1, 0.7, 0.75, 1.0, 1.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-11
    )
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.tensor([0.2, 0.2, 0.25, 0.25, 0, 0, 0], dtype=torch.float64))


def test_tiny_widths_collapse_to_jumps_without_nan():
    for w in (5e-324, 1e-300, 1e-13):
        p = (0, 0, w, 1.0, w, 1.0, w, 1.0, w, 1.0, 1, 1)
        x = torch.tensor([0.0, w, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
        y = piecewise_linear(x, p)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(y).all() and torch.isfinite(g).all()
        torch.testing.assert_close(y.detach(), torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
        h = rank_function_piecewise_linear(p)
        assert all(abs(pc.c1) < 1e13 for pc in h.pieces)


def test_steep_segment_is_exact():
    p = (0, 0, 0.5, 0.0, 0.5 + 1e-9, 1.0, 1, 1, 1, 1, 1, 1)
    x = torch.tensor([0.5, 0.5 + 0.5e-9, 0.6], dtype=torch.float64)
    torch.testing.assert_close(piecewise_linear(x, p), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))


def test_identity_theta_is_the_identity():
    p = theta_to_points(IDENTITY_THETA8)
    x = torch.rand(1000, dtype=torch.float64)
    torch.testing.assert_close(piecewise_linear(x, p), x, rtol=0, atol=1e-15)


def test_piecewise_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="points12 must have 12 numbers"):
        piecewise_linear(torch.zeros(3), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        piecewise_linear(torch.zeros(3, dtype=torch.long), theta_to_points(IDENTITY_THETA8))


@pytest.mark.parametrize("form, h, i", [
    ("sigmoid", lambda d: 1 / (1 + math.exp(-d)), lambda u: 1 / (1 + math.exp(-(2 * u - 1)))),
    ("sqrt", lambda d: math.sqrt(min(max(d / 2 + 0.5, 0), 1)), math.sqrt),
    ("linear", lambda d: min(max(d / 2 + 0.5, 0), 1), lambda u: u),
    ("square", lambda d: min(max(d / 2 + 0.5, 0), 1) ** 2, lambda u: u * u),
])
def test_handcrafted_forms_follow_the_spec_table(form, h, i):
    """Exact for linear / square and for the I places; sigmoid / sqrt H within their
    approximation bound by default, exact with ``exact=True``."""
    spec = LossSpec.handcrafted(form)
    ds = [-3.0, -1.0, -0.3, 0.0, 0.4, 1.0, 2.5]
    us = [0.0, 0.1, 0.5, 0.9, 1.0]
    d = torch.tensor(ds, dtype=torch.float64)
    u = torch.tensor(us, dtype=torch.float64)
    atol = HANDCRAFTED_APPROX_ERROR.get(form, 1e-12)
    for name in ("H1", "H2"):
        want = torch.tensor([h(v) for v in ds], dtype=torch.float64)
        torch.testing.assert_close(spec.rank_function(name)(d), want, rtol=0, atol=atol)
        torch.testing.assert_close(spec.function(name)(d / 2 + 0.5), want, rtol=0, atol=atol)
        # the natural-argument view is the very function the loss uses (same pieces; 1e-15:
        # d -> x -> 2x - 1 rounds once for d = -0.3)
        torch.testing.assert_close(spec.function(name)(d / 2 + 0.5), spec.rank_function(name)(d), rtol=0, atol=1e-15)
        torch.testing.assert_close(rank_function_handcrafted(form, exact=True)(d), want)
        torch.testing.assert_close(handcrafted_function(form, name, exact=True)(d / 2 + 0.5), want)
    for name in ("I1", "I2", "I3"):
        torch.testing.assert_close(spec.function(name)(u), torch.tensor([i(v) for v in us], dtype=torch.float64))


def test_four_function_spec_uses_the_step_for_h1():
    spec = LossSpec.searched([theta_to_points(IDENTITY_THETA8)] * 4)
    d = torch.tensor([-2.0, -1e-9, 0.0, 1e-9, 3.0], dtype=torch.float64)
    torch.testing.assert_close(spec.rank_function("H1")(d), torch.tensor([0, 0, 0.5, 1, 1], dtype=torch.float64))
    torch.testing.assert_close(spec.function("H1")(d / 2 + 0.5), torch.tensor([0, 0, 0.5, 1, 1], dtype=torch.float64))


def _all_rank_functions(p):
    return [rank_function_piecewise_linear(p), rank_function_step(),
            rank_function_handcrafted("linear"), rank_function_handcrafted("square"),
            rank_function_handcrafted("sigmoid"), rank_function_handcrafted("sqrt")]


@settings(max_examples=_examples(60), deadline=None)
@given(points12, st.lists(st.one_of(st.integers(-3 * 2**20, 3 * 2**20).map(lambda k: k / 2**20),
                                    st.integers(-24, 24).map(lambda k: k / 8)), min_size=1, max_size=40))
def test_pieces_describe_the_function_exactly(p, ds):
    """The fast loss trusts the pieces: they must equal the function and its derivative.

    ``d`` is drawn as dyadic fractions: for |d| below one rounding of 1/2 (say 1e-300)
    ``x = d/2 + 1/2`` rounds to exactly 1/2, and the two descriptions may then fall on
    different sides of a break point at x = 1/2 (documented in docs/loss.md)."""
    d = torch.tensor(ds, dtype=torch.float64, requires_grad=True)
    for h in _all_rank_functions(p):
        value = h(d)
        # c0 + c1 d rounds like c1 * 1e-16: near-vertical segments (slope 1e8) need a looser atol
        atol = 1e-12 * max([1.0] + [abs(pc.c1) + abs(pc.c2) for pc in h.pieces])
        torch.testing.assert_close(_pieces_value(h.pieces, d.detach()), value.detach(), rtol=1e-12, atol=atol)
        if value.requires_grad:
            (grad,) = torch.autograd.grad(value.sum(), d, allow_unused=True)
        else:  # the step passes no gradient at all
            grad = None
        grad = torch.zeros_like(d) if grad is None else grad
        torch.testing.assert_close(h.derivative(d.detach()), grad, rtol=1e-12, atol=1e-12)
        # pieces cover the real line without overlap
        covered = torch.zeros_like(d, dtype=torch.long)
        for pc in h.pieces:
            lo = (d >= pc.lo) if pc.lo_closed else (d > pc.lo)
            hi = (d <= pc.hi) if pc.hi_closed else (d < pc.hi)
            covered += (lo & hi).long()
        assert (covered == 1).all()


@pytest.mark.parametrize("form", ["sigmoid", "sqrt"])
def test_exact_forms_have_no_pieces_and_consistent_derivatives(form):
    h = rank_function_handcrafted(form, exact=True)
    assert h.pieces is None
    assert rank_function_handcrafted(form).pieces is not None   # the default: fast path
    d = torch.linspace(-3, 3, 241, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(h(d).sum(), d)
    assert torch.isfinite(grad).all()
    inside = (d.detach() > -1) & (d.detach() < 1) if form == "sqrt" else torch.ones_like(d, dtype=torch.bool)
    torch.testing.assert_close(h.derivative(d.detach())[inside], grad[inside])


def _dense_d_grid(h, lo, hi):
    """A dense grid of d: 2M uniform points, 2001 inside every finite piece (both ends
    included), the break points ± 1e-12, and for sqrt a log grid towards d = -1."""
    parts = [torch.linspace(lo, hi, 2_000_001, dtype=torch.float64)]
    for p in h.pieces:
        for e in (p.lo, p.hi):
            if math.isfinite(e):
                parts.append(torch.tensor([e - 1e-12, e, e + 1e-12], dtype=torch.float64))
        if math.isfinite(p.lo) and math.isfinite(p.hi):
            parts.append(torch.linspace(p.lo, p.hi, 2001, dtype=torch.float64))
    parts.append(-1.0 + torch.logspace(-16, 0.3, 100_001, dtype=torch.float64))
    parts.append(torch.tensor([-1e300, -1e6, -50.0, 50.0, 1e6, 1e300], dtype=torch.float64))
    return torch.cat(parts)


@pytest.mark.parametrize("form, lo, hi", [("sigmoid", -40.0, 40.0), ("sqrt", -3.0, 3.0)])
def test_approximations_are_within_their_bound(form, lo, hi):
    h, exact = rank_function_handcrafted(form), rank_function_handcrafted(form, exact=True)
    bound = HANDCRAFTED_APPROX_ERROR[form]
    assert bound <= {"sigmoid": 2e-4, "sqrt": 5e-4}[form]          # the targets
    d = _dense_d_grid(h, lo, hi).requires_grad_()
    value = h(d)
    err = (value.detach() - exact(d.detach())).abs()
    assert err.max().item() <= bound, (err.max().item(), d[err.argmax()].item())
    assert err.max().item() > bound / 4          # the stated bound is not a loose one
    # the limits are kept exactly: 0 far below, 1 far above (and H(-1) = 0 for sqrt)
    assert h(torch.tensor([-1e300, -60.0], dtype=torch.float64)).tolist() == [0.0, 0.0]
    assert h(torch.tensor([60.0, 1e300], dtype=torch.float64)).tolist() == [1.0, 1.0]
    if form == "sqrt":
        assert h(torch.tensor([-1.0], dtype=torch.float64)).item() == 0.0
        assert h(torch.tensor([1.0], dtype=torch.float64)).item() == 1.0
    # finite, non-decreasing; the derivative is finite everywhere and the autograd one
    (grad,) = torch.autograd.grad(value.sum(), d)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all() and (grad >= 0).all()
    torch.testing.assert_close(h.derivative(d.detach()), grad, rtol=1e-12, atol=1e-15)
    srt = torch.sort(d.detach()).values
    vs = h(srt)
    assert (vs[1:] >= vs[:-1] - 1e-15).all()
    # continuous: neighbouring pieces meet at each break point
    for p, nxt in zip(h.pieces[:-1], h.pieces[1:]):
        assert p.hi == nxt.lo
        left = p.c0 + p.c1 * p.hi + p.c2 * p.hi ** 2 if math.isfinite(p.hi) else None
        right = nxt.c0 + nxt.c1 * nxt.lo + nxt.c2 * nxt.lo ** 2
        assert left is None or abs(left - right) < 1e-12
    # float32 input is evaluated the same way (float64 inside), returned as float32
    d32 = torch.linspace(lo, hi, 1001, dtype=torch.float32)
    got = h(d32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, h(d32.double()).float(), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["sigmoid", "sqrt"])
def test_approximation_pieces_tile_the_line(form):
    pieces = rank_function_handcrafted(form).pieces
    assert pieces[0].lo == -math.inf and pieces[-1].hi == math.inf
    assert all(p.lo_closed and not p.hi_closed and p.lo < p.hi for p in pieces)
    assert all(a.hi == b.lo for a, b in zip(pieces[:-1], pieces[1:]))
    assert sum(p.c2 != 0 for p in pieces) >= 15                       # quadratic pieces
    # coefficients stay moderate: the fast path's rounding grows with them
    assert max(abs(p.c0) + abs(p.c1) + abs(p.c2) for p in pieces) < 2e3
    assert isinstance(HANDCRAFTED_VERSION, int) and HANDCRAFTED_VERSION >= 2
