"""A loss spec: which substitute functions the Parameterized AP Loss uses (SPEC §1–2).

A :class:`LossSpec` is a small immutable value: a ``form``, the control points of
the searched functions and a gradient scale. It converts from and to the search's
θ vector (SPEC §2–3: 5 × 8 control-point numbers + 1 gradient-scale number, all in
[0, 1]) and to and from JSON exactly.

Control points are 12 numbers ``(x0, y0, x1, y1, ..., x5, y5)``: ``(x0, y0) = (0, 0)``,
``(x5, y5) = (1, 1)``, x and y non-decreasing. θ builds them cumulatively::

    p_1 = θ_1,    p_k = θ_k (1 - p_{k-1}) + p_{k-1}    (coordinate-wise, k = 2..4)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from paploss import functions as F

__all__ = [
    "FORMS",
    "FUNCTIONS",
    "IDENTITY_THETA8",
    "LossSpec",
    "theta_to_points",
    "points_to_theta",
    "grad_scale_from_theta",
    "theta_from_grad_scale",
    "validate_points",
    "form_theta",
]

FUNCTIONS = ("H2", "I2", "I3", "I1", "H1")  # SPEC order of the five searched functions
FORMS = ("searched", "shared", "sigmoid", "sqrt", "linear", "square")
HANDCRAFTED_FORMS = ("sigmoid", "sqrt", "linear", "square")
IDENTITY_THETA8 = (0.2, 0.2, 0.25, 0.25, 1 / 3, 1 / 3, 0.5, 0.5)


def _as_floats(values: Any, what: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"{what} must be a sequence of numbers, got {values!r}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool):
            raise ValueError(f"{what}[{i}] must be a number, got {v!r}")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what}[{i}] must be a number, got {v!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"{what}[{i}] must be finite, got {f!r}")
        out.append(f)
    return tuple(out)


def _check_theta(theta: Any, what: str, lengths: Sequence[int]) -> tuple[float, ...]:
    t = _as_floats(theta, what)
    if len(t) not in lengths:
        raise ValueError(f"{what} must have {' or '.join(map(str, lengths))} numbers, got {len(t)}")
    for i, v in enumerate(t):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{what}[{i}] must be in [0, 1], got {v!r}")
    return t


def theta_to_points(theta8: Sequence[float]) -> tuple[float, ...]:
    """8 θ numbers in [0, 1] -> 12 control-point numbers (SPEC §2, cumulative).

    ``theta8 = (a1, b1, ..., a4, b4)``; returns ``(0, 0, x1, y1, ..., x4, y4, 1, 1)``
    with ``x_k = a_k (1 - x_{k-1}) + x_{k-1}`` (and the same for y), so x and y never
    decrease. :data:`IDENTITY_THETA8` gives the identity function.
    """
    t = _check_theta(theta8, "theta8", (8,))
    px, py = 0.0, 0.0
    out = [0.0, 0.0]
    for k in range(4):
        px = t[2 * k] * (1.0 - px) + px
        py = t[2 * k + 1] * (1.0 - py) + py
        out += [px, py]
    return tuple(out + [1.0, 1.0])


def points_to_theta(points12: Sequence[float]) -> tuple[float, ...]:
    """Inverse of :func:`theta_to_points`: ``θ_k = (p_k - p_{k-1}) / (1 - p_{k-1})``.

    Where ``1 - p_{k-1} == 0`` (every later point is at 1) θ_k is not determined;
    0 is returned there. Results are clamped to [0, 1] against rounding.
    """
    p = validate_points(points12, "points12")
    out = []
    for c in (0, 1):  # x then y, interleaved below
        prev = 0.0
        col = []
        for k in range(1, 5):
            cur = p[2 * k + c]
            col.append(0.0 if 1.0 - prev == 0.0 else min(1.0, max(0.0, (cur - prev) / (1.0 - prev))))
            prev = cur
        out.append(col)
    return tuple(v for pair in zip(out[0], out[1]) for v in pair)


def form_theta(form: str, functions: int = 5, grad_scale: bool = True) -> list[float]:
    """The search's θ for the piecewise-linear version of a handcrafted form: each of
    ``functions`` functions through (x, f(x)) at x = 0.2, 0.4, 0.6, 0.8 (the identity's
    x positions), f the form's quality function (``paploss.functions.handcrafted_function``),
    then θ_g = 0.5 (gradient scale 1) when ``grad_scale``. Only forms with f(0) = 0 and
    f(1) = 1 have one: linear, square, sqrt (not sigmoid).

    ``form_theta("linear")`` is the search's starting mean; the distance of a search's
    μ to ``form_theta("square")`` says how far it went towards ``square``."""
    if isinstance(functions, bool) or not isinstance(functions, int) or functions < 1:
        raise ValueError(f"functions must be a positive int, got {functions!r}")
    xs = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    ys = F.handcrafted_function(form, "I1")(torch.tensor(xs, dtype=torch.float64)).tolist()
    if (ys[0], ys[-1]) != (0.0, 1.0):
        raise ValueError(f"form {form!r} does not go through (0, 0) and (1, 1): no searched function is it")
    points = [v for xy in zip(xs, ys) for v in xy]
    return list(points_to_theta(points)) * functions + [0.5] * bool(grad_scale)


def grad_scale_from_theta(t: float) -> float:
    """Gradient scale ``g = 10^(2 t - 1)`` in [0.1, 10] for ``t`` in [0, 1] (SPEC §2)."""
    (t,) = _check_theta((t,), "grad-scale theta", (1,))
    return 10.0 ** (2.0 * t - 1.0)


def theta_from_grad_scale(g: float) -> float:
    """Inverse of :func:`grad_scale_from_theta`: ``t = (log10 g + 1) / 2``, clamped to [0, 1]."""
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
        raise ValueError(f"grad_scale must be a finite number > 0, got {g!r}")
    return min(1.0, max(0.0, (math.log10(g) + 1.0) / 2.0))


def validate_points(points12: Any, what: str = "points") -> tuple[float, ...]:
    """Check 12 control-point numbers; return them as a tuple of floats.

    Raises ``ValueError`` naming ``what`` when they are not 12 finite numbers in
    [0, 1], do not start at (0, 0) or end at (1, 1), or decrease in x or y.
    """
    p = _as_floats(points12, what)
    if len(p) != 12:
        raise ValueError(f"{what} must be 12 numbers (x0, y0, ..., x5, y5), got {len(p)}: {p!r}")
    for i, v in enumerate(p):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{what}[{i}] must be in [0, 1], got {v!r}")
    if p[0] != 0.0 or p[1] != 0.0:
        raise ValueError(f"{what} must start at (0, 0), got ({p[0]!r}, {p[1]!r})")
    if p[10] != 1.0 or p[11] != 1.0:
        raise ValueError(f"{what} must end at (1, 1), got ({p[10]!r}, {p[11]!r})")
    for k in range(1, 6):
        for c, axis in ((0, "x"), (1, "y")):
            if p[2 * k + c] < p[2 * (k - 1) + c]:
                raise ValueError(
                    f"{what} must not decrease: {axis}{k} = {p[2 * k + c]!r} < {axis}{k - 1} = {p[2 * (k - 1) + c]!r}"
                )
    return p


@dataclass(frozen=True)
class LossSpec:
    """Which functions the Parameterized AP Loss uses (SPEC §1 forms table).

    Attributes:
        form: ``"searched"`` (separate functions), ``"shared"`` (one function for all
            five places) or a handcrafted form ``"sigmoid" | "sqrt" | "linear" | "square"``.
        points: control points, 12 numbers each: searched: 4 or 5 functions in the
            order H2, I2, I3, I1[, H1] (4: H1 is the step ``sign(d)/2 + 1/2``);
            shared: 1; handcrafted: none.
        grad_scale: g, multiplies the gradient reaching the box-regression outputs
            (:func:`paploss.loss.scale_grad`); the paper searches it in [0.1, 10].
    """

    form: str
    points: tuple[tuple[float, ...], ...] = field(default=())
    grad_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        pts = self.points
        if isinstance(pts, (str, bytes)) or not hasattr(pts, "__len__"):
            raise ValueError(f"points must be a sequence of 12-number sequences, got {pts!r}")
        expected = {"searched": (4, 5), "shared": (1,)}.get(self.form, (0,))
        if len(pts) not in expected:
            raise ValueError(
                f"points of a {self.form!r} spec must hold {' or '.join(map(str, expected))} functions, got {len(pts)}"
            )
        names = FUNCTIONS if self.form == "searched" else ("shared",)
        object.__setattr__(
            self, "points", tuple(validate_points(p, f"points[{i}] ({names[i]})") for i, p in enumerate(pts))
        )
        g = self.grad_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
            raise ValueError(f"grad_scale must be a finite number > 0, got {g!r}")
        object.__setattr__(self, "grad_scale", float(g))

    # ---------------------------------------------------------------- constructors
    @classmethod
    def searched(cls, points: Sequence[Sequence[float]], grad_scale: float = 1.0) -> "LossSpec":
        """4 or 5 functions × 12 control-point numbers, order H2, I2, I3, I1[, H1]."""
        return cls("searched", tuple(tuple(p) if hasattr(p, "__iter__") else p for p in points), grad_scale)

    @classmethod
    def shared(cls, points12: Sequence[float], grad_scale: float = 1.0) -> "LossSpec":
        """One set of 12 control-point numbers for all five places."""
        return cls("shared", (tuple(points12) if hasattr(points12, "__iter__") else points12,), grad_scale)

    @classmethod
    def handcrafted(cls, name: str) -> "LossSpec":
        """``"sigmoid" | "sqrt" | "linear" | "square"`` (SPEC §1 table)."""
        if name not in HANDCRAFTED_FORMS:
            raise ValueError(f"name must be one of {HANDCRAFTED_FORMS}, got {name!r}")
        return cls(name)

    @classmethod
    def from_theta(cls, theta: Sequence[float]) -> "LossSpec":
        """A spec from the search's θ (all numbers in [0, 1]).

        Lengths: 41 = 5 × 8 control-point θ (H2, I2, I3, I1, H1) + 1 gradient-scale θ;
        40 = 5 × 8 (g = 1); 33 / 32 = 4 functions (H1 is the step) with / without g;
        9 / 8 = one shared function with / without g.
        """
        t = _check_theta(theta, "theta", (41, 40, 33, 32, 9, 8))
        n_fun = {41: 5, 40: 5, 33: 4, 32: 4, 9: 1, 8: 1}[len(t)]
        g = grad_scale_from_theta(t[8 * n_fun]) if len(t) % 8 == 1 else 1.0
        pts = tuple(theta_to_points(t[8 * k: 8 * k + 8]) for k in range(n_fun))
        return cls("shared" if n_fun == 1 else "searched", pts, g)

    def to_theta(self) -> tuple[float, ...]:
        """The θ this spec comes from (inverse of :meth:`from_theta`, with g): 41, 33 or 9 numbers."""
        if self.form not in ("searched", "shared"):
            raise ValueError(f"a {self.form!r} spec has no θ (only 'searched' and 'shared' do)")
        return tuple(v for p in self.points for v in points_to_theta(p)) + (theta_from_grad_scale(self.grad_scale),)

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"form": self.form, "points": [list(p) for p in self.points], "grad_scale": self.grad_scale}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LossSpec":
        if not isinstance(d, Mapping):
            raise ValueError(f"a loss spec must be a JSON object / mapping, got {type(d).__name__}: {d!r}")
        unknown = set(d) - {"form", "points", "grad_scale"}
        if unknown:
            raise ValueError(f"unknown field(s) in loss spec: {sorted(unknown)} (known: form, points, grad_scale)")
        if "form" not in d:
            raise ValueError("loss spec field 'form' is missing")
        points = d.get("points", [])
        if not isinstance(points, (list, tuple)):
            raise ValueError(f"loss spec field 'points' must be a list of 12-number lists, got {points!r}")
        for i, p in enumerate(points):
            if not isinstance(p, (list, tuple)):
                raise ValueError(f"loss spec field 'points[{i}]' must be a list of 12 numbers, got {p!r}")
        try:
            return cls(d["form"], tuple(tuple(p) for p in points), d.get("grad_scale", 1.0))
        except ValueError as exc:
            raise ValueError(f"loss spec field {exc}") from None

    def to_json(self) -> str:
        """JSON text; ``LossSpec.from_json(spec.to_json()) == spec`` exactly (floats use repr)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> "LossSpec":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"loss spec is not valid JSON: {exc}") from None
        return cls.from_dict(d)

    # ---------------------------------------------------------------- the functions
    def points_of(self, name: str) -> tuple[float, ...] | None:
        """Control points of the function at place ``name``; None for handcrafted forms and the step."""
        _check_place(name)
        if self.form == "shared":
            return self.points[0]
        if self.form == "searched":
            k = FUNCTIONS.index(name)
            return self.points[k] if k < len(self.points) else None
        return None

    def function(self, name: str) -> Callable:
        """The function at place ``name`` (H2, I2, I3, I1, H1) on its natural argument.

        H places take ``x = d/2 + 1/2`` (``d = s_j - s_i``), I places take the quality
        ``u``; both in [0, 1] for plots. Returns a callable on tensors.
        """
        _check_place(name)
        pts = self.points_of(name)
        if pts is not None:
            return lambda x: F.piecewise_linear(x, pts)
        if self.form == "searched":  # 4 functions: H1 is the step
            return F.step_function
        return F.handcrafted_function(self.form, name)

    def rank_function(self, name: str, exact: bool = False):
        """The ranking function at ``H2`` or ``H1`` as a :class:`paploss.functions.RankFunction` of ``d``.

        ``exact``: the exact ``sigmoid``/``sqrt`` (dense path) instead of their
        piecewise-quadratic approximations; no effect on other forms."""
        if name not in ("H1", "H2"):
            raise ValueError(f"name must be 'H1' or 'H2' for a ranking function, got {name!r}")
        pts = self.points_of(name)
        if pts is not None:
            return F.rank_function_piecewise_linear(pts, name=f"{self.form} {name}")
        if self.form == "searched":
            return F.rank_function_step()
        return F.rank_function_handcrafted(self.form, exact=exact)


def _check_place(name: str) -> None:
    if name not in FUNCTIONS:
        raise ValueError(f"name must be one of {FUNCTIONS}, got {name!r}")
