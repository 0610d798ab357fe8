"""Tests of paploss.search (SPEC §3): the truncated-normal policy, the PPO update,
the σ schedule, resumable state and bad input.

Every fast path is compared with a slow twin: scipy.stats.truncnorm for the
policy, a per-sample Python loop for the PPO objective and a hand-scheduled
Adam loop for the update.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from paploss.search import (
    STATE_VERSION,
    Controller,
    clean_rewards,
    lr_factor,
    next_sigma,
    ppo_objective,
    ppo_update,
    round_generator,
    truncnorm_log_prob,
    truncnorm_sample,
)

F64 = torch.float64
MU = st.floats(0.005, 0.995)
SIGMA = st.floats(0.005, 3.0)


def _scipy(mu: float, sigma: float):
    return stats.truncnorm((0.0 - mu) / sigma, (1.0 - mu) / sigma, loc=mu, scale=sigma)


# ---------------------------------------------------------------------------
# The policy against scipy.stats.truncnorm
# ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(mu=st.lists(MU, min_size=1, max_size=4), data=st.data())
def test_log_prob_matches_scipy(mu, data):
    D = len(mu)
    sigma = data.draw(st.lists(SIGMA, min_size=D, max_size=D))
    x = data.draw(st.lists(st.lists(st.floats(0.0, 1.0), min_size=D, max_size=D), min_size=1, max_size=5))
    got = truncnorm_log_prob(torch.tensor(x, dtype=F64), torch.tensor(mu, dtype=F64), torch.tensor(sigma, dtype=F64))
    want = np.array([[_scipy(mu[k], sigma[k]).logpdf(row[k]) for k in range(D)] for row in x])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


def test_log_prob_is_minus_inf_outside_the_unit_interval():
    x = torch.tensor([[-1e-9, 0.0, 1.0, 1.0 + 1e-9]], dtype=F64).T.expand(4, 1).contiguous()
    lp = truncnorm_log_prob(x, torch.tensor([0.5], dtype=F64), torch.tensor([0.2], dtype=F64))
    assert lp[0, 0] == -math.inf and lp[3, 0] == -math.inf
    assert torch.isfinite(lp[1:3]).all()


def test_log_prob_gradient_matches_finite_differences():
    mu = torch.tensor([0.3, 0.8, 0.05], dtype=F64, requires_grad=True)
    sigma = torch.tensor([0.2, 0.1, 0.4], dtype=F64, requires_grad=True)
    x = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.7, 1.0]], dtype=F64)
    assert torch.autograd.gradcheck(lambda m, s: truncnorm_log_prob(x, m, s), (mu, sigma))


@settings(max_examples=60, deadline=None)
@given(mu=MU, sigma=SIGMA, v=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8))
def test_sample_is_the_inverse_cdf(mu, sigma, v):
    """x = F⁻¹(v): scipy's truncated-normal CDF of each sample gives back its uniform."""
    x = truncnorm_sample(torch.tensor([mu], dtype=F64), torch.tensor([sigma], dtype=F64), torch.tensor(v, dtype=F64)[:, None])
    assert ((x >= 0) & (x <= 1)).all()
    np.testing.assert_allclose(_scipy(mu, sigma).cdf(x[:, 0].numpy()), v, atol=1e-7)


@pytest.mark.parametrize("mu,sigma", [(0.5, 0.2), (0.05, 0.2), (0.97, 0.1), (0.3, 1.5), (0.6, 0.005)])
def test_samples_pass_a_kolmogorov_smirnov_test(mu, sigma):
    gen = torch.Generator().manual_seed(1234)
    v = torch.rand((20000, 1), generator=gen, dtype=F64)
    x = truncnorm_sample(torch.tensor([mu], dtype=F64), torch.tensor([sigma], dtype=F64), v)[:, 0].numpy()
    result = stats.kstest(x, _scipy(mu, sigma).cdf)
    assert result.pvalue > 0.01, (mu, sigma, result)
    # and a test with power: the untruncated normal is rejected where truncation matters
    if mu < 0.1 or mu > 0.9:
        assert stats.kstest(x, stats.norm(mu, sigma).cdf).pvalue < 1e-6


def test_controller_samples_pass_a_kolmogorov_smirnov_test():
    c = Controller(mu=[0.1, 0.5, 0.9] * 3, sigma=0.2, shared=True)
    x = c.sample(4000)
    for k in range(9):
        assert stats.kstest(x[:, k].numpy(), _scipy(float(c.mu[k]), 0.2).cdf).pvalue > 0.001, k


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


def test_lr_factor_is_the_spec_schedule():
    f = [lr_factor(t, 100) for t in range(100)]
    assert f[0] == 0.0 and f[15] == pytest.approx(0.5) and f[30] == 1.0
    assert f[31] == pytest.approx(1 - 1 / 70) and f[99] == pytest.approx(1 - 69 / 70)
    assert all(a < b for a, b in zip(f[:30], f[1:31])) and all(a > b for a, b in zip(f[30:99], f[31:]))


@pytest.mark.parametrize("rounds", [1, 2, 5, 40])
def test_sigma_schedule_decays_linearly_and_never_reaches_zero(rounds):
    s0 = torch.tensor([0.2, 0.05], dtype=F64)
    s = s0
    seen = []
    for r in range(rounds):
        s = next_sigma(s, r, rounds)
        seen.append(s)
    for r, sr in enumerate(seen[:-1]):
        torch.testing.assert_close(sr, s0 * (rounds - r - 1) / rounds, rtol=1e-12, atol=0)
    assert (seen[-1] > 0).all()
    torch.testing.assert_close(seen[-1], s0 / rounds if rounds > 1 else s0, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="round r=5"):
        next_sigma(s0, 5, 5)


def test_controller_sigma_follows_the_schedule():
    c = Controller(rounds=4, steps=3, sigma=0.2)
    sigmas = [float(c.sigma[0])]
    for _ in range(4):
        c.update(c.sample(2), [0.0, 1.0])
        sigmas.append(float(c.sigma[0]))
    assert sigmas == pytest.approx([0.2, 0.15, 0.1, 0.05, 0.05], rel=1e-12)
    assert c.done


# ---------------------------------------------------------------------------
# The PPO objective and update against slow twins
# ---------------------------------------------------------------------------


def slow_ppo_objective(logp_new, logp_old, advantages, clip_eps):
    """Per sample, per number, in plain Python control flow (the SPEC's formulas as written)."""
    lo, hi = math.log(1 - clip_eps), math.log(1 + clip_eps)
    terms = []
    for i in range(logp_new.shape[0]):
        total = logp_new.new_zeros(())
        total_clipped = logp_new.new_zeros(())
        for k in range(logp_new.shape[1]):
            d = logp_new[i, k] - logp_old[i, k]
            total = total + d
            if d < lo:
                total_clipped = total_clipped + lo
            elif d > hi:
                total_clipped = total_clipped + hi
            else:
                total_clipped = total_clipped + d
        a = torch.exp(total) * advantages[i]
        b = torch.exp(total_clipped) * advantages[i]
        terms.append(a if a <= b else b)
    return -sum(terms) / len(terms)


@settings(max_examples=80, deadline=None)
@given(
    S=st.integers(2, 6),
    D=st.integers(1, 6),
    spread=st.sampled_from([0.01, 0.1, 1.0]),
    clip_eps=st.floats(0.01, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_ppo_objective_matches_slow_twin_in_value_and_gradient(S, D, spread, clip_eps, seed):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(S, D, generator=gen, dtype=F64)
    new = (old + spread * torch.randn(S, D, generator=gen, dtype=F64)).requires_grad_(True)
    adv = torch.randn(S, generator=gen, dtype=F64)
    fast = ppo_objective(new, old, adv, clip_eps)
    (g_fast,) = torch.autograd.grad(fast, new)
    new2 = new.detach().clone().requires_grad_(True)
    slow = slow_ppo_objective(new2, old, adv, clip_eps)
    # when every sample takes its fully clipped (constant) term, the slow sum has no graph: gradient 0
    g_slow = torch.autograd.grad(slow, new2)[0] if slow.requires_grad else torch.zeros_like(new2)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-12, atol=1e-12)


def slow_ppo_update(logits, sigma_old, sigma_new, thetas, adv, lr, steps, clip_eps):
    """Adam with the learning rate set by hand each step, log-probs through scipy-free formulas."""
    m = logits.clone().requires_grad_(True)
    with torch.no_grad():
        old = truncnorm_log_prob(thetas, torch.sigmoid(m), sigma_old)
    opt = torch.optim.Adam([m], lr=lr)
    for t in range(steps):
        factor = t / 30 if t <= 30 else 1 - (t - 30) / (steps - 30)
        for group in opt.param_groups:
            group["lr"] = lr * factor
        loss = slow_ppo_objective(truncnorm_log_prob(thetas, torch.sigmoid(m), sigma_new), old, adv, clip_eps)
        opt.zero_grad()
        if loss.requires_grad:
            loss.backward()
        else:  # every sample took its fully clipped, constant term: the gradient is zero
            m.grad = torch.zeros_like(m)
        opt.step()
    return m.detach()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), S=st.integers(2, 5), D=st.integers(1, 4))
def test_ppo_update_matches_slow_twin(seed, S, D):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(D, generator=gen, dtype=F64)
    sigma_old = 0.05 + 0.3 * torch.rand(D, generator=gen, dtype=F64)
    sigma_new = sigma_old * 0.9
    thetas = torch.rand(S, D, generator=gen, dtype=F64)
    adv = torch.randn(S, generator=gen, dtype=F64)
    fast, losses = ppo_update(logits, sigma_old, sigma_new, thetas, adv, lr=0.01, steps=40, clip_eps=0.1)
    slow = slow_ppo_update(logits, sigma_old, sigma_new, thetas, adv, 0.01, 40, 0.1)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    assert len(losses) == 40


def test_ppo_update_does_not_modify_its_input():
    logits = torch.zeros(3, dtype=F64)
    ppo_update(logits, torch.full((3,), 0.2, dtype=F64), torch.full((3,), 0.1, dtype=F64),
               torch.rand(4, 3, dtype=F64), torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=F64), steps=5)
    assert torch.equal(logits, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("seed", range(4))
def test_update_makes_above_mean_samples_more_likely(seed):
    """Hand-made round: θ_i = μ + 0.08 s_i v along a random direction v, reward s_i.

    After one update, at the same (new) σ so that only the move of μ counts,
    the samples above the mean reward are more likely and those below less likely.
    """
    c = Controller(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(c.dim, generator=gen, dtype=F64)
    v = v / v.abs().max()
    s = torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=F64)
    thetas = c.mu + 0.08 * s[:, None] * v
    rewards = (0.3 + 0.05 * s).tolist()
    mu_old = c.mu
    c.update(thetas, rewards)
    gain = truncnorm_log_prob(thetas, c.mu, c.sigma).sum(1) - truncnorm_log_prob(thetas, mu_old, c.sigma).sum(1)
    assert (gain[s > 0] > 0).all() and (gain[s < 0] < 0).all(), gain


@pytest.mark.parametrize("seed", range(6))
def test_update_raises_the_advantage_weighted_likelihood(seed):
    """Sampled θ, random rewards: Σ_i A_i Δlog p(θ_i) > 0 (μ moves towards the better samples)
    and the PPO surrogate loss goes down over the 100 steps."""
    c = Controller(seed=seed)
    thetas = c.sample(8)
    rewards = torch.rand(8, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
    mu_old = c.mu
    rec = c.update(thetas, rewards.tolist())
    gain = truncnorm_log_prob(thetas, c.mu, c.sigma).sum(1) - truncnorm_log_prob(thetas, mu_old, c.sigma).sum(1)
    assert float(((rewards - rewards.mean()) * gain).sum()) > 0
    assert rec.loss_last < rec.loss_first


def test_equal_rewards_leave_mu_unchanged():
    c = Controller(seed=1)
    mu = c.mu
    c.update(c.sample(4), [0.5] * 4)
    torch.testing.assert_close(c.mu, mu, rtol=0, atol=1e-15)


def test_toy_search_moves_mu_towards_the_optimum():
    """reward = -‖θ - θ*‖²: 20 rounds of 8 samples bring μ measurably closer to θ*."""
    gen = torch.Generator().manual_seed(7)
    c = Controller(rounds=20, seed=11)
    target = 0.15 + 0.7 * torch.rand(c.dim, generator=gen, dtype=F64)
    start = float(((c.mu - target) ** 2).sum())
    for _ in range(20):
        thetas = c.sample(8)
        c.update(thetas, (-((thetas - target) ** 2).sum(1)).tolist())
    end = float(((c.mu - target) ** 2).sum())
    assert end < 0.8 * start, (start, end)


def test_toy_search_square_target_is_the_piecewise_linear_square():
    """``bench.toy_search --target square``: θ* puts all five functions through
    (x, x²) at the identity's x positions with gradient scale 1, and the reported
    start distance is ‖identity − θ*‖²."""
    from bench.toy_search import run_seed
    from paploss.spec import IDENTITY_THETA8, form_theta, grad_scale_from_theta, theta_to_points

    theta = form_theta("square")
    assert len(theta) == 41
    for k in range(5):
        pts = theta_to_points(theta[8 * k: 8 * k + 8])
        xs, ys = pts[0::2], pts[1::2]
        assert xs == pytest.approx((0.0, 0.2, 0.4, 0.6, 0.8, 1.0))
        assert ys == pytest.approx(tuple(x * x for x in xs))
    assert grad_scale_from_theta(theta[-1]) == pytest.approx(1.0)
    identity = list(IDENTITY_THETA8) * 5 + [0.5]
    assert form_theta("linear") == pytest.approx(identity)
    assert form_theta("sqrt", functions=1, grad_scale=False)[:2] == pytest.approx([0.2, math.sqrt(0.2)])
    with pytest.raises(ValueError, match="sigmoid"):
        form_theta("sigmoid")  # sigmoid(2x - 1) is not 0 at 0: no searched function is it
    res = run_seed(0, rounds=1, samples=2, target="square", sigma=0.1)
    assert res["start"] == pytest.approx(sum((a - b) ** 2 for a, b in zip(identity, theta)))
    assert len(res["curve"]) == 2
    # the same search by hand: sample, reward -‖θ - θ*‖², update; best and moved from it
    c = Controller(rounds=1, seed=0, sigma=0.1)
    thetas = c.sample(2)
    target = torch.tensor(theta, dtype=F64)
    c.update(thetas, (-((thetas - target) ** 2).sum(1)).tolist())
    assert res["best_sample"] == pytest.approx(-c.best().reward)
    assert res["moved"] == pytest.approx(float(torch.linalg.vector_norm(c.mu - torch.tensor(identity, dtype=F64))),
                                         abs=1e-6)
    # on pure noise μ still moves (the drift a real search's travel is compared with)
    drift = run_seed(0, rounds=2, samples=2, target="square", sigma=0.1, reward="noise")
    assert drift["moved"] > 0.0 and drift["start"] == pytest.approx(res["start"])
    with pytest.raises(ValueError, match="reward"):
        run_seed(0, rounds=1, samples=2, reward="bogus")


def test_toy_search_shared_space_targets_one_square_function():
    """``bench.toy_search --shared``: D = 9, θ* is one piecewise-linear square plus
    gradient scale 1, and the same search by hand gives the same distances."""
    from bench.toy_search import run_seed
    from paploss.spec import IDENTITY_THETA8, form_theta

    theta = form_theta("square", functions=1)
    identity = list(IDENTITY_THETA8) + [0.5]
    res = run_seed(3, rounds=2, samples=3, target="square", sigma=0.1, shared=True)
    assert res["dim"] == 9
    assert res["start"] == pytest.approx(sum((a - b) ** 2 for a, b in zip(identity, theta)))
    c = Controller(rounds=2, seed=3, sigma=0.1, shared=True)
    target = torch.tensor(theta, dtype=F64)
    for _ in range(2):
        thetas = c.sample(3)
        c.update(thetas, (-((thetas - target) ** 2).sum(1)).tolist())
    assert res["end"] == pytest.approx(float(((c.mu - target) ** 2).sum()))
    assert res["end"] != pytest.approx(res["start"])  # the search moved


# ---------------------------------------------------------------------------
# Reproducibility and resume
# ---------------------------------------------------------------------------


def _reward(thetas):
    target = torch.linspace(0.1, 0.9, thetas.shape[1], dtype=F64)
    return (-((thetas - target) ** 2).sum(1)).tolist()


def test_sampling_is_reproducible_per_seed_and_round():
    a, b = Controller(seed=5), Controller(seed=5)
    assert torch.equal(a.sample(8), b.sample(8))
    assert torch.equal(a.sample(8), a.sample(8))
    assert not torch.equal(a.sample(8), Controller(seed=6).sample(8))
    g1, g2 = round_generator(5, 0), round_generator(5, 1)
    assert not torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_resume_from_state_dict_equals_uninterrupted_run(stop_after):
    kw = dict(rounds=5, steps=20, seed=9)
    full = Controller(**kw)
    samples_full = []
    for _ in range(5):
        t = full.sample(4)
        samples_full.append(t)
        full.update(t, _reward(t))

    part = Controller(**kw)
    samples_part = []
    for _ in range(stop_after):
        t = part.sample(4)
        samples_part.append(t)
        part.update(t, _reward(t))
    text = json.dumps(part.state_dict())  # through JSON, as a crash would force
    del part
    resumed = Controller.from_state_dict(json.loads(text))
    assert resumed.round == stop_after
    for _ in range(stop_after, 5):
        t = resumed.sample(4)
        samples_part.append(t)
        resumed.update(t, _reward(t))

    for a, b in zip(samples_full, samples_part):
        assert torch.equal(a, b)
    assert torch.equal(full.mu, resumed.mu)
    assert torch.equal(full.sigma, resumed.sigma)
    assert full.state_dict() == resumed.state_dict()


def test_save_and_load_round_trip(tmp_path):
    # the controller takes and returns plain dicts; the steps' state module does the files
    from paploss.steps.state import load_controller, save_controller

    c = Controller(rounds=3, steps=5)
    c.update(c.sample(), _reward(c.sample()))
    path = tmp_path / "state" / "controller.json"
    save_controller(str(path), c)
    d = load_controller(str(path))
    assert d.state_dict() == c.state_dict()
    assert not hasattr(Controller, "save") and not hasattr(Controller, "load")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="controller.json"):
        load_controller(str(path))


def test_history_and_best():
    c = Controller(rounds=3, steps=5)
    assert c.best() is None and c.history == ()
    rewards = [[0.1, 0.3, 0.2], [0.25, 0.35, 0.35]]
    drawn = []
    for r in rewards:
        t = c.sample(3)
        drawn.append(t)
        rec = c.update(t, r)
        assert rec.rewards == r and rec.thetas == t.tolist()
    assert [h.round for h in c.history] == [0, 1]
    assert c.history[0].mu_after == c.history[1].mu
    assert c.history[1].mu_after == c.mu.tolist()
    best = c.best()
    assert (best.round, best.index, best.reward) == (1, 1, 0.35)
    assert best.theta == drawn[1][1].tolist()


# ---------------------------------------------------------------------------
# Options: fixed functions, shared mode, no gradient scale -> loss specs
# ---------------------------------------------------------------------------


def test_default_dimension_and_spec_agree_with_loss_spec_from_theta():
    from paploss.spec import IDENTITY_THETA8, LossSpec

    c = Controller()
    assert c.dim == 41 and len(c.parameter_names) == 41 and c.parameter_names[-1] == "grad_scale"
    torch.testing.assert_close(c.mu, torch.tensor(list(IDENTITY_THETA8) * 5 + [0.5], dtype=F64), rtol=0, atol=1e-12)
    theta = c.sample(2)[1]
    assert c.spec_of(theta).to_dict() == LossSpec.from_theta(theta.tolist()).to_dict()


@pytest.mark.parametrize(
    "kwargs,dim",
    [
        (dict(grad_scale=False), 40),
        (dict(functions=("H2", "I2", "I3", "I1")), 33),
        (dict(functions=("H2", "I2", "I3", "I1"), grad_scale=False), 32),
        (dict(shared=True), 9),
        (dict(shared=True, grad_scale=False), 8),
    ],
)
def test_dimensions_match_loss_spec_from_theta(kwargs, dim):
    from paploss.spec import LossSpec

    c = Controller(**kwargs)
    assert c.dim == dim
    theta = c.sample(2)[0]
    assert c.spec_of(theta).to_dict() == LossSpec.from_theta(theta.tolist()).to_dict()


def test_fixed_functions_keep_their_points():
    from paploss.spec import theta_to_points

    h1 = theta_to_points([0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    c = Controller(functions=("H2", "I2", "I3", "I1"), fixed={"H1": h1})
    assert c.dim == 33
    spec_a = c.spec_of(c.sample(2)[0]).to_dict()
    spec_b = c.spec_of(c.sample(2)[1]).to_dict()
    assert spec_a != spec_b
    full = Controller()
    theta = torch.cat([c.sample(2)[0][:32], torch.tensor([0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=F64), c.sample(2)[0][32:]])
    assert c.spec_of(c.sample(2)[0]).to_dict() == full.spec_of(theta).to_dict()


def test_grad_scale_off_gives_unit_gradient_scale():
    c = Controller(grad_scale=False)
    d = c.spec_of(c.sample(2)[0]).to_dict()
    assert json.dumps(d)  # JSON-ready
    full = Controller()
    theta = torch.cat([c.sample(2)[0], torch.tensor([0.5], dtype=F64)])
    assert d == full.spec_of(theta).to_dict()


# ---------------------------------------------------------------------------
# Bad input: clear errors, state unchanged
# ---------------------------------------------------------------------------


def test_non_finite_rewards_count_as_failed_trials_with_a_warning():
    c = Controller(rounds=3, steps=5, min_reward=-1.0)
    t = c.sample(4)
    with pytest.warns(RuntimeWarning) as caught:
        rec = c.update(t, [0.2, float("nan"), 0.3, float("inf")])
    messages = [str(w.message) for w in caught]
    assert any("sample 1" in m and "nan" in m for m in messages)
    assert any("sample 3" in m and "inf" in m for m in messages)
    assert rec.rewards == [0.2, -1.0, 0.3, -1.0] and rec.failed == [1, 3]
    json.dumps(c.state_dict(), allow_nan=False)  # strict JSON: no NaN leaks into the state


def test_clean_rewards_passes_finite_rewards_through_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clean_rewards([1, 2.5, -3]) == ([1.0, 2.5, -3.0], [])


def _bad_updates(c):
    t = c.sample(4)
    D = c.dim
    return [
        (lambda: c.update(t[:, :-1], [0.0] * 4), "shape"),
        (lambda: c.update(t[0], [0.0]), "shape"),
        (lambda: c.update(t[:1], [0.0]), "at least 2"),
        (lambda: c.update(t, [0.0] * 3), "4 thetas but 3 rewards"),
        (lambda: c.update(t, ["a", 0, 0, 0]), r"rewards\[0\]"),
        (lambda: c.update(t, 0.5), "rewards must be a sequence"),
        (lambda: c.update(torch.cat([t[:3], torch.full((1, D), 1.5, dtype=F64)]), [0.0] * 4), r"thetas\[3\]\[0\].*1.5.*outside"),
        (lambda: c.update(torch.cat([t[:3], torch.full((1, D), -0.1, dtype=F64)]), [0.0] * 4), "outside"),
        (lambda: c.update(torch.full((4, D), float("nan"), dtype=F64), [0.0] * 4), "outside"),
        (lambda: c.update("garbage", [0.0] * 4), "thetas"),
        (lambda: c.sample(1), "at least|>= 2"),
        (lambda: c.spec_of([0.5] * (D + 1)), "D=41"),
        (lambda: c.spec_of([2.0] * D), "outside"),
    ]


def test_bad_updates_raise_clear_errors_and_leave_the_state_unchanged():
    c = Controller(rounds=3, steps=5)
    c.update(c.sample(), _reward(c.sample()))
    before = copy.deepcopy(c.state_dict())
    for call, match in _bad_updates(c):
        with pytest.raises(ValueError, match=match):
            call()
        assert c.state_dict() == before


def test_update_after_the_last_round_raises():
    c = Controller(rounds=1, steps=2)
    c.update(c.sample(), _reward(c.sample()))
    before = c.state_dict()
    with pytest.raises(RuntimeError, match="rounds=1"):
        c.update(c.sample(), _reward(c.sample()))
    assert c.state_dict() == before


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mu=[0.5] * 40), "D=41"),
        (dict(mu=[1.5] + [0.5] * 40), r"mu\[0\]"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=[0.2] * 3), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(rounds=0), "rounds"),
        (dict(steps=0), "steps"),
        (dict(lr=-1.0), "lr"),
        (dict(clip_eps=1.0), "clip_eps"),
        (dict(functions=("H2", "XX")), "XX"),
        (dict(functions=("H2", "H2", "I2", "I3", "I1")), "twice"),
        (dict(functions=("H2", "I2")), r"\['I3', 'I1'"),
        (dict(functions=("H2", "I2", "I3", "I1"), fixed={"H1": [0.5] * 11}), "12 numbers"),
        (dict(fixed={"H1": [0.0] * 12}), "either searched or fixed"),
        (dict(fixed={"ZZ": [0.0] * 12}), "ZZ"),
        (dict(functions=("H2", "I2", "I3", "I1"), fixed={"H1": [0, 0, .5, .5, .4, .4, .6, .6, .8, .8, 1, 1]}), r"fixed\['H1'\].*decrease"),
        (dict(shared=True, functions=("H2",)), "shared"),
        (dict(samples=1), "samples"),
        (dict(seed=1.5), "seed"),
        (dict(min_reward=float("nan")), "min_reward"),
        (dict(grad_scale="yes"), "grad_scale"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Controller(**kwargs)


def _state_after_one_round():
    c = Controller(rounds=3, steps=5)
    c.update(c.sample(), _reward(c.sample()))
    return c, c.state_dict()


def _corrupt(state, path, value):
    s = copy.deepcopy(state)
    *head, last = path
    target = s
    for k in head:
        target = target[k]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return s


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("version",), STATE_VERSION + 1, "version"),
        (("format",), "something else", "format"),
        (("logits",), KeyError, "logits"),
        (("logits",), [0.0] * 40, "D=41"),
        (("logits",), ["x"] * 41, "logits"),
        (("mu", 0), 0.9, "mu is not sigmoid"),
        (("sigma", 0), -0.1, "sigma"),
        (("round",), 2, "history"),
        (("round",), -1, "round"),
        (("round",), 7, "beyond"),
        (("functions",), ["H2", "I2", "I3", "I1"], "inconsistent"),
        (("options", "functions"), ["H2", "I2", "I3", "I1"], "inconsistent"),
        (("options", "rounds"), 0, "rounds"),
        (("options", "colour"), "red", "colour"),
        (("options", "min_reward"), KeyError, "min_reward"),
        (("history", 0, "thetas", 0, 0), 3.0, r"thetas\[0\]"),
        (("history", 0, "rewards"), [0.0], "rewards"),
        (("history", 0, "round"), 4, "round"),
        (("history", 0, "sigma_after", 0), 0.5, "inconsistent"),
        (("history", 0, "mu"), KeyError, "mu"),
        (("history",), "nope", "history"),
    ],
)
def test_corrupt_states_are_rejected_and_leave_the_controller_unchanged(path, value, match):
    c, state = _state_after_one_round()
    bad = _corrupt(state, path, value)
    with pytest.raises(ValueError, match=match):
        Controller.from_state_dict(bad)
    target = Controller(rounds=3, steps=5)
    before = target.state_dict()
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(bad)
    assert target.state_dict() == before


def test_states_for_other_functions_are_rejected():
    c, state = _state_after_one_round()
    with pytest.raises(ValueError, match="functions"):
        Controller.from_state_dict(state, functions=("H2", "I2", "I3", "I1"))
    other = Controller(functions=("H2", "I2", "I3", "I1"), rounds=3, steps=5)
    before = other.state_dict()
    with pytest.raises(ValueError, match="functions"):
        other.load_state_dict(state)
    assert other.state_dict() == before
    shared = Controller(shared=True)
    with pytest.raises(ValueError, match="shared"):
        shared.load_state_dict(state)
    with pytest.raises(ValueError, match="JSON object"):
        Controller.from_state_dict("{")
    with pytest.raises(ValueError, match="JSON object"):
        Controller.from_state_dict([1, 2])


def test_load_state_dict_takes_the_whole_state():
    c, state = _state_after_one_round()
    fresh = Controller(rounds=3, steps=5)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert torch.equal(fresh.sample(4), c.sample(4))


def test_numpy_and_list_inputs_give_the_same_round_as_tensors():
    a, b = Controller(rounds=2, steps=10), Controller(rounds=2, steps=10)
    t = a.sample(4)
    r = _reward(t)
    a.update(t, torch.tensor(r, dtype=F64))
    b.update(t.numpy(), np.array(r))
    assert a.state_dict() == b.state_dict()
    c = Controller(rounds=2, steps=10)
    c.update(t.tolist(), r)
    assert c.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match=r"rewards\[0\]"):
        Controller().update(t, np.array(r)[:, None])


def test_functions_in_another_order_map_theta_by_name():
    order = ("I1", "H2", "H1", "I3", "I2")
    c = Controller(functions=order)
    full = Controller()
    theta = c.sample(2)[0]
    blocks = {f: theta[8 * i: 8 * i + 8] for i, f in enumerate(order)}
    canonical = torch.cat([blocks[f] for f in ("H2", "I2", "I3", "I1", "H1")] + [theta[-1:]])
    assert c.spec_of(theta).to_dict() == full.spec_of(canonical).to_dict()
    assert c.parameter_names[:2] == ["I1.theta1", "I1.theta2"]


def test_starting_spec_is_the_identity_with_unit_gradient_scale():
    spec = Controller().spec().to_dict()
    assert spec["form"] == "searched" and spec["grad_scale"] == pytest.approx(1.0, abs=1e-12)
    for points in spec["points"]:
        np.testing.assert_allclose(points, [0, 0, .2, .2, .4, .4, .6, .6, .8, .8, 1, 1], atol=1e-12)
