"""pap_loss (SPEC §1): the fast kernels against a dense per-pair twin, in value and gradient."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st


def _examples(n: int) -> int:
    """Hypothesis examples; PAPLOSS_HYPOTHESIS_SCALE=20 runs a 20× deeper search."""
    return max(1, int(n * float(os.environ.get("PAPLOSS_HYPOTHESIS_SCALE", "1"))))

import paploss.loss as L
from paploss import LossSpec, pap_loss, scale_grad
from paploss.functions import rank_function_piecewise_linear
from paploss.loss import rank_sum
from paploss.spec import IDENTITY_THETA8, theta_to_points

# --------------------------------------------------------------------------------------
# The dense twin: SPEC §1 written out with N×P matrices, for clarity, not speed.
# --------------------------------------------------------------------------------------


def dense_pap_loss(logits, targets, qualities, spec, top_k=100_000, detach_h1=True, exact=False, detach_i3=False):
    """``exact``: the exact sigmoid / sqrt H (not the piecewise-quadratic approximations)."""
    s = logits.reshape(-1)
    t = targets.reshape(-1)
    u = torch.where(t == 1, qualities.reshape(-1), torch.zeros_like(qualities.reshape(-1)))
    P = torch.nonzero(t == 1).squeeze(1)
    if len(P) == 0:
        return 0.0 * (logits.sum() + qualities.sum())
    J = torch.nonzero(t != -1).squeeze(1)
    if top_k is not None and len(J) > top_k:
        J = J[torch.topk(s[J], top_k).indices]
    d = s[J][:, None] - s[P][None, :]                 # d_ji, (|J|, |P|)
    x = d / 2 + 0.5                                   # the functions clamp x themselves
    H2, H1 = spec.function("H2"), spec.function("H1")
    if exact:
        from paploss.functions import handcrafted_function

        H2, H1 = handcrafted_function(spec.form, "H2", exact=True), handcrafted_function(spec.form, "H1", exact=True)
    I1, I2, I3 = spec.function("I1"), spec.function("I2"), spec.function("I3")
    num = (H2(x) * (1 - I2(u[J]))[:, None]).sum(0)   # (|P|,)
    den = H1(x).sum(0)
    if detach_h1:
        den = den.detach()
    ratio = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    loss_i = (1 - I1(u[P])) + I3(u[P].detach() if detach_i3 else u[P]) * ratio
    return loss_i.sum() / (len(P) + 1e-8)


# --------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------

# Random reals are drawn as dyadic fractions (k / 2^20): hypothesis's "nasty" floats
# (1e-308, 0.5 - 1ulp) would otherwise put a score difference d within one rounding of a
# break point, where computing x = d/2 + 1/2 first (the twin) or comparing d with
# 2 x_k - 1 (the fast path) legitimately round to different sides.
unit = st.integers(0, 2**20).map(lambda k: k / 2**20)
real = st.integers(-2**22, 2**22).map(lambda k: k / 2**20)   # [-4, 4]
grid8 = st.integers(0, 8).map(lambda k: k / 8)
steep = st.sampled_from([0.0, 1e-7, 1.0 - 1e-7, 1.0])     # equal x's, near-vertical segments
theta_num = st.one_of(unit, grid8, steep)


@st.composite
def specs(draw):
    kind = draw(st.sampled_from(["searched5", "searched4", "shared", "sigmoid", "sqrt", "linear", "square"]))
    if kind.startswith("searched"):
        n = int(kind[-1])
        return LossSpec.from_theta(draw(st.lists(theta_num, min_size=8 * n + 1, max_size=8 * n + 1)))
    if kind == "shared":
        return LossSpec.from_theta(draw(st.lists(theta_num, min_size=9, max_size=9)))
    return LossSpec.handcrafted(kind)


@st.composite
def batches(draw, max_n=40):
    n = draw(st.integers(1, max_n))
    on_grid = draw(st.booleans())      # grid scores: many ties, d exactly on break points
    if on_grid:
        scores = draw(st.lists(st.integers(-24, 24).map(lambda k: k / 8), min_size=n, max_size=n))
    else:
        scores = draw(st.lists(real, min_size=n, max_size=n))
    targets = draw(st.lists(st.sampled_from([-1, 0, 0, 1]), min_size=n, max_size=n))
    quals = draw(st.lists(st.one_of(unit, grid8), min_size=n, max_size=n))
    top_k = draw(st.one_of(st.none(), st.integers(1, n + 3)))
    return scores, targets, quals, top_k


def _tensors(scores, targets, quals, dtype=torch.float64):
    s = torch.tensor(scores, dtype=dtype, requires_grad=True)
    t = torch.tensor(targets)
    q = torch.tensor(quals, dtype=dtype, requires_grad=True)
    return s, t, q


def _cut_is_unambiguous(scores, targets, top_k):
    valid = sorted((s for s, t in zip(scores, targets) if t != -1), reverse=True)
    return top_k is None or len(valid) <= top_k or valid[top_k - 1] != valid[top_k]


def _value_and_grads(fn, s, q):
    loss = fn(s, q)
    gs, gq = torch.autograd.grad(loss, (s, q), allow_unused=True)
    return loss.detach(), (torch.zeros_like(s) if gs is None else gs), (torch.zeros_like(q) if gq is None else gq)


def _assert_same(a, b, rtol=1e-6, atol=1e-9):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def _steepness(spec) -> float:
    """The largest slope of the ranking pieces (in d). Prefix sums lose absolute precision
    in proportion to it (a slope of 1e12 turns 1e-16 rounding into 1e-4): tolerances scale."""
    slopes = [abs(p.c1) + abs(p.c2) for name in ("H2", "H1")
              for p in (spec.rank_function(name).pieces or ())]
    return max([1.0] + slopes)


# --------------------------------------------------------------------------------------
# Fast path == dense twin
# --------------------------------------------------------------------------------------


@settings(max_examples=_examples(150), deadline=None)
@given(specs(), batches())
def test_fast_loss_matches_dense_twin(spec, batch):
    scores, targets, quals, top_k = batch
    assume(_cut_is_unambiguous(scores, targets, top_k))
    s, t, q = _tensors(scores, targets, quals)
    fast = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=top_k), s, q)
    twin = _value_and_grads(lambda s, q: dense_pap_loss(s, t, q, spec, top_k=top_k), s, q)
    _assert_same(fast, twin, atol=1e-9 * _steepness(spec))


@settings(max_examples=_examples(60), deadline=None)
@given(specs(), batches())
def test_detach_i3_matches_dense_twin_and_never_rewards_worse_boxes(spec, batch):
    """detach_i3: the fast path equals the twin with I3's input detached, in value and
    gradient; the value is the SPEC's loss; and no quality gets a positive gradient
    (worse boxes never lower the loss), which the SPEC's loss does not promise."""
    scores, targets, quals, top_k = batch
    assume(_cut_is_unambiguous(scores, targets, top_k))
    s, t, q = _tensors(scores, targets, quals)
    fast = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=top_k, detach_i3=True), s, q)
    twin = _value_and_grads(lambda s, q: dense_pap_loss(s, t, q, spec, top_k=top_k, detach_i3=True), s, q)
    _assert_same(fast, twin, atol=1e-9 * _steepness(spec))
    torch.testing.assert_close(fast[0], pap_loss(s, t, q, spec, top_k=top_k).detach(), rtol=1e-12, atol=1e-12)
    assert bool((fast[2] <= 1e-12).all()), fast[2]


def test_detach_i3_removes_the_gradient_that_trains_boxes_worse():
    """A loss whose I3 is steep where I1 is flat (BENCHMARKS.md, issue 8, finding 26): with
    every score equal, the SPEC's loss pushes each positive's quality down; detach_i3
    leaves only I1's push up."""
    from tests.test_engine import BOX_COLLAPSING

    s = torch.zeros(40, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1] * 4 + [0] * 36)
    q = torch.full((40,), 0.25, dtype=torch.float64, requires_grad=True)
    spec_grad = torch.autograd.grad(pap_loss(s, t, q, BOX_COLLAPSING), q)[0][:4]
    detached = torch.autograd.grad(pap_loss(s, t, q, BOX_COLLAPSING, detach_i3=True), q)[0][:4]
    assert bool((spec_grad > 0).all()) and bool((detached < 0).all())


@settings(max_examples=_examples(25), deadline=None)
@given(specs(), batches(max_n=25))
def test_tiled_dense_path_matches_dense_twin(spec, batch):
    """Force every form through the tiled path (as sigmoid/sqrt use it), with small tiles."""
    scores, targets, quals, top_k = batch
    assume(_cut_is_unambiguous(scores, targets, top_k))
    s, t, q = _tensors(scores, targets, quals)
    real = LossSpec.rank_function

    def no_pieces(self, name, exact=False):
        return dataclasses.replace(real(self, name, exact), pieces=None)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(LossSpec, "rank_function", no_pieces)
        m.setattr(L, "_TILE_ELEMENTS", 7)
        tiled = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=top_k), s, q)
    twin = _value_and_grads(lambda s, q: dense_pap_loss(s, t, q, spec, top_k=top_k), s, q)
    _assert_same(tiled, twin, atol=1e-9 * _steepness(spec))


# --------------------------------------------------------------------------------------
# sigmoid / sqrt: piecewise-quadratic approximations on the fast path
# --------------------------------------------------------------------------------------

wide = st.integers(-2**24, 2**24).map(lambda k: k / 2**20)     # [-16, 16]: sigmoid's tails too


@st.composite
def wide_batches(draw, max_n=40):
    n = draw(st.integers(1, max_n))
    score = st.one_of(wide, st.integers(-96, 96).map(lambda k: k / 8))   # grid: d on break points
    scores = draw(st.lists(score, min_size=n, max_size=n))
    targets = draw(st.lists(st.sampled_from([-1, 0, 0, 1]), min_size=n, max_size=n))
    quals = draw(st.lists(st.one_of(unit, grid8), min_size=n, max_size=n))
    top_k = draw(st.one_of(st.none(), st.integers(1, n + 3)))
    return scores, targets, quals, top_k


@contextlib.contextmanager
def _through_dense_path(exact=False):
    """Patch LossSpec.rank_function so pap_loss takes the tiled dense path: over the same
    approximated H (``pieces`` dropped), or over the exact functions (``exact``)."""
    real = LossSpec.rank_function

    force_exact = exact

    def rank_function(self, name, exact=False):
        if force_exact:
            return real(self, name, exact=True)
        return dataclasses.replace(real(self, name, exact), pieces=None)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(LossSpec, "rank_function", rank_function)
        yield


@contextlib.contextmanager
def _no_dense_path():
    def refuse(*args, **kwargs):
        raise AssertionError("the dense path was used")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(L._DenseRankSum, "apply", refuse)
        yield


@settings(max_examples=_examples(120), deadline=None)
@given(st.sampled_from(["sigmoid", "sqrt"]), wide_batches())
def test_approximated_forms_fast_path_equals_dense_path(form, batch):
    """sigmoid / sqrt go through the fast path (the dense one is refused), and it equals
    the tiled dense path over the same approximated H and the dense twin, value and
    gradients, with d on break points, in sigmoid's flat tails and past ±1 for sqrt."""
    scores, targets, quals, top_k = batch
    assume(_cut_is_unambiguous(scores, targets, top_k))
    spec = LossSpec.handcrafted(form)
    s, t, q = _tensors(scores, targets, quals)
    with _no_dense_path():
        fast = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=top_k), s, q)
        with pytest.MonkeyPatch.context() as m:     # the pieces in several chunks
            m.setattr(L, "_TILE_ELEMENTS", 64)
            chunked = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=top_k), s, q)
    with _through_dense_path():
        dense = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=top_k), s, q)
    twin = _value_and_grads(lambda s, q: dense_pap_loss(s, t, q, spec, top_k=top_k), s, q)
    atol = 1e-9 * _steepness(spec)
    _assert_same(fast, chunked, rtol=1e-12, atol=1e-12)
    _assert_same(fast, dense, atol=atol)
    _assert_same(fast, twin, atol=atol)


def _approximation_bound(s, t, q, form):
    """Bound on |loss(approximated H) - loss(exact H)| derived from the pointwise bound
    eps = HANDCRAFTED_APPROX_ERROR[form] (top_k=None, so every positive is in J).

    Per positive i with exact num_i, den_i, W_i = sum_j (1 - I2(u_j)) and M = |J|:
    |Δnum_i| <= eps W_i, |Δden_i| <= eps M, so
    |num'/den' - num/den| <= eps (W_i + (num_i/den_i) M) / (den_i - eps M)."""
    from paploss.functions import HANDCRAFTED_APPROX_ERROR, rank_function_handcrafted

    eps = HANDCRAFTED_APPROX_ERROR[form]
    spec = LossSpec.handcrafted(form)
    h = rank_function_handcrafted(form, exact=True)
    I2, I3 = spec.function("I2"), spec.function("I3")
    s, q = s.detach(), q.detach()
    J, P = t != -1, t == 1
    u = torch.where(P, q, torch.zeros_like(q))
    hv = h(s[J][:, None] - s[P][None, :])                      # (M, |P|)
    w = 1 - I2(u[J])
    num, den = (hv * w[:, None]).sum(0), hv.sum(0)
    m = int(J.sum())
    assert bool((den > eps * m).all())
    per = I3(u[P]) * eps * (w.sum() + num / den * m) / (den - eps * m)
    return per.sum().item() / (int(P.sum()) + 1e-8)


@pytest.mark.parametrize("form", ["sigmoid", "sqrt"])
@pytest.mark.parametrize("seed", range(4))
def test_approximated_loss_is_close_to_the_exact_loss(form, seed):
    """The loss with the approximations (fast path) is within the bound derived from the
    functions' error bound of the loss with the exact functions (dense path); gradients
    agree loosely (relative L2: sigmoid 1e-3; sqrt 0.1, its derivative is unbounded near
    d = -1 where the approximation's is not; the qualities' gradient, through H values
    only, 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    n = 300
    s = torch.randn(n, generator=g, dtype=torch.float64) * 3
    t = torch.where(torch.rand(n, generator=g) < 0.1, 1, torch.where(torch.rand(n, generator=g) < 0.1, -1, 0))
    t[0] = 1
    q = torch.rand(n, generator=g, dtype=torch.float64)
    s.requires_grad_()
    q.requires_grad_()
    spec = LossSpec.handcrafted(form)
    with _no_dense_path():
        approx = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=None), s, q)
    exact = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=None, exact=True), s, q)
    with _through_dense_path(exact=True):        # the same as the public option
        _assert_same(exact, _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=None), s, q),
                     rtol=0, atol=0)
    bound = _approximation_bound(s, t, q, form)
    assert abs(approx[0] - exact[0]).item() <= bound + 1e-12
    assert approx[0] != exact[0]                               # they are different functions
    # the exact dense loss is the SPEC's formula with the exact functions
    twin_exact = dense_pap_loss(s.detach(), t, q.detach(), spec, top_k=None, exact=True)
    torch.testing.assert_close(exact[0], twin_exact, rtol=1e-12, atol=1e-12)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(approx[1], exact[1]) <= {"sigmoid": 1e-3, "sqrt": 0.1}[form]
    assert rel(approx[2], exact[2]) <= 1e-3


@settings(max_examples=_examples(60), deadline=None)
@given(
    st.lists(theta_num, min_size=8, max_size=8).map(theta_to_points),
    st.lists(st.one_of(real, st.integers(-16, 16).map(lambda k: k / 8)), min_size=1, max_size=30),
    st.lists(st.one_of(real, st.integers(-16, 16).map(lambda k: k / 8)), min_size=1, max_size=8),
    st.sampled_from(["pl", "step", "linear", "square", "sigmoid", "sqrt"]),
    st.booleans(),
)
def test_rank_sum_matches_brute_force(points, s_list, q_list, kind, weighted):
    from paploss.functions import rank_function_handcrafted, rank_function_step

    h = {"pl": lambda: rank_function_piecewise_linear(points), "step": rank_function_step,
         "linear": lambda: rank_function_handcrafted("linear"),
         "square": lambda: rank_function_handcrafted("square"),
         "sigmoid": lambda: rank_function_handcrafted("sigmoid"),
         "sqrt": lambda: rank_function_handcrafted("sqrt")}[kind]()
    s = torch.tensor(sorted(s_list), dtype=torch.float64, requires_grad=True)
    q = torch.tensor(q_list, dtype=torch.float64, requires_grad=True)
    w = torch.linspace(0.3, 1.7, len(s_list), dtype=torch.float64, requires_grad=True) if weighted else None
    g = torch.linspace(-1, 2, len(q_list), dtype=torch.float64)
    inputs = (q, s) + ((w,) if weighted else ())

    def brute(q, s, w=None):
        vals = h(s[:, None] - q[None, :])
        return (vals * (w[:, None] if w is not None else 1.0)).sum(0)

    out = rank_sum(q, s, h, weights=w)
    want = brute(q, s, w)
    atol = 1e-9 * max([1.0] + [abs(p.c1) + abs(p.c2) for p in h.pieces])
    torch.testing.assert_close(out, want, rtol=1e-9, atol=atol)
    if kind == "step":
        return  # no gradient (H1 only)
    got_g = torch.autograd.grad((out * g).sum(), inputs)
    want_g = torch.autograd.grad((want * g).sum(), inputs)
    _assert_same(got_g, want_g, rtol=1e-9, atol=atol)


def test_float32_agrees_with_float64_twin():
    torch.manual_seed(1)
    n = 3000
    scores = (torch.randn(n) * 2).tolist()
    targets = torch.where(torch.rand(n) < 0.05, 1, torch.where(torch.rand(n) < 0.1, -1, 0)).tolist()
    quals = torch.rand(n).tolist()
    spec = LossSpec.from_theta(torch.rand(41, generator=torch.Generator().manual_seed(3)).tolist())
    s32, t, q32 = _tensors(scores, targets, quals, torch.float32)
    s64, _, q64 = _tensors(s32.tolist(), targets, q32.tolist(), torch.float64)
    for top_k in (None, 500):
        fast = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=top_k), s32, q32)
        twin = _value_and_grads(lambda s, q: dense_pap_loss(s, t, q, spec, top_k=top_k), s64, q64)
        assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
        _assert_same([x.double() for x in fast], twin, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# gradcheck, H1, identity, edge cases
# --------------------------------------------------------------------------------------


_GC_SPECS = [
    LossSpec.from_theta([0.3, 0.1, 0.5, 0.6, 0.2, 0.3, 0.7, 0.4] * 5 + [0.5]),
    LossSpec.from_theta([0.3, 0.1, 0.5, 0.6, 0.2, 0.3, 0.7, 0.4] * 4),
    LossSpec.handcrafted("square"),
    LossSpec.handcrafted("sigmoid"),
    LossSpec.handcrafted("sqrt"),
]
_GC_IDS = ["searched5", "searched4", "square", "sigmoid", "sqrt"]


def _gc_inputs():
    g = torch.Generator().manual_seed(0)
    n = 12
    s = (torch.randn(n, generator=g, dtype=torch.float64) * 0.8).requires_grad_()
    t = torch.tensor([1, 0, 0, 1, -1, 0, 1, 0, 0, 0, 1, 0])
    q = (torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    return s, t, q


@pytest.mark.parametrize("spec", _GC_SPECS, ids=_GC_IDS)
@pytest.mark.parametrize("top_k", [None, 7])
def test_gradcheck_qualities(spec, top_k):
    """d loss / d u is the true derivative for every form (H1 does not depend on u)."""
    s, t, q = _gc_inputs()
    s = s.detach()
    assert torch.autograd.gradcheck(lambda q: pap_loss(s, t, q, spec, top_k=top_k), (q,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("top_k", [None, 7])
def test_gradcheck_logits_with_step_h1(top_k):
    """With the step as H1 the detached denominator is locally constant, so d loss / d s
    is the true derivative and finite differences must agree."""
    s, t, q = _gc_inputs()
    spec = _GC_SPECS[1]
    assert torch.autograd.gradcheck(lambda s, q: pap_loss(s, t, q, spec, top_k=top_k), (s, q), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("kind", ["pl", "step", "linear", "square", "sigmoid", "sqrt"])
def test_rank_sum_gradcheck(kind):
    from paploss.functions import rank_function_handcrafted, rank_function_step

    g = torch.Generator().manual_seed(2)
    h = {"pl": lambda: rank_function_piecewise_linear(theta_to_points([0.3, 0.1, 0.5, 0.6, 0.2, 0.3, 0.7, 0.4])),
         "step": rank_function_step}.get(kind, lambda: rank_function_handcrafted(kind))()
    s = torch.sort(torch.randn(20, generator=g, dtype=torch.float64)).values.requires_grad_()
    q = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(20, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, s, w: rank_sum(q, s, h, weights=w), (q, s, w))
    assert torch.autograd.gradcheck(lambda q, s: rank_sum(q, s, h), (q, s))


def test_h1_passes_no_gradient():
    """Gradients equal the twin with a detached H1 and differ from one with H1 attached."""
    torch.manual_seed(0)
    spec = LossSpec.from_theta([0.3, 0.1, 0.5, 0.6, 0.2, 0.3, 0.7, 0.4] * 4 + [0.1, 0.6, 0.5, 0.2, 0.3, 0.3, 0.5, 0.9])
    s, t, q = _tensors((torch.randn(60) * 0.7).tolist(), ([1] + [0] * 5) * 10, torch.rand(60).tolist())
    fast = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec), s, q)
    detached = _value_and_grads(lambda s, q: dense_pap_loss(s, t, q, spec), s, q)
    attached = _value_and_grads(lambda s, q: dense_pap_loss(s, t, q, spec, detach_h1=False), s, q)
    _assert_same(fast, detached)
    torch.testing.assert_close(fast[0], attached[0])
    assert (fast[1] - attached[1]).abs().max() > 1e-3


@settings(max_examples=_examples(40), deadline=None)
@given(batches())
def test_identity_theta_gives_the_linear_form(batch):
    scores, targets, quals, top_k = batch
    assume(_cut_is_unambiguous(scores, targets, top_k))
    s, t, q = _tensors(scores, targets, quals)
    linear = _value_and_grads(lambda s, q: pap_loss(s, t, q, LossSpec.handcrafted("linear"), top_k=top_k), s, q)
    for spec in (LossSpec.from_theta(IDENTITY_THETA8 * 5), LossSpec.from_theta(IDENTITY_THETA8)):
        ident = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=top_k), s, q)
        _assert_same(ident, linear, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("targets", [[0, 0, -1, 0], [-1, -1, -1, -1], []])
def test_no_positive_gives_zero_connected_to_the_graph(targets):
    n = len(targets)
    s = torch.randn(n, requires_grad=True)
    q = torch.rand(n, requires_grad=True)
    loss = pap_loss(s, torch.tensor(targets, dtype=torch.long), q, LossSpec.handcrafted("linear"))
    assert loss.shape == () and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros(n)) and torch.equal(q.grad, torch.zeros(n))


def test_single_positive_alone_is_perfectly_ranked():
    """One positive, nothing else: loss = 1 - I1(u) + I3(u) * H2(1/2)(1 - I2(u)) / H1(1/2)."""
    spec = LossSpec.handcrafted("linear")
    s = torch.tensor([0.3], requires_grad=True)
    q = torch.tensor([0.8], requires_grad=True)
    loss = pap_loss(s, torch.tensor([1]), q, spec)
    torch.testing.assert_close(loss, torch.tensor(1 - 0.8 + 0.8 * 0.5 * 0.2 / 0.5) / (1 + 1e-8))


def test_positive_cut_by_top_k_still_counts():
    """J = the top_k valid scores; a positive below the cut keeps its own term (SPEC §1)."""
    spec = LossSpec.handcrafted("linear")
    s = torch.tensor([3.0, 2.0, 1.0, -5.0], dtype=torch.float64)
    t = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    # top_k = 2: J = {3, 2}, no positive in J. Both positives have x = 1 against both:
    # num = den = 2, loss_i = (1 - u) + u * 1 = 1.
    loss = pap_loss(s, t, q, spec, top_k=2)
    torch.testing.assert_close(loss, torch.tensor(2.0 / (2 + 1e-8), dtype=torch.float64))
    torch.testing.assert_close(loss, dense_pap_loss(s, t, q, spec, top_k=2))
    # top_k = None: J has all four. For i = 1: x = 1, 1, 1/2, 0 -> den = 2.5; the positives
    # in J have u = 1, weight 1 - I2(1) = 0 -> num = 2. For i = -5: x = 1, 1, 1, 1/2 -> den = 3.5, num = 2.
    loss = pap_loss(s, t, q, spec, top_k=None)
    torch.testing.assert_close(loss, torch.tensor((2 / 2.5 + 2 / 3.5) / (2 + 1e-8), dtype=torch.float64))


def test_any_shape_and_dtypes():
    torch.manual_seed(0)
    spec = LossSpec.from_theta([0.3, 0.1, 0.5, 0.6, 0.2, 0.3, 0.7, 0.4] * 5 + [0.5])
    logits = torch.randn(2, 50, 3, requires_grad=True)
    targets = (torch.rand(2, 50, 3) < 0.1).float()           # float targets are fine
    quals = torch.rand(2, 50, 3, dtype=torch.float64)         # a different dtype is cast
    loss = pap_loss(logits, targets, quals, spec)
    assert loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    assert logits.grad.shape == logits.shape and torch.isfinite(logits.grad).all()
    flat = pap_loss(logits.detach().reshape(-1), targets.reshape(-1), quals.reshape(-1), spec)
    torch.testing.assert_close(loss.detach(), flat)
    half = logits.detach().bfloat16().requires_grad_()
    loss16 = pap_loss(half, targets, quals, spec)
    loss16.backward()
    assert loss16.dtype == torch.bfloat16 and half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss16, pap_loss(half.detach().float(), targets, quals, spec).bfloat16())


@pytest.mark.parametrize("make, match", [
    (lambda s, t, q: (s, t[:3], q), r"targets must have the shape of logits \(4,\), got \(3,\)"),
    (lambda s, t, q: (s, t, q[:2]), r"qualities must have the shape of logits \(4,\), got \(2,\)"),
    (lambda s, t, q: (s.long(), t, q), "logits must be a floating-point tensor"),
    (lambda s, t, q: (torch.tensor([0.1, float("nan"), 0, 0]), t, q), "logits must be finite, found nan"),
    (lambda s, t, q: (torch.tensor([0.1, float("inf"), 0, 0]), t, q), "logits must be finite, found inf"),
    (lambda s, t, q: (s, t, torch.tensor([0.1, float("nan"), 0, 0])), "qualities must be finite, found nan"),
    (lambda s, t, q: (s, torch.tensor([0, 2, 1, 0]), q), r"targets must hold only -1 \(ignore\), 0 and 1, found 2"),
    (lambda s, t, q: (s, torch.tensor([0, 0.5, 1, 0]), q), "targets must hold only .* found 0.5"),
    (lambda s, t, q: (s, t, torch.tensor([0.1, 0.2, 1.5, 0.0])), r"qualities must be in \[0, 1\] where targets == 1, found 1.5"),
    (lambda s, t, q: (s.tolist(), t, q), "logits must be a torch.Tensor, got list"),
])
def test_bad_input_is_rejected_by_name(make, match):
    s = torch.tensor([0.1, 0.2, 0.3, 0.4])
    t = torch.tensor([0, 0, 1, -1])
    q = torch.tensor([0.0, 0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match=match):
        pap_loss(*make(s, t, q), LossSpec.handcrafted("linear"))


def test_bad_spec_and_top_k_are_rejected():
    s, t, q = torch.zeros(3), torch.tensor([1, 0, 0]), torch.ones(3)
    with pytest.raises(ValueError, match="spec must be a paploss.LossSpec, got dict"):
        pap_loss(s, t, q, {"form": "linear"})
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"top_k must be None or an int >= 1, got {bad!r}"):
            pap_loss(s, t, q, LossSpec.handcrafted("linear"), top_k=bad)


def test_qualities_outside_unit_are_ignored_off_positives():
    s = torch.tensor([0.1, 0.2, 0.3])
    t = torch.tensor([0, -1, 1])
    a = pap_loss(s, t, torch.tensor([5.0, -2.0, 0.5]), LossSpec.handcrafted("square"))
    b = pap_loss(s, t, torch.tensor([0.0, 0.0, 0.5]), LossSpec.handcrafted("square"))
    assert a.item() == b.item()


def test_scale_grad():
    x = torch.randn(5, requires_grad=True)
    y = scale_grad(x, 3.5)
    assert torch.equal(y, x)
    (y * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(x.grad, 3.5 * torch.arange(5.0))
    with pytest.raises(ValueError, match="g must be a finite number, got nan"):
        scale_grad(x, float("nan"))
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        scale_grad([1.0], 2.0)


def test_large_batch_never_builds_pair_matrices():
    """The fast path never builds an N×P matrix: a batch whose matrix would need 8 GB runs."""
    torch.manual_seed(0)
    n, p = 1_000_000, 1000
    s = torch.randn(n, requires_grad=True)
    t = torch.zeros(n, dtype=torch.long)
    t[torch.randperm(n)[:p]] = 1
    q = torch.rand(n)
    spec = LossSpec.from_theta(torch.rand(41, generator=torch.Generator().manual_seed(0)).tolist())
    loss = pap_loss(s, t, q, spec, top_k=None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # spot-check against the twin on the positives' own gradient terms via a small sub-problem
    sub = torch.randperm(n)[:2000]
    sub = torch.cat([sub, torch.nonzero(t).squeeze(1)[:20]])
    s2 = s.detach()[sub].clone().requires_grad_()
    a = pap_loss(s2, t[sub], q[sub], spec, top_k=None)
    b = dense_pap_loss(s2.double(), t[sub], q[sub].double(), spec, top_k=None)
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    specs = [LossSpec.from_theta(torch.rand(41).tolist()), LossSpec.handcrafted("sigmoid"), LossSpec.handcrafted("sqrt")]
    s = torch.randn(5000, dtype=torch.float64)
    t = torch.where(torch.rand(5000) < 0.05, 1, torch.where(torch.rand(5000) < 0.1, -1, 0))
    q = torch.rand(5000, dtype=torch.float64)
    for spec, top_k in [(spec, top_k) for spec in specs for top_k in (None, 1000)]:
        cpu = _value_and_grads(lambda s, q: pap_loss(s, t, q, spec, top_k=top_k), s.clone().requires_grad_(),
                               q.clone().requires_grad_())
        gpu = _value_and_grads(lambda s, q: pap_loss(s, t.cuda(), q, spec, top_k=top_k),
                               s.cuda().requires_grad_(), q.cuda().requires_grad_())
        assert gpu[0].device.type == "cuda"
        _assert_same([x.cpu() for x in gpu], cpu, rtol=1e-9, atol=1e-12)
