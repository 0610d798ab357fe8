"""The substitute functions of the Parameterized AP Loss (SPEC §1 table, §2).

Two views of the same functions live here:

* on their natural argument, for plots and for the quality terms: ``x`` in [0, 1]
  for the ranking places H1, H2 (``x = d / 2 + 1/2`` with ``d = s_j - s_i``) and the
  localisation quality ``u`` in [0, 1] for I1, I2, I3;
* for the ranking places, as a function of the score difference ``d`` cut into
  polynomial :class:`Piece` s (``c0 + c1 d + c2 d²`` on an interval of ``d``). That
  exact description is what lets :mod:`paploss.loss` sum ``H(s_j - s_i)`` over all
  pairs with one sort and prefix sums instead of an N×P matrix.

The handcrafted ranking functions ``sigmoid`` (``sigmoid(d)``) and ``sqrt``
(``sqrt(clamp(d/2 + 1/2, 0, 1))``) are not polynomial; as ranking functions (H1, H2)
they are replaced by piecewise-quadratic approximations, within
:data:`HANDCRAFTED_APPROX_ERROR` (2e-5 and 2e-4) of the exact functions everywhere, so
every form takes the fast path. Their ``value``, ``derivative`` and ``pieces`` all
describe the approximation (and so does :func:`handcrafted_function` at H places), so
the fast path and the dense tiled path compute the same function. The exact functions
remain: ``rank_function_handcrafted(form, exact=True)`` (``pieces=None``: the dense
tiled path, also the tests' twin) and ``pap_loss(..., exact=True)``. The quality
functions I1, I2, I3 are always exact. :data:`HANDCRAFTED_VERSION` (2) marks the
change for cache keys.

Conventions (written down because the SPEC leaves them open):

* ``f(·; θ)`` is *right-continuous*: on ``[x_k, x_{k+1})`` it is the segment from
  ``p_k`` to ``p_{k+1}``. Where two control points share an x (a zero-width segment)
  ``f`` jumps there and takes the value of the last point with that x; such a
  segment never divides by zero. Segments narrower than ``MIN_WIDTH = 1e-12`` are
  treated as zero-width (see ``_split_points``), so slopes stay finite.
  ``f(x) = f(0)`` for ``x < 0`` and ``1`` for ``x >= 1``.
* Derivatives are those of the piece that contains the point (right derivatives),
  which is what autograd gives for the code below; at ``x >= 1`` it is 0.
* ``sqrt`` has derivative 0 at 0 (instead of +inf), so that the many pairs with
  ``d <= -1`` (``x`` clamped to 0) cannot produce Inf or NaN gradients. Its
  approximation has a finite derivative everywhere (0 below ``d = -1``, the slope of
  its first chord, about 900, at and just above it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor


__all__ = [
    "HANDCRAFTED",
    "HANDCRAFTED_APPROX_ERROR",
    "HANDCRAFTED_VERSION",
    "MIN_WIDTH",
    "Piece",
    "RankFunction",
    "piecewise_linear",
    "handcrafted_function",
    "step_function",
    "rank_function_piecewise_linear",
    "rank_function_handcrafted",
    "rank_function_step",
]

HANDCRAFTED = ("sigmoid", "sqrt", "linear", "square")

_INF = math.inf


MIN_WIDTH = 1e-12  # narrower segments are treated as jumps (zero width)


def _split_points(points12: Sequence[float]) -> tuple[list[float], list[float]]:
    """x's and y's of the 6 control points, with near-zero widths snapped to zero.

    An inner ``x_k`` within :data:`MIN_WIDTH` of 1 becomes 1, else one within
    ``MIN_WIDTH`` of the previous (snapped) x becomes that x. The function then differs
    from the exact one only on x-intervals narrower than 1e-12, and no slope exceeds
    ``1 / MIN_WIDTH`` (a width of 5e-324 would otherwise give an infinite slope, NaN).
    """
    if len(points12) != 12:
        raise ValueError(f"points12 must have 12 numbers (x0, y0, ..., x5, y5), got {len(points12)}: {tuple(points12)!r}")
    xs = [float(v) for v in points12[0::2]]
    for k in range(1, 5):
        if xs[5] - xs[k] < MIN_WIDTH:
            xs[k] = xs[5]
        elif xs[k] - xs[k - 1] < MIN_WIDTH:
            xs[k] = xs[k - 1]
    return xs, [float(v) for v in points12[1::2]]


def _slopes(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Slope of each of the 5 segments; 0 for a zero-width segment (a jump)."""
    return [
        (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k]) if xs[k + 1] > xs[k] else 0.0
        for k in range(5)
    ]


def piecewise_linear(x: Tensor, points12: Sequence[float]) -> Tensor:
    """Monotone piecewise-linear ``f(x; θ)`` through 6 control points (SPEC §2).

    Args:
        x: any shape, any floating dtype and device.
        points12: ``(x0, y0, ..., x5, y5)`` with ``(x0, y0) = (0, 0)``,
            ``(x5, y5) = (1, 1)`` and non-decreasing x and y
            (see :func:`paploss.spec.theta_to_points`).

    Returns:
        ``f(x)``, same shape, dtype and device as ``x``: for ``x_k <= x < x_{k+1}``
        ``y_k + (x - x_k) (y_{k+1} - y_k) / (x_{k+1} - x_k)``; ``f(0)`` below 0 and
        ``1`` at and above 1. Differentiable in ``x`` (slope of the containing
        segment; 0 outside [0, 1)).
    """
    xs_l, ys_l = _split_points(points12)
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    xs = torch.tensor(xs_l, dtype=x.dtype, device=x.device)          # (6,)
    ys = torch.tensor(ys_l, dtype=x.dtype, device=x.device)          # (6,)
    slopes = torch.tensor(_slopes(xs_l, ys_l), dtype=x.dtype, device=x.device)  # (5,)
    xc = torch.where(x < 0.0, torch.zeros_like(x), x)  # (not clamp: its gradient is 0 at x = 0)
    # segment k with x_k <= xc < x_{k+1}: number of inner break points x_1..x_4 that are <= xc
    k = torch.searchsorted(xs[1:5].contiguous(), xc.detach().contiguous(), right=True)
    value = ys[k] + slopes[k] * (xc - xs[k])
    return torch.where(x >= 1.0, torch.ones_like(value), value)


def step_function(x: Tensor) -> Tensor:
    """The step ``sign(d)/2 + 1/2`` on ``x = d/2 + 1/2``: 0 below 1/2, 1/2 at 1/2, 1 above.

    Used for H1 when a searched spec gives only four functions (SPEC §1). No gradient.
    """
    return ((torch.sign(x.detach() - 0.5) + 1.0) / 2.0).to(x.dtype)


def _unit(x: Tensor) -> Tensor:
    """``clamp(x, 0, 1)`` with the right derivative: 1 on [0, 1), 0 elsewhere."""
    inside = torch.where(x < 0.0, torch.zeros_like(x), x)
    return torch.where(x >= 1.0, torch.ones_like(x), inside)


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(max(x, 0))`` with derivative 0 (not +inf) at 0."""
    positive = x > 0
    root = torch.sqrt(torch.where(positive, x, torch.ones_like(x)))
    return torch.where(positive, root, torch.zeros_like(x))


def handcrafted_function(form: str, place: str, exact: bool = False) -> Callable[[Tensor], Tensor]:
    """The function of a handcrafted form at a place (SPEC §1 table), on its natural argument.

    ``place`` is one of H2, I2, I3, I1, H1. Ranking places (H*) take ``x = d/2 + 1/2``
    (not clamped: ``sigmoid`` is ``sigmoid(d)`` for every ``d``), quality places (I*)
    take ``u`` in [0, 1]. At H places ``sigmoid`` and ``sqrt`` are the piecewise-quadratic
    approximations of :func:`rank_function_handcrafted` evaluated at ``d = 2x - 1``
    (the same function the loss uses), unless ``exact``; I places are always exact.
    """
    if form in ("sigmoid", "sqrt") and place.startswith("H") and not exact:
        h = rank_function_handcrafted(form)
        return lambda x: h.value(2.0 * x - 1.0)
    if form == "sigmoid":
        return (lambda x: torch.sigmoid(2.0 * x - 1.0))  # sigmoid(d) / sigmoid(2u - 1)
    if form == "sqrt":
        return lambda x: _safe_sqrt(_unit(x))
    if form == "linear":
        return _unit
    if form == "square":
        return lambda x: _unit(x) ** 2
    raise ValueError(f"form must be one of {HANDCRAFTED} for a handcrafted function, got {form!r}")


# --------------------------------------------------------------------------------------
# Ranking functions as functions of d = s_j - s_i
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """``H(d) = c0 + c1 d + c2 d²`` for ``d`` in an interval.

    The interval is ``[lo, hi)`` by default; ``lo_closed=False`` opens the lower end
    and ``hi_closed=True`` closes the upper end (``lo = hi`` with both closed is a
    single point, as the step's value 1/2 at ``d = 0``). ``lo`` may be ``-inf`` and
    ``hi`` ``+inf``.
    """

    lo: float
    hi: float
    c0: float
    c1: float = 0.0
    c2: float = 0.0
    lo_closed: bool = True
    hi_closed: bool = False


@dataclass(frozen=True)
class RankFunction:
    """A ranking substitute ``H(d)`` of the score difference ``d = s_j - s_i``.

    Attributes:
        name: a short description (for errors and plots).
        value: ``H(d)`` on a tensor of any shape (autograd-friendly).
        derivative: ``H'(d)`` (the right derivative at break points).
        pieces: the exact piecewise-polynomial description of ``value``, or ``None``
            when ``H`` is not piecewise polynomial (the exact ``sigmoid``, ``sqrt``):
            then the loss uses the tiled dense path.
    """

    name: str
    value: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    pieces: tuple[Piece, ...] | None

    def __call__(self, d: Tensor) -> Tensor:
        return self.value(d)


def _pieces_value(pieces: Sequence[Piece], d: Tensor, derivative: bool = False) -> Tensor:
    out = torch.zeros_like(d)
    for p in pieces:
        inside = (d >= p.lo) if p.lo_closed else (d > p.lo)
        inside = inside & ((d <= p.hi) if p.hi_closed else (d < p.hi))
        v = (p.c1 + 2.0 * p.c2 * d) if derivative else (p.c0 + p.c1 * d + p.c2 * d * d)
        out = torch.where(inside, v, out)
    return out


def rank_function_piecewise_linear(points12: Sequence[float], name: str = "f") -> RankFunction:
    """``H(d) = f(clamp(d/2 + 1/2, 0, 1); θ)`` as pieces in ``d``.

    Segment k of f, ``x in [x_k, x_{k+1})``, is ``d in [2 x_k - 1, 2 x_{k+1} - 1)`` with
    ``H = y_k + m_k (d/2 + 1/2 - x_k)``: ``c0 = y_k + m_k (1/2 - x_k)``, ``c1 = m_k / 2``.
    Below ``d = -1`` H is ``f(0)``, from ``d = 1`` on it is 1.
    """
    xs, ys = _split_points(points12)
    m = _slopes(xs, ys)
    f0 = next(ys[k] for k in range(5, -1, -1) if xs[k] <= 0.0)  # right-continuous f(0)
    pieces = [Piece(-_INF, 2.0 * xs[0] - 1.0, f0)]
    for k in range(5):
        if xs[k + 1] > xs[k]:
            pieces.append(Piece(2.0 * xs[k] - 1.0, 2.0 * xs[k + 1] - 1.0,
                                ys[k] + m[k] * (0.5 - xs[k]), m[k] / 2.0))
    pieces.append(Piece(1.0, _INF, 1.0))
    pts = tuple(float(v) for v in points12)
    return RankFunction(
        name=name,
        value=lambda d: piecewise_linear(d / 2.0 + 0.5, pts),
        derivative=lambda d: _pieces_value(pieces, d, derivative=True),
        pieces=tuple(pieces),
    )


def rank_function_step() -> RankFunction:
    """The step ``H(d) = sign(d)/2 + 1/2`` (0, then 1/2 at ``d = 0``, then 1)."""
    pieces = (
        Piece(-_INF, 0.0, 0.0, lo_closed=False, hi_closed=False),
        Piece(0.0, 0.0, 0.5, lo_closed=True, hi_closed=True),
        Piece(0.0, _INF, 1.0, lo_closed=False, hi_closed=False),
    )
    return RankFunction(
        name="step",
        value=lambda d: (torch.sign(d.detach()) / 2.0 + 0.5).to(d.dtype),
        derivative=lambda d: torch.zeros_like(d),
        pieces=pieces,
    )


def _sigmoid_derivative(d: Tensor) -> Tensor:
    s = torch.sigmoid(d)
    return s * (1.0 - s)


def _sqrt_rank_derivative(d: Tensor) -> Tensor:
    x = d / 2.0 + 0.5
    inside = (x > 0) & (x < 1)
    safe = torch.where(inside, x, torch.ones_like(x))
    return torch.where(inside, 0.25 / torch.sqrt(safe), torch.zeros_like(x))


# --------------------------------------------------------------------------------------
# Piecewise-quadratic approximations of sigmoid(d) and sqrt(d/2 + 1/2)
# --------------------------------------------------------------------------------------

HANDCRAFTED_VERSION = 2
"""Version of the handcrafted ranking functions: 2 since ``sigmoid`` and ``sqrt`` are
the piecewise-quadratic approximations below (1: the exact functions). For cache keys."""

HANDCRAFTED_APPROX_ERROR = {"sigmoid": 2e-5, "sqrt": 2e-4}
"""Guaranteed (and tested) bound on ``|H_approx(d) - H_exact(d)|`` over all real d."""

SIGMOID_T = 11.0           # sigmoid: quadratic pieces on [-T, T), constants 0 / 1 outside
SIGMOID_WIDTH = 0.25       # width of each sigmoid piece (88 pieces)
SQRT_RATIO = 0.7           # sqrt: break points x_k = 0.7^k in x = d/2 + 1/2 ...
SQRT_X_MIN = 4e-7          # ... down to the first one below 4e-7 (x_42); [0, x_42] is one chord
SQRT_X_QUADRATIC = 2e-3    # pieces with lower end x >= this are quadratic, below: chords


def _quadratic_through(a: float, b: float, fa: float, fm: float, fb: float) -> tuple[float, float, float]:
    """``(c0, c1, c2)`` of the quadratic in d through ``(a, fa)``, ``((a+b)/2, fm)``, ``(b, fb)``."""
    m = (a + b) / 2.0
    s1 = (fm - fa) / (m - a)
    s2 = ((fb - fm) / (b - m) - s1) / (b - a)
    # fa + s1 (d - a) + s2 (d - a)(d - m), expanded
    return fa - s1 * a + s2 * a * m, s1 - s2 * (a + m), s2


def _chord_through(a: float, b: float, fa: float, fb: float) -> tuple[float, float, float]:
    s1 = (fb - fa) / (b - a)
    return fa - s1 * a, s1, 0.0


def _sigmoid_pieces() -> tuple[Piece, ...]:
    """``sigmoid(d)`` by quadratic interpolation (ends and midpoint of each piece) on
    ``[-11, 11)`` in steps of 1/4, exactly 0 below -11 and 1 from 11 on. The two
    outermost pieces are instead the parabolas from 0 (resp. to 1) with slope 0 at ∓11
    through the inner end's value, so H is continuous and non-decreasing (interpolating
    ``sigmoid(-11) ≈ 1.7e-5`` there would leave a jump, snapping it to 0 a small dip).
    Max error 1.69e-5 (near ∓11; 1.55e-5 inside)."""
    t, w = SIGMOID_T, SIGMOID_WIDTH
    n = int(round(2 * t / w))

    def f(d: float) -> float:
        return 0.0 if d <= -t else 1.0 if d >= t else 1.0 / (1.0 + math.exp(-d))

    pieces = [Piece(-_INF, -t, 0.0)]
    for k in range(n):
        a, b = -t + k * w, -t + (k + 1) * w   # exact: multiples of 1/4
        if k == 0:      # f(b) (d + T)² / w²: flat at -T, so H stays non-decreasing
            e = f(b) / (w * w)
            pieces.append(Piece(a, b, e * t * t, 2.0 * e * t, e))
        elif k == n - 1:  # 1 - (1 - f(a)) (T - d)² / w², flat at T
            e = (1.0 - f(a)) / (w * w)
            pieces.append(Piece(a, b, 1.0 - e * t * t, 2.0 * e * t, -e))
        else:
            pieces.append(Piece(a, b, *_quadratic_through(a, b, f(a), f((a + b) / 2.0), f(b))))
    pieces.append(Piece(t, _INF, 1.0))
    return tuple(pieces)


def _sqrt_pieces() -> tuple[Piece, ...]:
    """``sqrt(d/2 + 1/2)`` on a graded grid towards its singularity at ``d = -1``.

    Break points ``x_k = 0.7^k`` (``d_k = 2 x_k - 1``), k = 0..42 (the first below 4e-7: ``x_42 ≈ 3.1e-7``).
    Pieces with lower end ``x >= 2e-3`` use quadratic interpolation (ends and
    midpoint); the steeper ones below use the chord (linear interpolation), and
    ``[0, x_42]`` is one chord from 0: a quadratic there would need coefficients up to
    ~1e9, and the fast path's rounding grows with them (docs/loss.md, Precision).
    Largest ``|c1| + |c2|``: about 900. 0 below ``d = -1``, 1 from ``d = 1`` on;
    continuous; every derivative finite. Max error 1.75e-4 (near ``x = 2e-3``)."""

    def f(d: float) -> float:
        return math.sqrt(min(max(d / 2.0 + 0.5, 0.0), 1.0))

    xs = [1.0]
    while xs[-1] > SQRT_X_MIN:
        xs.append(xs[-1] * SQRT_RATIO)
    ds = [1.0] + [2.0 * x - 1.0 for x in xs[1:]]          # descending, d_0 = 1
    pieces = [Piece(-_INF, -1.0, 0.0), Piece(-1.0, ds[-1], *_chord_through(-1.0, ds[-1], 0.0, f(ds[-1])))]
    for k in range(len(ds) - 1, 0, -1):
        a, b = ds[k], ds[k - 1]
        if xs[k] >= SQRT_X_QUADRATIC:
            pieces.append(Piece(a, b, *_quadratic_through(a, b, f(a), f((a + b) / 2.0), f(b))))
        else:
            pieces.append(Piece(a, b, *_chord_through(a, b, f(a), f(b))))
    pieces.append(Piece(1.0, _INF, 1.0))
    return tuple(pieces)


def _contiguous_pieces(pieces: Sequence[Piece]) -> Callable[[Tensor, bool], Tensor]:
    """Fast evaluator of pieces ``[lo_k, hi_k)`` that tile the real line in order:
    one ``searchsorted`` and a gather instead of a loop over the pieces. Computes in
    float64 (the expanded coefficients of a steep piece lose digits in float32) and
    returns ``d``'s dtype; autograd gives the containing piece's derivative."""
    inner = [p.lo for p in pieces[1:]]
    assert pieces[0].lo == -_INF and pieces[-1].hi == _INF
    assert all(p.lo_closed and not p.hi_closed for p in pieces)
    assert all(pieces[k].hi == pieces[k + 1].lo for k in range(len(pieces) - 1))
    cache: dict = {}

    def table(device):
        if device not in cache:
            cache[device] = (
                torch.tensor(inner, dtype=torch.float64, device=device),
                torch.tensor([[p.c0, p.c1, p.c2] for p in pieces], dtype=torch.float64, device=device),
            )
        return cache[device]

    def evaluate(d: Tensor, derivative: bool = False) -> Tensor:
        breaks, coef = table(d.device)
        d64 = d.to(torch.float64)
        k = torch.searchsorted(breaks, d64.detach().contiguous(), right=True)
        c = coef[k]                                      # (..., 3)
        if derivative:
            out = c[..., 1] + 2.0 * c[..., 2] * d64
        else:
            out = c[..., 0] + (c[..., 1] + c[..., 2] * d64) * d64
        return out.to(d.dtype)

    return evaluate


@functools.cache
def _approx(form: str) -> tuple[tuple[Piece, ...], Callable]:
    """The pieces of ``form``'s approximation and their evaluator, built once."""
    pieces = _sigmoid_pieces() if form == "sigmoid" else _sqrt_pieces()
    return pieces, _contiguous_pieces(pieces)


def rank_function_handcrafted(form: str, exact: bool = False) -> RankFunction:
    """H of a handcrafted form as a function of ``d`` (SPEC §1 table).

    ``linear``: ``x``; ``square``: ``x²`` (``x = clamp(d/2 + 1/2, 0, 1)``), both exact
    pieces. ``sigmoid``: ``sigmoid(d)``; ``sqrt``: ``sqrt(x)``: by default their
    piecewise-quadratic approximations (``value``, ``derivative`` and ``pieces`` all
    describe the same approximation, within :data:`HANDCRAFTED_APPROX_ERROR` of the
    exact function), so the loss takes the fast path. ``exact=True``: the exact
    functions with ``pieces=None`` (the tiled dense path); no effect on linear/square.
    """
    if form == "linear":
        pieces = (Piece(-_INF, -1.0, 0.0), Piece(-1.0, 1.0, 0.5, 0.5), Piece(1.0, _INF, 1.0))
        return RankFunction("linear", lambda d: _unit(d / 2.0 + 0.5),
                            lambda d: _pieces_value(pieces, d, derivative=True), pieces)
    if form == "square":
        # ((d + 1) / 2)² = 1/4 + d/2 + d²/4 on [-1, 1)
        pieces = (Piece(-_INF, -1.0, 0.0), Piece(-1.0, 1.0, 0.25, 0.5, 0.25), Piece(1.0, _INF, 1.0))
        return RankFunction("square", lambda d: _unit(d / 2.0 + 0.5) ** 2,
                            lambda d: _pieces_value(pieces, d, derivative=True), pieces)
    if form in ("sigmoid", "sqrt") and not exact:
        pieces, evaluate = _approx(form)
        return RankFunction(f"{form} (piecewise quadratic)", lambda d: evaluate(d),
                            lambda d: evaluate(d, derivative=True), pieces)
    if form == "sigmoid":
        return RankFunction("sigmoid", torch.sigmoid, _sigmoid_derivative, None)
    if form == "sqrt":
        return RankFunction("sqrt", lambda d: _safe_sqrt(_unit(d / 2.0 + 0.5)),
                            _sqrt_rank_derivative, None)
    raise ValueError(f"form must be one of {HANDCRAFTED}, got {form!r}")
