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
the *rank sum* ``K(s_i; A, v) = sum_{j in A} v_j H(s_j - s_i)``. For the searched
functions, ``linear``, ``square`` and the step, H is a polynomial of degree ≤ 2 on
each of a few intervals of ``d`` (:class:`paploss.functions.Piece`), so for every
``i`` and piece ``[lo, hi)``::

    sum_{j: s_j - s_i in [lo, hi)} v_j (c0 + c1 (s_j - s_i) + c2 (s_j - s_i)²)
        = c0 V0 + c1 (V1 - s_i V0) + c2 (V2 - 2 s_i V1 + s_i² V0)

where ``V_m`` are differences of prefix sums of ``v s^m`` over the sorted scores,
between the two positions that ``searchsorted`` finds for ``s_i + lo`` and
``s_i + hi``. That is one sort, O(N) prefix sums (float64) and O(P · pieces)
look-ups. The backward pass (``_PiecewiseRankSum.backward``) is the same structure
turned around: each (positive, piece) adds a polynomial in ``s_j`` over an index
range of the sorted entries; difference arrays and one cumulative sum per power of
``s_j`` give all N gradients at once. ``sigmoid`` and ``sqrt`` are not piecewise
polynomial: they use ``_DenseRankSum``, which tiles the N×P pairs so that extra
memory stays under about 64 MB whatever N and P.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from paploss.functions import Piece, RankFunction
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


def _bound_index(s64: Tensor, q: Tensor, bound: float, side: str, cache: dict) -> Tensor:
    """Position in sorted ``s64`` (M,) of ``q + bound`` for each q (P,): int64 (P,)."""
    key = (bound, side)
    if key not in cache:
        if bound == -math.inf:
            cache[key] = torch.zeros(q.shape, dtype=torch.long, device=q.device)
        elif bound == math.inf:
            cache[key] = torch.full(q.shape, s64.numel(), dtype=torch.long, device=q.device)
        else:
            cache[key] = torch.searchsorted(s64, q + bound, side=side)
    return cache[key]


def _piece_range(s64: Tensor, q: Tensor, p: Piece, cache: dict) -> tuple[Tensor, Tensor]:
    """Index range ``[a, b)`` of sorted entries with ``s_j - q_i`` inside piece ``p``."""
    a = _bound_index(s64, q, p.lo, "right" if not p.lo_closed else "left", cache)
    b = _bound_index(s64, q, p.hi, "right" if p.hi_closed else "left", cache)
    return a, torch.maximum(a, b)


def _prefix(v: Tensor) -> Tensor:
    """``[0, v_0, v_0 + v_1, ...]`` (M + 1,)."""
    return torch.cat([v.new_zeros(1), torch.cumsum(v, 0)])


class _PiecewiseRankSum(torch.autograd.Function):
    """``out_i = sum_j v_j H(s_j - q_i)`` for a piecewise-polynomial H, exactly.

    Inputs: ``q`` (P,) reference scores, ``s`` (M,) scores sorted ascending, ``v``
    (M,) weights or ``None`` (all ones), ``pieces`` of H. Output (P,), dtype of ``q``.
    Time O((M + P · pieces) log M), memory O(M + P · pieces); sums in float64.
    """

    @staticmethod
    def forward(ctx, q: Tensor, s: Tensor, v: Tensor | None, pieces: tuple[Piece, ...]) -> Tensor:
        s64 = s.detach().to(torch.float64)
        q64 = q.detach().to(torch.float64)
        m = s64.numel()
        center = s64[m // 2] if m else s64.new_zeros(())   # shift powers of s to keep prefix sums small
        sc = s64 - center                                   # (M,)
        qc = q64 - center                                   # (P,)
        v64 = None if v is None else v.detach().to(torch.float64)
        need2 = any(p.c2 != 0.0 for p in pieces)
        need1 = need2 or any(p.c1 != 0.0 for p in pieces)
        pre0 = None if v64 is None else _prefix(v64)
        vs = sc if v64 is None else v64 * sc
        pre1 = _prefix(vs) if need1 else None
        pre2 = _prefix(vs * sc) if need2 else None

        out = torch.zeros_like(q64)
        dout = torch.zeros_like(q64)   # sum_j v_j H'(s_j - q_i): d out_i / d q_i = -dout_i
        cache: dict = {}
        starts, ends = [], []
        for p in pieces:
            a, b = _piece_range(s64, q64, p, cache)
            starts.append(a)
            ends.append(b)
            n0 = (b - a).to(torch.float64) if pre0 is None else pre0[b] - pre0[a]
            val = p.c0 * n0
            if p.c1 != 0.0 or p.c2 != 0.0:
                n1 = pre1[b] - pre1[a]
                lin = n1 - qc * n0                   # sum v (s_j - q_i)
                val = val + p.c1 * lin
                dout = dout + p.c1 * n0
                if p.c2 != 0.0:
                    n2 = pre2[b] - pre2[a]
                    val = val + p.c2 * (n2 - 2.0 * qc * n1 + qc * qc * n0)
                    dout = dout + 2.0 * p.c2 * lin
            out = out + val
        ctx.pieces = pieces
        ctx.has_v = v is not None
        ctx.save_for_backward(s, v if v is not None else s.new_empty(0), qc, center.reshape(1), dout,
                              torch.stack(starts), torch.stack(ends))
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s, v, qc, center, dout, starts, ends = ctx.saved_tensors
        g = grad_out.to(torch.float64)                       # (P,)
        need_q, need_s, need_v = ctx.needs_input_grad[:3]
        grad_q = grad_s = grad_v = None
        if need_q:
            grad_q = (-g * dout).to(grad_out.dtype)
        if need_s or (need_v and ctx.has_v):
            m = s.numel()
            sc = s.detach().to(torch.float64) - center        # (M,)
            # per-entry polynomial coefficients: sum over (i, piece) covering j of
            #   g_i (c0 + c1 (s_j - q_i) + c2 (s_j - q_i)²) = C0_j + C1_j s_j + C2_j s_j²
            diff = torch.zeros(3, m + 1, dtype=torch.float64, device=s.device)
            for k, p in enumerate(ctx.pieces):
                a, b = starts[k], ends[k]
                coeffs = (
                    g * (p.c0 - p.c1 * qc + p.c2 * qc * qc),
                    g * (p.c1 - 2.0 * p.c2 * qc),
                    g * p.c2,
                )
                for r, c in enumerate(coeffs):
                    if r == 0 and not (need_v and ctx.has_v):
                        continue
                    if (r == 1 and p.c1 == 0.0 and p.c2 == 0.0) or (r == 2 and p.c2 == 0.0):
                        continue
                    if r == 0 and p.c0 == 0.0 and p.c1 == 0.0 and p.c2 == 0.0:
                        continue
                    diff[r].index_add_(0, a, c)
                    diff[r].index_add_(0, b, -c)
            used = [bool(diff[r].any()) for r in range(3)]
            coef = [torch.cumsum(diff[r, :m], 0) if used[r] else None for r in range(3)]
            if need_s:
                ds = torch.zeros_like(sc)
                if coef[1] is not None:
                    ds = ds + coef[1]
                if coef[2] is not None:
                    ds = ds + 2.0 * coef[2] * sc
                if ctx.has_v:
                    ds = ds * v.detach().to(torch.float64)
                grad_s = ds.to(s.dtype)
            if need_v and ctx.has_v:
                dv = torch.zeros_like(sc)
                if coef[0] is not None:
                    dv = dv + coef[0]
                if coef[1] is not None:
                    dv = dv + coef[1] * sc
                if coef[2] is not None:
                    dv = dv + coef[2] * sc * sc
                grad_v = dv.to(v.dtype)
        return grad_q, grad_s, grad_v, None


# --------------------------------------------------------------------------------------
# Dense tiled rank sums for any H (sigmoid, sqrt)
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
        return _PiecewiseRankSum.apply(q, s_sorted, weights, h.pieces)
    return _DenseRankSum.apply(q, s_sorted, weights, h)


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


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
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be a paploss.LossSpec, got {type(spec).__name__}: {spec!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if not bool(torch.isfinite(logits).all()):
        bad = logits.detach().reshape(-1)[~torch.isfinite(logits.detach().reshape(-1))][0].item()
        raise ValueError(f"logits must be finite, found {bad}")
    if not bool(torch.isfinite(qualities).all()):
        bad = qualities.detach().reshape(-1)[~torch.isfinite(qualities.detach().reshape(-1))][0].item()
        raise ValueError(f"qualities must be finite, found {bad}")
    ok = (targets == 1) | (targets == 0) | (targets == -1)
    if not bool(ok.all()):
        bad = targets.reshape(-1)[~ok.reshape(-1)][0].item()
        raise ValueError(f"targets must hold only -1 (ignore), 0 and 1, found {bad}")
    u_pos = qualities.detach()[targets == 1]
    if u_pos.numel() and not bool(((u_pos >= 0) & (u_pos <= 1)).all()):
        bad = u_pos[(u_pos < 0) | (u_pos > 1)][0].item()
        raise ValueError(f"qualities must be in [0, 1] where targets == 1, found {bad}")


def pap_loss(
    logits: Tensor,
    targets: Tensor,
    qualities: Tensor,
    spec: LossSpec,
    top_k: int | None = DEFAULT_TOP_K,
) -> Tensor:
    """The Parameterized AP Loss of SPEC §1 over a whole batch.

    Args:
        logits: scores ``s``, any shape (N entries in all), floating point.
        targets: same shape, values in {-1 (ignored), 0, 1 (positive)}, any dtype.
        qualities: same shape, localisation quality ``u`` in [0, 1]; read only where
            ``targets == 1`` (elsewhere ``u = 0``). Gradients flow into it.
        spec: the :class:`paploss.spec.LossSpec` giving H2, I2, I3, I1, H1.
        top_k: rank only the ``top_k`` valid entries with the highest scores (J);
            every positive still has its own term. ``None``: rank all valid entries.

    Returns:
        0-dim tensor, dtype and device of ``logits``; ``0 * (sum of inputs)``
        (still connected to the graph) when there is no positive.
    """
    _check_inputs(logits, targets, qualities, spec, top_k)
    s = logits.reshape(-1)                                           # (N,)
    t = targets.reshape(-1)                                          # (N,)
    u = qualities.reshape(-1).to(logits.dtype)                       # (N,)
    pos = t == 1
    n_pos = int(pos.sum())
    if n_pos == 0:
        return 0.0 * (logits.sum() + u.sum())

    H2 = spec.rank_function("H2")
    H1 = spec.rank_function("H1")
    I1, I2, I3 = spec.function("I1"), spec.function("I2"), spec.function("I3")

    # the ranked set J, sorted ascending
    valid = t != -1
    s_valid = s[valid]                                               # (V,)
    pos_valid = pos[valid]                                           # (V,)
    u_valid = u[valid]
    if top_k is not None and s_valid.numel() > top_k:
        top = torch.topk(s_valid, top_k, sorted=True)
        s_sorted = top.values.flip(0)                                # (M,) ascending
        order = top.indices.flip(0)
    else:
        s_sorted, order = torch.sort(s_valid)                       # (M,)
    pos_in_j = pos_valid[order]                                      # (M,) bool
    s_pj = s_sorted[pos_in_j]                                        # (P_J,) ascending
    u_pj = u_valid[order[pos_in_j]]                                  # (P_J,)

    s_p = s[pos]                                                     # (P,)
    u_p = u[pos]                                                     # (P,)

    zero = s.new_zeros(1)
    i2_zero = I2(zero)                                               # (1,)  I2(0)
    w0 = float(1.0 - i2_zero)                                        # weight of a non-positive
    # num_i = w0 K_H2(s_i; J) + K_H2(s_i; P∩J, I2(0) - I2(u_p))
    num = rank_sum(s_p, s_sorted, H2) * w0 if w0 != 0.0 else s_p.new_zeros(n_pos)
    if s_pj.numel():
        num = num + rank_sum(s_p, s_pj, H2, weights=i2_zero - I2(u_pj))
    with torch.no_grad():
        den = rank_sum(s_p.detach(), s_sorted.detach(), H1)
    ratio = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    per_pos = (1.0 - I1(u_p)) + I3(u_p) * ratio                     # (P,)
    return per_pos.sum() / (n_pos + 1e-8)
