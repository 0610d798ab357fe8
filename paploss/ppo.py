"""PPO over a vector in [0, 1]^D: the policy and its update (SPEC §3).

The policy is an independent truncated normal on [0, 1] per number, mean
mu = sigmoid(m) with learned logits m and spread sigma; a round samples by inverse
CDF, and the update is 100 Adam steps on the clipped PPO objective with a warm-up
and linear decay of the learning rate, after which sigma decays linearly to zero over
the rounds. Everything is float64 (the sampler's tails need float64's eps). These
are pure functions of tensors; :class:`paploss.search.Controller` keeps the state.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Sequence

import torch

__all__ = ["DTYPE", "WARMUP_STEPS", "truncnorm_sample", "truncnorm_log_prob", "lr_factor", "next_sigma",
           "ppo_objective", "ppo_update", "round_generator", "clean_rewards"]

#: SPEC §3: the learning rate warms up linearly over the first 30 PPO steps.
WARMUP_STEPS = 30
DTYPE = torch.float64
_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------
# The policy: a truncated normal on [0, 1] per number (SPEC §3)
# --------------------------------------------------------------------------


def _std_normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Φ(z) = (1 + erf(z / √2)) / 2, elementwise."""
    return 0.5 * (1.0 + torch.erf(z / _SQRT2))


def truncnorm_sample(mu: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Draw from N(mu, sigma²) truncated to [0, 1] by the inverse CDF (SPEC §3).

    With a = (0 - mu)/sigma, b = (1 - mu)/sigma and uniforms v ∈ [0, 1)::

        q = Φ(a) + v (Φ(b) - Φ(a))
        x = clamp(mu + sigma √2 erfinv(clamp(2q - 1, -1 + eps, 1 - eps)), 0, 1)

    Shapes: mu [D], sigma [D], v [S, D] -> x [S, D]. ``eps`` is the machine
    epsilon of v's dtype. Pure: all randomness is in ``v``.
    """
    mu, sigma = mu.to(v.dtype), sigma.to(v.dtype)
    a = (0.0 - mu) / sigma
    b = (1.0 - mu) / sigma
    cdf_a = _std_normal_cdf(a)
    q = cdf_a + v * (_std_normal_cdf(b) - cdf_a)
    eps = torch.finfo(v.dtype).eps
    x = mu + sigma * _SQRT2 * torch.erfinv(torch.clamp(2.0 * q - 1.0, -1.0 + eps, 1.0 - eps))
    return torch.clamp(x, 0.0, 1.0)


def truncnorm_log_prob(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Log density of N(mu, sigma²) truncated to [0, 1] (SPEC §3)::

        log p(x) = log φ((x - mu)/sigma) - log sigma - log(Φ(b) - Φ(a)),   x ∈ [0, 1]
        log p(x) = -inf                                                     otherwise

    with log φ(z) = -z²/2 - log √(2π), a = -mu/sigma, b = (1 - mu)/sigma.
    Shapes: x [S, D], mu [D], sigma [D] -> [S, D]. Differentiable in mu and sigma.
    """
    z = (x - mu) / sigma
    a = (0.0 - mu) / sigma
    b = (1.0 - mu) / sigma
    log_z = torch.log(_std_normal_cdf(b) - _std_normal_cdf(a))
    logp = -0.5 * z * z - _LOG_SQRT_2PI - torch.log(sigma) - log_z
    inside = (x >= 0.0) & (x <= 1.0)
    return torch.where(inside, logp, torch.full_like(logp, -math.inf))


# --------------------------------------------------------------------------
# Schedules (SPEC §3)
# --------------------------------------------------------------------------


def lr_factor(t: int, steps: int = 100) -> float:
    """Learning-rate factor of PPO step t (counting from 0) out of ``steps``::

        t / 30                         for t <= 30
        1 - (t - 30) / (steps - 30)    for t > 30

    With the SPEC's 100 steps: 0, 1/30, ..., 1 at t = 30, then down by 1/70 a step.
    """
    if t <= WARMUP_STEPS:
        return t / WARMUP_STEPS
    return 1.0 - (t - WARMUP_STEPS) / (steps - WARMUP_STEPS)


def next_sigma(sigma: torch.Tensor, r: int, rounds: int) -> torch.Tensor:
    """σ after round r (counting from 0) of R = ``rounds``: σ · (R - r - 1)/(R - r).

    σ decays linearly to zero over R rounds; on the last round, where the factor
    is 0, σ is kept, so it never becomes 0 (SPEC §3). Shapes: [D] -> [D].
    """
    if not 0 <= r < rounds:
        raise ValueError(f"round r={r} is outside the search's rounds 0..{rounds - 1}")
    factor = (rounds - r - 1) / (rounds - r)
    return sigma.clone() if factor == 0 else sigma * factor


# --------------------------------------------------------------------------
# The PPO update (SPEC §3)
# --------------------------------------------------------------------------


def ppo_objective(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.1
) -> torch.Tensor:
    """The clipped PPO loss of SPEC §3, to be minimised.

    With δ = logp_new - logp_old per number (shapes [S, D]) and advantages A [S]::

        ratio_i   = exp(Σ_k δ_ik)
        clipped_i = exp(Σ_k clamp(δ_ik, log(1 - ε), log(1 + ε)))
        loss      = -mean_i min(ratio_i A_i, clipped_i A_i)

    Returns a scalar. (The clamp is per number, as in the paper's reference, not
    on the product ratio.)
    """
    delta = logp_new - logp_old
    ratio = torch.exp(delta.sum(dim=1))
    clipped = torch.exp(torch.clamp(delta, math.log(1.0 - clip_eps), math.log(1.0 + clip_eps)).sum(dim=1))
    return -torch.minimum(ratio * advantages, clipped * advantages).mean()


def ppo_update(
    logits: torch.Tensor,
    sigma_old: torch.Tensor,
    sigma_new: torch.Tensor,
    thetas: torch.Tensor,
    advantages: torch.Tensor,
    *,
    lr: float = 0.01,
    steps: int = 100,
    clip_eps: float = 0.1,
) -> tuple[torch.Tensor, list[float]]:
    """One round's PPO update of the logits m [D]; returns (new logits [D], losses [steps]).

    Old log-probabilities use the old mean sigmoid(m) and ``sigma_old``; new ones the
    current mean and ``sigma_new``. ``torch.optim.Adam`` (lr) on a copy of m for
    ``steps`` steps, ``LambdaLR`` with :func:`lr_factor`, the scheduler stepped
    after each optimiser step (so step t runs at lr · lr_factor(t)).
    Shapes: thetas [S, D] in [0, 1], advantages [S]. The input ``logits`` is not modified.
    """
    m = logits.detach().clone().requires_grad_(True)
    with torch.no_grad():
        logp_old = truncnorm_log_prob(thetas, torch.sigmoid(m), sigma_old)
    optimizer = torch.optim.Adam([m], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda t: lr_factor(t, steps))
    losses: list[float] = []
    for _ in range(steps):
        loss = ppo_objective(truncnorm_log_prob(thetas, torch.sigmoid(m), sigma_new), logp_old, advantages, clip_eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return m.detach(), losses


def round_generator(seed: int, round: int) -> torch.Generator:
    """The CPU generator that draws round ``round`` of search ``seed``.

    Seeded from a hash of (seed, round) alone, so the same seed and round give
    the same θ in any process, also after ``Controller.from_state_dict``.
    """
    digest = hashlib.sha256(f"paploss.search:{int(seed)}:{int(round)}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def clean_rewards(rewards: Sequence[float], min_reward: float = 0.0) -> tuple[list[float], list[int]]:
    """Rewards as floats, NaN and ±Inf replaced by ``min_reward`` (failed trials).

    Returns (rewards, indices of the failed samples) and warns once per failed
    sample, naming its index and value.
    """
    out: list[float] = []
    failed: list[int] = []
    for i, value in enumerate(rewards):
        try:
            r = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"rewards[{i}]={value!r} is not a number") from None
        if not math.isfinite(r):
            warnings.warn(
                f"reward of sample {i} is {r}: counted as a failed trial with min_reward={min_reward}",
                RuntimeWarning,
                stacklevel=3,
            )
            failed.append(i)
            r = float(min_reward)
        out.append(r)
    return out, failed
