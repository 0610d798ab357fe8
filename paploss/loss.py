"""The Parameterized AP Loss (SPEC §1), computed exactly in O((N + P) log(N + P)).

Notation (all 1-D after flattening the batch):

* ``s`` (N,) scores (logits), ``t`` (N,) targets in {-1, 0, 1}, ``u`` (N,) qualities;
* P: the positives (``t = 1``), J: the ranked set, the valid entries (``t != -1``),
  cut to the ``top_k`` highest scores when there are more;
* ``d_ji = s_j - s_i``, ``x_ji = clamp(d_ji / 2 + 1/2, 0, 1)``.

The loss, per positive ``i`` (SPEC §1)::

    num_i  = sum_{j in J} H2(x_ji) (1 - I2(u_j))      (u_j = 0 unless j is a positive)
    den_i  = sum_{j in J} H1(x_ji)                     (detached: no gradient)
    loss_i = (1 - I1(u_i)) + I3(u_i) num_i / den_i
    loss   = sum_{i in P} loss_i / (|P| + 1e-8)

How it is computed. Write ``w_j = 1 - I2(u_j)`` and ``w0 = 1 - I2(0)`` (the weight of
every non-positive). Then ``num_i = w0 K(s_i; J) + K(s_i; P∩J, I2(0) - I2(u_p))`` with
the *rank sum* ``K(s_i; A, v) = sum_{j in A} v_j H(s_j - s_i)``. For every form H is
a polynomial of degree ≤ 2 on each of a few intervals of ``d``
(:class:`paploss.functions.Piece`): exactly so for the searched functions, ``linear``,
``square`` and the step; for ``sigmoid`` and ``sqrt`` H *is* a piecewise-quadratic
approximation of the SPEC's function (90 and 45 pieces, max error 2e-5 and 2e-4:
``paploss.functions.HANDCRAFTED_APPROX_ERROR``). So for every ``i`` and piece ``[lo, hi)``::

    sum_{j: s_j - s_i in [lo, hi)} v_j (c0 + c1 (s_j - s_i) + c2 (s_j - s_i)²)
        = c0 V0 + c1 (V1 - s_i V0) + c2 (V2 - 2 s_i V1 + s_i² V0)

where ``V_m`` are differences of prefix sums of ``v s^m`` over the sorted scores,
between the two positions that ``searchsorted`` finds for ``s_i + lo`` and
``s_i + hi``. That is one sort, O(N) prefix sums (float64) and O(P · pieces)
look-ups, done for all pieces at once as (pieces × P) tensors (in chunks of at most
2^21 elements), not in a Python loop over the pieces. The backward pass
(``_PiecewiseRankSum.backward``) is the same structure turned around: each
(positive, piece) adds a polynomial in ``s_j`` over an index range of the sorted
entries; difference arrays and one cumulative sum per power of ``s_j`` give all N
gradients at once.

The exact ``sigmoid`` and ``sqrt`` (``pap_loss(..., exact=True)``, or any
:class:`paploss.functions.RankFunction` with ``pieces=None``) are not piecewise
polynomial: they use ``_DenseRankSum``, which tiles the N×P pairs so that extra memory
stays around 100 MB (a few float64 tiles of 2^21 pairs, plus O(N) gradient buffers)
whatever N and P; measured 83 MB at N = 100k, P = 1000 (BENCHMARKS.md). The tests also
use it as the twin of the fast path over the same approximated pieces.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from paploss.functions import RankFunction
from paploss.spec import LossSpec

__all__ = ["pap_loss", "scale_grad", "rank_sum", "DEFAULT_TOP_K"]

DEFAULT_TOP_K = 100_000
_TILE_ELEMENTS = 1 << 21  # pairs per tile of the dense path (float64: 16 MB per temporary)


# --------------------------------------------------------------------------------------
# Gradient scale
# --------------------------------------------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, g: float) -> Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.g, None


def scale_grad(x: Tensor, g: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``g`` in the backward pass.

    SPEC §2: the gradient reaching the box-regression outputs is scaled by the
    spec's ``grad_scale``. ``x`` any shape; returns a tensor equal to ``x``.
    """
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
        raise ValueError(f"g must be a finite number, got {g!r}")
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    return _ScaleGrad.apply(x, float(g))


# --------------------------------------------------------------------------------------
# Fast exact rank sums for piecewise-polynomial H
# --------------------------------------------------------------------------------------


def _round_to(b: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """Bounds ``b`` (float64) rounded to ``dtype`` towards +inf (``up``) or -inf.

    For ``s`` of that dtype, ``s < b  <=>  s < round_up(b)`` and ``s <= b  <=>  s <= round_down(b)``:
    the search then runs in the scores' own dtype (no float64 copy of all N scores)
    and still compares exactly as in float64.
    """
    if dtype == torch.float64:
        return b
    r = b.to(dtype)
    back = r.to(torch.float64)
    if up:
        return torch.where(back < b, torch.nextafter(r, r.new_full((), math.inf)), r)
    return torch.where(back > b, torch.nextafter(r, r.new_full((), -math.inf)), r)


def _bound_indices(s: Tensor, q64: Tensor, keys, cache: dict) -> None:
    """Fill ``cache[(bound, side)]`` with the index in sorted ``s`` (M,) of ``q + bound``
    (P,) for every key not yet there: ``#{s_j < q + bound}`` for side ``left``,
    ``#{s_j <= q + bound}`` for ``right``; int64 (P,). One ``searchsorted`` per side
    for all the finite bounds at once."""
    todo: dict[str, list[float]] = {"left": [], "right": []}
    for key in dict.fromkeys(keys):
        if key in cache:
            continue
        bound, side = key
        if bound == -math.inf:
            cache[key] = torch.zeros(q64.shape, dtype=torch.long, device=q64.device)
        elif bound == math.inf:
            cache[key] = torch.full(q64.shape, s.numel(), dtype=torch.long, device=q64.device)
        else:
            todo[side].append(bound)
    for side, bounds in todo.items():
        if not bounds:
            continue
        bt = torch.tensor(bounds, dtype=torch.float64, device=q64.device)
        b = _round_to(q64[None, :] + bt[:, None], s.dtype, up=(side == "left"))   # (B, P)
        idx = torch.searchsorted(s, b.reshape(-1), side=side).view(len(bounds), -1)
        for k, bound in enumerate(bounds):
            cache[(bound, side)] = idx[k]


def _piece_ranges(s: Tensor, q64: Tensor, pieces, cache: dict) -> tuple[Tensor, Tensor]:
    """Index ranges ``[a, b)`` (K, P) of the sorted entries with ``s_j - q_i`` inside
    each of the K pieces."""
    lo_keys = [(p.lo, "left" if p.lo_closed else "right") for p in pieces]
    hi_keys = [(p.hi, "right" if p.hi_closed else "left") for p in pieces]
    _bound_indices(s, q64, lo_keys + hi_keys, cache)
    a = torch.stack([cache[k] for k in lo_keys])
    b = torch.stack([cache[k] for k in hi_keys])
    return a, torch.maximum(a, b)


def _coefficients(pieces, device) -> Tensor:
    """``(c0, c1, c2)`` of each piece, float64 (K, 3)."""
    return torch.tensor([[p.c0, p.c1, p.c2] for p in pieces], dtype=torch.float64, device=device)


def _piece_chunks(k: int, p: int):
    """Slices of the K pieces such that a chunk's (pieces × P) temporaries stay within
    ``_TILE_ELEMENTS`` (one chunk unless P is large and H has many pieces)."""
    step = max(1, _TILE_ELEMENTS // max(1, p))
    for k0 in range(0, k, step):
        yield slice(k0, min(k, k0 + step))


def _prefix(v: Tensor) -> Tensor:
    """``[0, v_0, v_0 + v_1, ...]`` (M + 1,) accumulated in float64."""
    out = torch.empty(v.numel() + 1, dtype=torch.float64, device=v.device)
    out[0] = 0.0
    torch.cumsum(v, 0, dtype=torch.float64, out=out[1:])
    return out


class _Prefix:
    """Lazily built prefix sums of ``v s^m`` (float64) over the sorted scores."""

    def __init__(self, s: Tensor, v: Tensor | None):
        self.s, self.v, self._cache = s, v, {}

    def __call__(self, m: int) -> Tensor | None:
        if m == 0 and self.v is None:
            return None  # counts: b - a
        if m not in self._cache:
            if m == 0:
                x = self.v
            else:
                x = self.s.to(torch.float64) if m == 2 or self.v is not None else self.s
                if m == 2:
                    x = x * x
                if self.v is not None:
                    x = x * self.v.to(torch.float64)
            self._cache[m] = _prefix(x)
        return self._cache[m]


def _piecewise_sums(s: Tensor, q64: Tensor, pieces, prefix: _Prefix, cache: dict):
    """Forward sums for one H: ``out_i = sum_j v_j H(s_j - q_i)`` and
    ``dout_i = sum_j v_j H'(s_j - q_i)``, plus each piece's index range (K, P).
    float64 (P,). All pieces at once (in chunks of bounded size), no loop over them."""
    starts, ends = _piece_ranges(s, q64, pieces, cache)
    coef = _coefficients(pieces, q64.device)
    out = torch.zeros_like(q64)
    dout = torch.zeros_like(q64)
    q = q64[None, :]
    for ks in _piece_chunks(len(pieces), q64.numel()):
        a, b = starts[ks], ends[ks]
        c0, c1, c2 = (coef[ks, r, None] for r in range(3))   # (k, 1)
        pre0 = prefix(0)
        n0 = (b - a).to(torch.float64) if pre0 is None else pre0[b] - pre0[a]
        val = c0 * n0
        chunk = pieces[ks]
        if any(p.c1 != 0.0 or p.c2 != 0.0 for p in chunk):
            pre1 = prefix(1)
            n1 = pre1[b] - pre1[a]
            lin = n1 - q * n0                                  # sum v (s_j - q_i)
            val = val + c1 * lin
            dpart = c1 * n0
            if any(p.c2 != 0.0 for p in chunk):
                pre2 = prefix(2)
                n2 = pre2[b] - pre2[a]
                val = val + c2 * (n2 - 2.0 * q * n1 + q * q * n0)
                dpart = dpart + 2.0 * c2 * lin
            dout = dout + dpart.sum(0)
        out = out + val.sum(0)
    return out, dout, starts, ends


class _PiecewiseRankSum(torch.autograd.Function):
    """``out_i = sum_j v_j H(s_j - q_i)`` for a piecewise-polynomial H, exactly.

    Inputs: ``q`` (P,) reference scores, ``s`` (M,) scores sorted ascending, ``v``
    (M,) weights or ``None`` (all ones), ``pieces`` of H, and optionally
    ``den_pieces`` of a second function summed with weights 1 over the same sorted
    scores and prefix sums (no gradient; the loss's H1 denominator).
    Outputs (P,) and (P,) (zeros without ``den_pieces``), dtype of ``q``.
    Time O((M + P · pieces) log M), memory O(M + P · pieces); sums in float64.
    """

    @staticmethod
    def forward(ctx, q, s, v, pieces, den_pieces):
        q64 = q.detach().to(torch.float64)
        sd = s.detach()
        prefix = _Prefix(sd, None if v is None else v.detach())
        cache: dict = {}
        out, dout, starts, ends = _piecewise_sums(sd, q64, pieces, prefix, cache)
        if den_pieces is not None:
            if v is not None:
                raise ValueError("den_pieces needs unit weights (v is None)")
            den = _piecewise_sums(sd, q64, den_pieces, prefix, cache)[0].to(q.dtype)
        else:
            den = q.new_zeros(q.shape)
        ctx.mark_non_differentiable(den)
        ctx.pieces = pieces
        ctx.has_v = v is not None
        ctx.save_for_backward(s, v if v is not None else s.new_empty(0), q64, dout, starts, ends)
        return out.to(q.dtype), den

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_den):
        s, v, q64, dout, starts, ends = ctx.saved_tensors
        g_all = grad_out.to(torch.float64)                   # (P,)
        need_q, need_s, need_v = ctx.needs_input_grad[:3]
        need_v = need_v and ctx.has_v
        grad_q = grad_s = grad_v = None
        if need_q:
            grad_q = (-g_all * dout).to(grad_out.dtype)
        if not (need_s or need_v):
            return grad_q, None, None, None, None
        m = s.numel()
        # Each (positive i, piece) covering the sorted entries [a, b) adds
        #   g_i (c0 + c1 (s_j - q_i) + c2 (s_j - q_i)^2) = C0 + C1 s_j + C2 s_j^2
        # to dH/dv_j, and g_i (c1 + 2 c2 (s_j - q_i)) = C1 + 2 C2 s_j to dH/ds_j (times v_j).
        # Difference arrays over the index ranges, then one cumulative sum per power.
        rows = {}

        def add(r: int, coeff: Tensor, a: Tensor, b: Tensor) -> None:
            if r not in rows:
                rows[r] = torch.zeros(m + 1, dtype=torch.float64, device=s.device)
            rows[r].index_add_(0, a, coeff)
            rows[r].index_add_(0, b, -coeff)

        pieces = ctx.pieces
        table = _coefficients(pieces, s.device)
        q = q64[None, :]
        for ks in _piece_chunks(len(pieces), q64.numel()):
            a, b = starts[ks].reshape(-1), ends[ks].reshape(-1)
            chunk = pieces[ks]
            c0, c1, c2 = (table[ks, r, None] for r in range(3))      # (k, 1)
            # an empty range adds nothing; skipping it keeps a steep piece's huge
            # coefficient from leaving rounding residue in the cumulative sums
            g = g_all[None, :] * (ends[ks] > starts[ks])                # (k, P)
            if need_v and any(p.c0 != 0.0 or p.c1 != 0.0 or p.c2 != 0.0 for p in chunk):
                add(0, (g * (c0 - c1 * q + c2 * q * q)).reshape(-1), a, b)
            if any(p.c1 != 0.0 or p.c2 != 0.0 for p in chunk):
                add(1, (g * (c1 - 2.0 * c2 * q)).reshape(-1), a, b)
            if any(p.c2 != 0.0 for p in chunk):
                add(2, (g * c2).reshape(-1), a, b)
        coef = {r: x.cumsum_(0)[:m] for r, x in rows.items()}
        s64 = s.detach().to(torch.float64) if (2 in coef or need_v) else None
        v64 = v.detach().to(torch.float64) if ctx.has_v else None
        if need_s:
            ds = coef.get(1)
            if ds is None:
                ds = torch.zeros(m, dtype=torch.float64, device=s.device)
            if 2 in coef:
                ds = ds + 2.0 * coef[2] * s64
            if v64 is not None:
                ds = ds * v64
            grad_s = ds.to(s.dtype)
        if need_v:
            dv = coef.get(0)
            if dv is None:
                dv = torch.zeros(m, dtype=torch.float64, device=s.device)
            if 1 in coef:
                dv = dv + coef[1] * s64
            if 2 in coef:
                dv = dv + coef[2] * s64 * s64
            grad_v = dv.to(v.dtype)
        return grad_q, grad_s, grad_v, None, None


# --------------------------------------------------------------------------------------
# Dense tiled rank sums for any H (exact sigmoid, sqrt)
# --------------------------------------------------------------------------------------


def _tiles(m: int, p: int):
    """Yield (j0, j1, i0, i1) tiles covering M×P with at most _TILE_ELEMENTS pairs."""
    cols = max(1, min(p, _TILE_ELEMENTS))
    rows = max(1, _TILE_ELEMENTS // cols)
    for i0 in range(0, p, cols):
        for j0 in range(0, m, rows):
            yield j0, min(m, j0 + rows), i0, min(p, i0 + cols)


class _DenseRankSum(torch.autograd.Function):
    """``out_i = sum_j v_j H(s_j - q_i)`` by tiles of the M×P pair matrix (any H).

    Time O(M P), extra memory O(tile) (a few × 16 MB). Same inputs as
    :class:`_PiecewiseRankSum`, but ``s`` need not be sorted; ``h`` a RankFunction.
    """

    @staticmethod
    def forward(ctx, q: Tensor, s: Tensor, v: Tensor | None, h: RankFunction) -> Tensor:
        q64, s64 = q.detach().to(torch.float64), s.detach().to(torch.float64)
        v64 = None if v is None else v.detach().to(torch.float64)
        out = torch.zeros_like(q64)
        for j0, j1, i0, i1 in _tiles(s64.numel(), q64.numel()):
            d = s64[j0:j1, None] - q64[None, i0:i1]          # (rows, cols)
            hv = h.value(d)
            if v64 is not None:
                hv = hv * v64[j0:j1, None]
            out[i0:i1] += hv.sum(0)
        ctx.h = h
        ctx.has_v = v is not None
        ctx.save_for_backward(q, s, v if v is not None else s.new_empty(0))
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, s, v = ctx.saved_tensors
        h = ctx.h
        q64, s64 = q.detach().to(torch.float64), s.detach().to(torch.float64)
        g = grad_out.to(torch.float64)
        v64 = v.detach().to(torch.float64) if ctx.has_v else None
        need_q, need_s, need_v = ctx.needs_input_grad[:3]
        need_v = need_v and ctx.has_v
        gq = torch.zeros_like(q64)
        gs = torch.zeros_like(s64)
        gv = torch.zeros_like(s64) if need_v else None
        for j0, j1, i0, i1 in _tiles(s64.numel(), q64.numel()):
            d = s64[j0:j1, None] - q64[None, i0:i1]
            gi = g[None, i0:i1]
            if need_q or need_s:
                dh = h.derivative(d)
                vj = v64[j0:j1, None] if v64 is not None else 1.0
                if need_q:
                    gq[i0:i1] -= (dh * vj).sum(0) * g[i0:i1]
                if need_s:
                    gs[j0:j1] += (dh * gi).sum(1) * (v64[j0:j1] if v64 is not None else 1.0)
            if need_v:
                gv[j0:j1] += (h.value(d) * gi).sum(1)
        return (
            gq.to(q.dtype) if need_q else None,
            gs.to(s.dtype) if need_s else None,
            gv.to(v.dtype) if need_v else None,
            None,
        )


def rank_sum(q: Tensor, s_sorted: Tensor, h: RankFunction, weights: Tensor | None = None) -> Tensor:
    """``out_i = sum_j weights_j H(s_j - q_i)``, differentiable in q, s and weights.

    Args:
        q: (P,) reference scores.
        s_sorted: (M,) scores sorted ascending (required by the fast path).
        h: the ranking function; its ``pieces`` select the exact O((M + P) log M)
            path, ``None`` pieces the tiled dense path.
        weights: (M,) or ``None`` (all ones).

    Returns:
        (P,) in the dtype of ``q``.
    """
    if h.pieces is not None:
        return _PiecewiseRankSum.apply(q, s_sorted, weights, h.pieces, None)[0]
    return _DenseRankSum.apply(q, s_sorted, weights, h)


def _rank_sums_num_den(q: Tensor, s_sorted: Tensor, h_num: RankFunction, h_den: RankFunction):
    """``(sum_j H_num(s_j - q_i), sum_j H_den(s_j - q_i))`` with unit weights; the second
    without gradient. Shares the sort's prefix sums when both are piecewise."""
    if h_num.pieces is not None and h_den.pieces is not None:
        num, den = _PiecewiseRankSum.apply(q, s_sorted, None, h_num.pieces, h_den.pieces)
        return num, den
    num = rank_sum(q, s_sorted, h_num)
    with torch.no_grad():
        den = rank_sum(q.detach(), s_sorted.detach(), h_den)
    return num, den


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


def _first_bad(x: Tensor, bad: Tensor) -> float:
    return x.detach().reshape(-1)[bad.reshape(-1)][0].item()


def _check_inputs(logits, targets, qualities, spec, top_k) -> None:
    for name, x in (("logits", logits), ("targets", targets), ("qualities", qualities)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the shape of logits {tuple(logits.shape)}, got {tuple(targets.shape)}")
    if qualities.shape != logits.shape:
        raise ValueError(
            f"qualities must have the shape of logits {tuple(logits.shape)}, got {tuple(qualities.shape)}"
        )
    if not torch.is_floating_point(logits):
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if not torch.is_floating_point(qualities):
        raise ValueError(f"qualities must be a floating-point tensor, got dtype {qualities.dtype}")
    if targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be an integer or floating tensor with values -1, 0, 1, got dtype {targets.dtype}")
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be a paploss.LossSpec, got {type(spec).__name__}: {spec!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if logits.numel() == 0:
        return
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"logits must be finite, found {_first_bad(logits, ~torch.isfinite(logits))}")
    if not bool(torch.isfinite(qualities).all()):
        raise ValueError(f"qualities must be finite, found {_first_bad(qualities, ~torch.isfinite(qualities))}")
    lo, hi = torch.aminmax(targets.detach())
    if lo < -1 or hi > 1 or (torch.is_floating_point(targets) and not bool((targets == targets.round()).all())):
        ok = (targets == 1) | (targets == 0) | (targets == -1)
        raise ValueError(f"targets must hold only -1 (ignore), 0 and 1, found {_first_bad(targets, ~ok)}")


def pap_loss(
    logits: Tensor,
    targets: Tensor,
    qualities: Tensor,
    spec: LossSpec,
    top_k: int | None = DEFAULT_TOP_K,
    *,
    exact: bool = False,
    detach_i3: bool = False,
) -> Tensor:
    """The Parameterized AP Loss of SPEC §1 over a whole batch.

    Args:
        logits: scores ``s``, any shape (N entries in all), floating point.
        targets: same shape, values in {-1 (ignored), 0, 1 (positive)}, any real dtype.
        qualities: same shape, localisation quality ``u`` in [0, 1]; read only where
            ``targets == 1`` (elsewhere ``u = 0``). Gradients flow into it.
        spec: the :class:`paploss.spec.LossSpec` giving H2, I2, I3, I1, H1.
        top_k: rank only the ``top_k`` valid entries with the highest scores (J);
            every positive still has its own term ``loss_i``. ``None``: rank all
            valid entries.
        exact: for the ``sigmoid`` and ``sqrt`` forms, rank with the exact functions
            through the tiled dense path (O(N·P) time) instead
            of their piecewise-quadratic approximations (within
            ``paploss.functions.HANDCRAFTED_APPROX_ERROR``) on the fast path. No
            effect on other forms, whose pieces are exact.
        detach_i3: no gradient into ``u_i`` through the ranking term's weight
            ``I3(u_i)`` (not SPEC §1, which passes it; off by default). Through it a
            loss whose ``I3`` rises faster than ``I1`` (times the ranking ratio) is
            lowered by worse boxes and trains them worse
            (docs/research/search-quality.md); without it no gradient makes ``u`` smaller.

    Returns:
        0-dim tensor, dtype and device of ``logits``; ``0 * (sum of inputs)``
        (still connected to the graph) when there is no positive.

    A positive whose denominator ``sum_j H1(x_ji)`` is 0 (possible only when
    ``H1(1/2) = 0``) contributes ``1 - I1(u_i)`` (its ranking term is taken as 0).
    """
    _check_inputs(logits, targets, qualities, spec, top_k)
    for name, flag in (("exact", exact), ("detach_i3", detach_i3)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    if logits.dtype in (torch.float16, torch.bfloat16):  # e.g. under autocast: rank in float32
        return pap_loss(logits.float(), targets, qualities, spec, top_k, exact=exact,
                        detach_i3=detach_i3).to(logits.dtype)
    s = logits.reshape(-1)                                           # (N,)
    t = targets.reshape(-1)                                          # (N,)
    u_all = qualities.reshape(-1)                                    # (N,)
    pos_idx = torch.nonzero(t == 1).squeeze(1)                       # (P,)
    n_pos = pos_idx.numel()
    if n_pos == 0:
        return 0.0 * (logits.sum() + qualities.sum().to(logits.dtype))
    s_p = s[pos_idx]                                                 # (P,)
    u_p = u_all[pos_idx].to(s.dtype)                                 # (P,)
    if not bool(((u_p >= 0) & (u_p <= 1)).all()):
        bad = u_p[(u_p < 0) | (u_p > 1)][0].item()
        raise ValueError(f"qualities must be in [0, 1] where targets == 1, found {bad}")

    H2 = spec.rank_function("H2", exact=exact)
    H1 = spec.rank_function("H1", exact=exact)
    I1, I2, I3 = spec.function("I1"), spec.function("I2"), spec.function("I3")

    # The ranked set J, sorted ascending: s_sorted (M,); and its positives, s_pj (P_J,).
    ignored = t == -1
    n_ignored = int(ignored.sum())
    n_valid = s.numel() - n_ignored
    if top_k is not None and n_valid > top_k:
        s_rank = torch.where(ignored, torch.full_like(s, -math.inf), s) if n_ignored else s
        top = torch.topk(s_rank, top_k, sorted=True)                 # descending, all valid
        s_sorted = top.values.flip(0)                                # (M,) = (top_k,)
        idx = top.indices.flip(0)
        pos_in_j = t[idx] == 1
        s_pj = s_sorted[pos_in_j]                                    # ascending
        u_pj = u_all[idx[pos_in_j]].to(s.dtype)
    else:
        s_rank = torch.where(ignored, torch.full_like(s, math.inf), s) if n_ignored else s
        s_sorted = torch.sort(s_rank).values[:n_valid]               # (M,) = (V,)
        s_pj, perm = torch.sort(s_p)                                 # every positive is ranked
        u_pj = u_p[perm]

    i2_zero = I2(s.new_zeros(1))                                     # (1,) I2(0)
    w0 = float(1.0 - i2_zero)                                        # weight of each non-positive in H2's sum
    # num_i = w0 K_H2(s_i; J) + K_H2(s_i; P∩J, I2(0) - I2(u_p));  den_i = K_H1(s_i; J)
    k_h2, den = _rank_sums_num_den(s_p, s_sorted, H2, H1)
    num = k_h2 * w0
    if s_pj.numel():
        num = num + rank_sum(s_p, s_pj, H2, weights=i2_zero - I2(u_pj))
    safe = torch.where(den > 0, den, torch.ones_like(den))
    ratio = torch.where(den > 0, num / safe, torch.zeros_like(num))
    per_pos = (1.0 - I1(u_p)) + I3(u_p.detach() if detach_i3 else u_p) * ratio  # (P,)
    return per_pos.sum() / (n_pos + 1e-8)
