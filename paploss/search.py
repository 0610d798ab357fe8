"""The PPO search controller: sample losses, learn from rewards, resume anywhere.

Implements SPEC §3. The controller knows nothing of detectors: a reward is a
number. One round is

    thetas = c.sample(S)             # [S, D] in [0, 1], drawn from the policy
    rewards = [train_and_eval(spec_of(theta)) for theta in thetas]   # outside
    c.update(thetas, rewards)        # one PPO update of the policy mean; sigma decays

and ``c.spec()`` is the searched loss (the final mean mu).

Layout of θ (D numbers, all in [0, 1])::

    [ θ(f_1) (8) | θ(f_2) (8) | ... | θ(f_n) (8) | θ_g (1, when grad_scale=True) ]

where ``f_1..f_n`` are the searched ``functions`` in the order given (default
``("H2", "I2", "I3", "I1", "H1")``, SPEC §1), each θ(f) the 8 numbers of SPEC §2
and θ_g the gradient scale g = 10^(2 θ_g - 1). In ``shared`` mode one θ(f) of 8
numbers serves all five places (D = 8 or 9).

A detector with several PAP-loss heads (``heads``, e.g. ``("rpn", "roi")`` for a
Faster R-CNN: :func:`paploss.spec_set.head_names`) searches one such block per head,
in the order given, and its θ is a :class:`~paploss.spec_set.SpecSet`::

    [ θ(head_1) (D_1) | θ(head_2) (D_1) | ... ]           (D = D_1 × heads, 82 for two)

The policy is the same PPO over one vector; only θ → loss reads the heads.

Policy (SPEC §3, the maths in :mod:`paploss.ppo`): independent truncated normals on [0, 1], one per number, with
mean mu = sigmoid(m), where the logits m [D] are learned, and spread sigma [D].
Everything is computed in float64: the inverse-CDF sampler clamps 2q - 1 to
±(1 - eps) and float64's eps (2.2e-16) keeps the tails of a narrow policy exact
where float32's (1.2e-7) would not.

The whole state (options, logits, sigma, round and every sampled θ and reward)
is a JSON-serialisable dict (``state_dict``), from which ``from_state_dict``
rebuilds a controller that continues exactly as the uninterrupted one would:
sampling uses a ``torch.Generator`` seeded from (seed, round) only, and each
round's update starts a fresh Adam optimiser, so (logits, sigma, round) is the
whole dynamic state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from paploss.ppo import (DTYPE, WARMUP_STEPS, clean_rewards, lr_factor, next_sigma, ppo_objective, ppo_update,
                         round_generator, truncnorm_log_prob, truncnorm_sample)

__all__ = [
    "Controller",
    "ControllerConfig",
    "RoundRecord",
    "Best",
    "STATE_FORMAT",
    "STATE_VERSION",
    "WARMUP_STEPS",
    "truncnorm_sample",
    "truncnorm_log_prob",
    "lr_factor",
    "next_sigma",
    "ppo_objective",
    "ppo_update",
    "round_generator",
    "clean_rewards",
]

STATE_FORMAT = "paploss.search.Controller"
STATE_VERSION = 1


# --------------------------------------------------------------------------
# Records and configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundRecord:
    """What one finished round saw and did (all plain lists, JSON-ready).

    ``mu``/``sigma`` [D] are the policy the θ were drawn from (before the update),
    ``thetas`` [S][D] the sampled θ, ``rewards`` [S] the rewards used (failed
    trials already replaced by ``min_reward``; their indices in ``failed``),
    ``mu_after``/``sigma_after`` [D] the policy after the update, ``loss_first``
    and ``loss_last`` the PPO loss at the first and last optimiser step.
    """

    round: int
    mu: list[float]
    sigma: list[float]
    thetas: list[list[float]]
    rewards: list[float]
    failed: list[int]
    mean_reward: float
    mu_after: list[float]
    sigma_after: list[float]
    loss_first: float
    loss_last: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "record") -> "RoundRecord":
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} must be a JSON object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"{where} lacks the field(s) {missing}")
        extra = sorted(set(d) - set(names))
        if extra:
            raise ValueError(f"{where} has unknown field(s) {extra}")
        return cls(
            round=_as_int(d["round"], f"{where}.round"),
            mu=_float_list(d["mu"], f"{where}.mu"),
            sigma=_float_list(d["sigma"], f"{where}.sigma"),
            thetas=[_float_list(t, f"{where}.thetas[{i}]") for i, t in enumerate(_as_list(d["thetas"], f"{where}.thetas"))],
            rewards=_float_list(d["rewards"], f"{where}.rewards"),
            failed=[_as_int(i, f"{where}.failed") for i in _as_list(d["failed"], f"{where}.failed")],
            mean_reward=_as_float(d["mean_reward"], f"{where}.mean_reward"),
            mu_after=_float_list(d["mu_after"], f"{where}.mu_after"),
            sigma_after=_float_list(d["sigma_after"], f"{where}.sigma_after"),
            loss_first=_as_float(d["loss_first"], f"{where}.loss_first"),
            loss_last=_as_float(d["loss_last"], f"{where}.loss_last"),
        )


@dataclass(frozen=True)
class Best:
    """The best sampled θ so far: θ [D], its reward, and where it was drawn."""

    theta: list[float]
    reward: float
    round: int
    index: int


@dataclass(frozen=True)
class ControllerConfig:
    """The fixed options of a search (everything but the learned state).

    ``functions``: the searched functions, in θ order. ``fixed``: functions not
    searched, name -> their 12 control-point numbers (x0, y0, ..., x5, y5) as
    ``paploss.spec.theta_to_points`` gives them. A function in neither (only H1
    may be left out) is the step function of SPEC §1. ``shared``: one 8-number
    function for all five places. ``grad_scale``: search the gradient scale
    (else g = 1). ``heads``: the detector's PAP-loss heads, each with its own
    block of θ (() = one loss). ``samples``: the default S of :meth:`Controller.sample`.
    ``min_reward``: the reward of a failed trial (NaN or Inf reward).
    """

    rounds: int = 40
    lr: float = 0.01
    steps: int = 100
    clip_eps: float = 0.1
    functions: tuple[str, ...] = ("H2", "I2", "I3", "I1", "H1")
    grad_scale: bool = True
    seed: int = 0
    fixed: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    shared: bool = False
    samples: int = 8
    min_reward: float = 0.0
    heads: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from paploss.spec import FUNCTIONS, validate_points

        object.__setattr__(self, "rounds", _as_int(self.rounds, "rounds", low=1))
        object.__setattr__(self, "steps", _as_int(self.steps, "steps", low=1))
        object.__setattr__(self, "samples", _as_int(self.samples, "samples", low=2))
        object.__setattr__(self, "seed", _as_int(self.seed, "seed"))
        lr = _as_float(self.lr, "lr")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        object.__setattr__(self, "lr", lr)
        eps = _as_float(self.clip_eps, "clip_eps")
        if not 0 < eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps!r}")
        object.__setattr__(self, "clip_eps", eps)
        object.__setattr__(self, "min_reward", _as_float(self.min_reward, "min_reward"))
        for name in ("grad_scale", "shared"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

        if isinstance(self.functions, str) or not isinstance(self.functions, Sequence):
            raise ValueError(f"functions must be a sequence of names from {FUNCTIONS}, got {self.functions!r}")
        functions = tuple(self.functions)
        unknown = [f for f in functions if f not in FUNCTIONS]
        if unknown:
            raise ValueError(f"functions={functions!r}: unknown name(s) {unknown}; known: {FUNCTIONS}")
        if len(set(functions)) != len(functions):
            raise ValueError(f"functions={functions!r} names a function twice")
        if not functions:
            raise ValueError("functions is empty: search at least one function (or use shared=True)")
        object.__setattr__(self, "functions", functions)
        if isinstance(self.heads, str) or not isinstance(self.heads, Sequence):
            raise ValueError(f"heads must be a sequence of head names such as ('rpn', 'roi'), got {self.heads!r}")
        heads = tuple(self.heads)
        if len(heads) == 1 or len(set(heads)) != len(heads) or not all(isinstance(h, str) and h for h in heads):
            raise ValueError(f"heads={heads!r}: give () for one loss, or two or more distinct head names")
        object.__setattr__(self, "heads", heads)

        if self.fixed is None:
            object.__setattr__(self, "fixed", {})
        if not isinstance(self.fixed, Mapping):
            raise ValueError(f"fixed must map function names to 12 control-point numbers, got {self.fixed!r}")
        fixed: dict[str, tuple[float, ...]] = {}
        for name, points in self.fixed.items():
            if name not in FUNCTIONS:
                raise ValueError(f"fixed: unknown function {name!r}; known: {FUNCTIONS}")
            if name in functions and not self.shared:
                raise ValueError(f"fixed[{name!r}]: {name} is also in functions={functions!r}; a function is either searched or fixed")
            values = _float_list(points, f"fixed[{name!r}]")
            if len(values) != 12:
                raise ValueError(f"fixed[{name!r}] must have 12 numbers (6 control points x, y), got {len(values)}")
            fixed[name] = validate_points(values, f"fixed[{name!r}]")
        # canonical order, so that equal configs compare and serialise equal
        object.__setattr__(self, "fixed", {f: fixed[f] for f in FUNCTIONS if f in fixed})

        if self.shared:
            if functions != tuple(FUNCTIONS) or fixed:
                raise ValueError(
                    "shared=True searches one function for all five places: leave functions at its default "
                    f"{tuple(FUNCTIONS)} and fixed empty (got functions={functions!r}, fixed={sorted(fixed)})"
                )
        else:
            missing = [f for f in FUNCTIONS if f not in functions and f not in fixed]
            if missing and missing != ["H1"]:
                raise ValueError(
                    f"functions={functions!r} and fixed={sorted(fixed)} leave {missing} undefined; "
                    "give every function except H1 (which may be left to the step function) as searched or fixed"
                )

    @property
    def head_dim(self) -> int:
        """The numbers of one head's θ block (D for a detector with one loss)."""
        n = 1 if self.shared else len(self.functions)
        return 8 * n + int(self.grad_scale)

    @property
    def dim(self) -> int:
        """D, the number of searched numbers: one block per head."""
        return self.head_dim * max(1, len(self.heads))

    @property
    def parameter_names(self) -> list[str]:
        """Names of the D numbers of θ, e.g. ``H2.theta1`` .. ``H1.theta8``, ``grad_scale``;
        with heads each prefixed by its head (``rpn.H2.theta1`` .. ``roi.grad_scale``)."""
        groups = ("shared",) if self.shared else self.functions
        names = [f"{g}.theta{k}" for g in groups for k in range(1, 9)]
        names += ["grad_scale"] if self.grad_scale else []
        if not self.heads:
            return names
        return [f"{h}.{n}" for h in self.heads for n in names]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["functions"] = list(self.functions)
        d["heads"] = list(self.heads)
        d["fixed"] = {k: list(v) for k, v in self.fixed.items()}
        return d


# --------------------------------------------------------------------------
# The controller
# --------------------------------------------------------------------------


class Controller:
    """PPO over θ (SPEC §3): a truncated-normal policy, its update, and its history.

    Args:
        mu: starting mean, D numbers in [0, 1] (clipped to [1e-6, 1 - 1e-6] so
            that its logit is finite). ``None``: the identity θ of SPEC §2 for
            every searched function and 0.5 (g = 1) for the gradient scale.
        sigma: starting spread, one number or D numbers, each > 0.
        rounds: R, the number of rounds over which σ decays (SPEC §3).
        lr, steps, clip_eps: Adam's learning rate, PPO steps per round, PPO's ε.
        functions: the searched functions, in θ order.
        grad_scale: also search the gradient scale (else g = 1).
        seed: sampling seed; round r draws from :func:`round_generator` (seed, r).
        fixed: functions not searched, name -> 12 control-point numbers.
        shared: one function for all five places (D = 8 + grad_scale).
        heads: the detector's PAP-loss heads (``paploss.spec_set.head_names``), one
            block of θ each; θ → loss is then a ``SpecSet``. () = one loss.
        samples: default number of samples per round.
        min_reward: the reward given to failed trials (NaN or Inf rewards).

    Any call that raises leaves the controller as it was.
    """

    def __init__(
        self,
        mu: Sequence[float] | torch.Tensor | None = None,
        sigma: float | Sequence[float] | torch.Tensor = 0.2,
        rounds: int = 40,
        lr: float = 0.01,
        steps: int = 100,
        clip_eps: float = 0.1,
        functions: Sequence[str] = ("H2", "I2", "I3", "I1", "H1"),
        grad_scale: bool = True,
        seed: int = 0,
        *,
        fixed: Mapping[str, Sequence[float]] | None = None,
        shared: bool = False,
        samples: int = 8,
        min_reward: float = 0.0,
        heads: Sequence[str] = (),
    ) -> None:
        config = ControllerConfig(
            rounds=rounds,
            lr=lr,
            steps=steps,
            clip_eps=clip_eps,
            functions=tuple(functions) if isinstance(functions, (list, tuple)) else functions,
            grad_scale=grad_scale,
            seed=seed,
            fixed=dict(fixed or {}),
            shared=shared,
            samples=samples,
            min_reward=min_reward,
            heads=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
        )
        D = config.dim
        if mu is None:
            from paploss.spec import IDENTITY_THETA8

            groups = 1 if config.shared else len(config.functions)
            block = list(IDENTITY_THETA8) * groups + [0.5] * int(config.grad_scale)
            mu_t = torch.tensor(block * max(1, len(config.heads)), dtype=DTYPE)
        else:
            mu_t = _vector(mu, "mu", D)
            bad = [(i, v) for i, v in enumerate(mu_t.tolist()) if not 0.0 <= v <= 1.0]
            if bad:
                i, v = bad[0]
                raise ValueError(f"mu[{i}] ({config.parameter_names[i]}) = {v} is outside [0, 1]")
        sigma_t = _sigma_vector(sigma, D)
        mu_t = mu_t.clamp(1e-6, 1.0 - 1e-6)
        self._config = config
        self._logits = torch.logit(mu_t)
        self._sigma = sigma_t
        self._round = 0
        self._history: list[RoundRecord] = []
        self.spec()  # fail now, not after the first round, if the fixed points are not a valid function

    # -- read-only views -------------------------------------------------------------

    @property
    def config(self) -> ControllerConfig:
        return self._config

    @property
    def mu(self) -> torch.Tensor:
        """The policy mean μ = sigmoid(m) [D] (a copy), float64 in (0, 1)."""
        return torch.sigmoid(self._logits)

    @property
    def logits(self) -> torch.Tensor:
        """The learned logits m [D] (a copy)."""
        return self._logits.clone()

    @property
    def sigma(self) -> torch.Tensor:
        """The policy spread σ [D] (a copy), float64, > 0."""
        return self._sigma.clone()

    @property
    def round(self) -> int:
        """The number of finished rounds (the next round to sample, counting from 0)."""
        return self._round

    @property
    def rounds(self) -> int:
        return self._config.rounds

    @property
    def done(self) -> bool:
        """True once all ``rounds`` rounds are finished."""
        return self._round >= self._config.rounds

    @property
    def dim(self) -> int:
        return self._config.dim

    @property
    def functions(self) -> tuple[str, ...]:
        return self._config.functions

    @property
    def parameter_names(self) -> list[str]:
        return self._config.parameter_names

    @property
    def history(self) -> tuple[RoundRecord, ...]:
        """One :class:`RoundRecord` per finished round, oldest first."""
        return tuple(self._history)

    def best(self) -> Best | None:
        """The sampled θ with the highest reward so far (the first one on ties); None before round 1."""
        best: Best | None = None
        for rec in self._history:
            for i, (theta, reward) in enumerate(zip(rec.thetas, rec.rewards)):
                if best is None or reward > best.reward:
                    best = Best(theta=list(theta), reward=reward, round=rec.round, index=i)
        return best

    # -- the search ------------------------------------------------------------------

    def sample(self, n: int | None = None) -> torch.Tensor:
        """Draw n θ from the current policy: a float64 tensor [n, D] in [0, 1].

        Deterministic in (seed, round): calling it twice in one round gives the same θ.
        ``n`` defaults to the ``samples`` option and must be at least 2 (the
        advantage is a reward minus the round's mean).
        """
        n = self._config.samples if n is None else _as_int(n, "n (the number of samples)", low=2)
        v = torch.rand((n, self.dim), generator=round_generator(self._config.seed, self._round), dtype=DTYPE)
        return truncnorm_sample(torch.sigmoid(self._logits), self._sigma, v)

    def update(self, thetas: Sequence[Sequence[float]] | torch.Tensor, rewards: Sequence[float]) -> RoundRecord:
        """One PPO round (SPEC §3) on S sampled θ [S, D] and their S rewards.

        Rewards that are NaN or ±Inf are failed trials: they count as
        ``min_reward``, with a warning naming the sample. Finite rewards so large
        that their mean, the advantages or the update overflow (``[1.7e308,
        1.7e308, 0, 0]``) raise ValueError, and the controller stays as it was. The advantage is the
        reward minus the round's mean; σ decays by :func:`next_sigma`; the logits
        take :func:`ppo_update`. Then ``round`` goes up by one. Returns the round's record.
        """
        cfg = self._config
        if self.done:
            raise RuntimeError(
                f"the search has finished all its rounds={cfg.rounds}; start a controller with more rounds to go on"
            )
        theta_t = self._check_thetas(thetas)
        S = theta_t.shape[0]
        if not isinstance(rewards, (list, tuple)) and hasattr(rewards, "tolist"):  # a torch or numpy array
            rewards = rewards.tolist()
        if isinstance(rewards, (str, bytes)) or not isinstance(rewards, Sequence):
            raise ValueError(f"rewards must be a sequence of {S} numbers, got {type(rewards).__name__}")
        if len(rewards) != S:
            raise ValueError(f"got {S} thetas but {len(rewards)} rewards: give one reward per sampled theta")
        clean, failed = clean_rewards(rewards, cfg.min_reward)
        reward_t = torch.tensor(clean, dtype=DTYPE)
        advantages = reward_t - reward_t.mean()
        if not bool(torch.isfinite(advantages).all()) or not math.isfinite(float(reward_t.mean())):
            raise ValueError(
                f"rewards {clean} overflow: their mean or the advantages (reward - mean) are not finite numbers; "
                "give rewards of a sane size (an AP is in [0, 1])"
            )
        sigma_new = next_sigma(self._sigma, self._round, cfg.rounds)
        logits_new, losses = ppo_update(
            self._logits, self._sigma, sigma_new, theta_t, advantages, lr=cfg.lr, steps=cfg.steps, clip_eps=cfg.clip_eps
        )
        if not (bool(torch.isfinite(logits_new).all()) and all(math.isfinite(x) for x in losses)):
            raise ValueError(
                f"the PPO update on rewards {clean} is not finite (the policy mean or the PPO loss overflowed); "
                "the controller is unchanged"
            )
        record = RoundRecord(
            round=self._round,
            mu=torch.sigmoid(self._logits).tolist(),
            sigma=self._sigma.tolist(),
            thetas=theta_t.tolist(),
            rewards=clean,
            failed=failed,
            mean_reward=float(reward_t.mean()),
            mu_after=torch.sigmoid(logits_new).tolist(),
            sigma_after=sigma_new.tolist(),
            loss_first=losses[0],
            loss_last=losses[-1],
        )
        # commit: nothing above touched self
        self._logits, self._sigma = logits_new, sigma_new
        self._history.append(record)
        self._round += 1
        return record

    def _check_thetas(self, thetas: Any) -> torch.Tensor:
        try:
            t = torch.as_tensor(thetas.detach() if isinstance(thetas, torch.Tensor) else thetas, dtype=DTYPE)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"thetas must be a [S, {self.dim}] array of numbers in [0, 1]: {exc}") from None
        if t.ndim != 2 or t.shape[1] != self.dim:
            raise ValueError(f"thetas must have shape [S, {self.dim}] (D for {self._describe()}), got {list(t.shape)}")
        if t.shape[0] < 2:
            raise ValueError(f"need at least 2 sampled thetas per round (advantages are reward - round mean), got {t.shape[0]}")
        bad = ~((t >= 0.0) & (t <= 1.0))  # also catches NaN
        if bool(bad.any()):
            i, k = (int(j) for j in bad.nonzero()[0])
            raise ValueError(
                f"thetas[{i}][{k}] ({self.parameter_names[k]}) = {float(t[i, k])} is outside [0, 1]"
            )
        return t.clone()

    def _describe(self) -> str:
        cfg = self._config
        what = "shared" if cfg.shared else "functions=" + ",".join(cfg.functions)
        heads = f", heads={','.join(cfg.heads)}" if cfg.heads else ""
        return f"{what}, grad_scale={cfg.grad_scale}{heads}"

    # -- θ -> loss spec --------------------------------------------------------------

    def spec(self):
        """The LossSpec of the current mean μ: the searched loss (a ``SpecSet`` with heads)."""
        return self._spec(self.mu.tolist())

    def spec_of(self, theta: Sequence[float] | torch.Tensor):
        """The LossSpec of one θ [D] (a row of :meth:`sample`); with ``heads`` a
        :class:`~paploss.spec_set.SpecSet`, head k from θ's k-th block."""
        t = _vector(theta, "theta", self.dim)
        bad = [(i, v) for i, v in enumerate(t.tolist()) if not 0.0 <= v <= 1.0]
        if bad:
            i, v = bad[0]
            raise ValueError(f"theta[{i}] ({self.parameter_names[i]}) = {v} is outside [0, 1]")
        return self._spec(t.tolist())

    def _spec(self, theta: list[float]):
        cfg = self._config
        if cfg.heads:
            from paploss.spec_set import SpecSet

            k = cfg.head_dim
            return SpecSet(tuple((h, self._head_spec(theta[i * k:(i + 1) * k])) for i, h in enumerate(cfg.heads)))
        return self._head_spec(theta)

    def _head_spec(self, theta: list[float]):
        from paploss.spec import FUNCTIONS, LossSpec, grad_scale_from_theta, theta_to_points

        cfg = self._config
        g = grad_scale_from_theta(theta[-1]) if cfg.grad_scale else 1.0
        if cfg.shared:
            return LossSpec.shared(theta_to_points(theta[:8]), g)
        points = {f: theta_to_points(theta[8 * i : 8 * i + 8]) for i, f in enumerate(cfg.functions)}
        points.update({f: list(p) for f, p in cfg.fixed.items()})
        return LossSpec.searched([points[f] for f in FUNCTIONS if f in points], g)

    # -- state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as plain JSON types."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "functions": list(self._config.functions),
            "options": self._config.to_dict(),
            "logits": self._logits.tolist(),
            "mu": self.mu.tolist(),
            "sigma": self._sigma.tolist(),
            "round": self._round,
            "history": [rec.to_dict() for rec in self._history],
        }

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        *,
        functions: Sequence[str] | None = None,
        shared: bool | None = None,
        grad_scale: bool | None = None,
    ) -> "Controller":
        """Rebuild a controller from :meth:`state_dict` (a plain dict; reading it from
        a file is the caller's: :mod:`paploss.steps.state`).

        ``functions``, ``shared``, ``grad_scale``: when given, the state must be
        for exactly that search. A corrupt state, one of another format or
        version, or one for other functions raises ValueError naming what.
        """
        _check_state_header(state)
        config = _state_config(state, functions=functions, shared=shared, grad_scale=grad_scale)
        logits, mu, sigma = _state_policy(state, config.dim)
        rnd, history = _state_history(state, config, mu, sigma)

        c = cls.__new__(cls)
        c._config = config
        c._logits = logits
        c._sigma = sigma
        c._round = rnd
        c._history = history
        c.spec()
        return c

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this controller's state by ``state``, which must be for the same functions.

        Validates everything first: on any error this controller is unchanged.
        """
        other = Controller.from_state_dict(
            state, functions=self._config.functions, shared=self._config.shared, grad_scale=self._config.grad_scale
        )
        self.__dict__.update(other.__dict__)

    def __repr__(self) -> str:
        return f"Controller({self._describe()}, D={self.dim}, round={self._round}/{self.rounds})"


# --------------------------------------------------------------------------
# Reading a state (Controller.from_state_dict)
# --------------------------------------------------------------------------


def _check_state_header(state: Any) -> None:
    """A controller state is a mapping of this module's format and version with every field."""
    if not isinstance(state, Mapping):
        raise ValueError(f"controller state must be a JSON object, got {type(state).__name__}")
    fmt = state.get("format")
    if fmt != STATE_FORMAT:
        raise ValueError(f"controller state has format={fmt!r}, expected {STATE_FORMAT!r}")
    version = state.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"controller state has version={version!r}; this paploss reads version {STATE_VERSION}")
    required = ("functions", "options", "logits", "mu", "sigma", "round", "history")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"controller state lacks the field(s) {missing}")


def _state_config(
    state: Mapping[str, Any],
    *,
    functions: Sequence[str] | None,
    shared: bool | None,
    grad_scale: bool | None,
) -> ControllerConfig:
    """The search options of a state: exactly the fields of :class:`ControllerConfig`,
    consistent with the state's ``functions`` and, where given, with the expected
    ``functions``, ``shared`` and ``grad_scale``."""
    opts = state["options"]
    if not isinstance(opts, Mapping):
        raise ValueError(f"controller state: options must be a JSON object, got {type(opts).__name__}")
    known = {f.name for f in dataclasses.fields(ControllerConfig)}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"controller state: unknown option(s) {unknown}")
    absent = sorted(known - set(opts) - {"heads"})  # states from before heads: one loss
    if absent:
        raise ValueError(f"controller state: option(s) {absent} missing")
    state_functions = _as_list(state["functions"], "functions")
    if list(opts.get("functions", state_functions)) != list(state_functions):
        raise ValueError(
            f"controller state is inconsistent: functions={state_functions} but options.functions={opts.get('functions')}"
        )
    try:
        config = ControllerConfig(**{**dict(opts), "functions": tuple(state_functions)})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"controller state: bad options: {exc}") from None
    if functions is not None and tuple(functions) != config.functions:
        raise ValueError(f"controller state is for functions={list(config.functions)}, not {list(functions)}")
    if shared is not None and shared != config.shared:
        raise ValueError(f"controller state has shared={config.shared}, not {shared}")
    if grad_scale is not None and grad_scale != config.grad_scale:
        raise ValueError(f"controller state has grad_scale={config.grad_scale}, not {grad_scale}")
    return config


def _state_policy(state: Mapping[str, Any], D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy of a state: ``logits``, ``mu`` = sigmoid(logits) and ``sigma`` > 0, D numbers each."""
    logits = _vector(state["logits"], "controller state: logits", D)
    mu = _vector(state["mu"], "controller state: mu", D)
    if not torch.allclose(torch.sigmoid(logits), mu, rtol=0.0, atol=1e-12):
        raise ValueError("controller state is inconsistent: mu is not sigmoid(logits)")
    sigma = _vector(state["sigma"], "controller state: sigma", D)
    if not bool((sigma > 0).all()):
        raise ValueError(f"controller state: sigma must be > 0, got {sigma.tolist()}")
    return logits, mu, sigma


def _state_history(
    state: Mapping[str, Any], config: ControllerConfig, mu: torch.Tensor, sigma: torch.Tensor
) -> tuple[int, list[RoundRecord]]:
    """The round of a state (at most ``config.rounds``) and its one record per past round,
    the last of which ends at the state's ``mu`` and ``sigma``."""
    D = config.dim
    rnd = _as_int(state["round"], "controller state: round", low=0)
    if rnd > config.rounds:
        raise ValueError(f"controller state: round={rnd} is beyond rounds={config.rounds}")
    history_raw = _as_list(state["history"], "controller state: history")
    if len(history_raw) != rnd:
        raise ValueError(f"controller state: round={rnd} but history has {len(history_raw)} rounds")
    history = []
    for r, raw in enumerate(history_raw):
        rec = RoundRecord.from_dict(raw, f"controller state: history[{r}]")
        _check_record(rec, r, D, f"controller state: history[{r}]")
        history.append(rec)
    if history and (history[-1].sigma_after != sigma.tolist()
                    or not torch.allclose(torch.tensor(history[-1].mu_after, dtype=DTYPE), mu, rtol=0.0, atol=1e-12)):
        raise ValueError("controller state is inconsistent: mu/sigma differ from the last round's mu_after/sigma_after")
    return rnd, history


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _check_record(rec: RoundRecord, r: int, D: int, where: str) -> None:
    if rec.round != r:
        raise ValueError(f"{where}.round = {rec.round}, expected {r}")
    for name in ("mu", "sigma", "mu_after", "sigma_after"):
        if len(getattr(rec, name)) != D:
            raise ValueError(f"{where}.{name} has {len(getattr(rec, name))} numbers, expected D={D}")
    if len(rec.thetas) < 2:
        raise ValueError(f"{where}.thetas has {len(rec.thetas)} samples, expected at least 2")
    for i, t in enumerate(rec.thetas):
        if len(t) != D or not all(0.0 <= v <= 1.0 for v in t):
            raise ValueError(f"{where}.thetas[{i}] must be {D} numbers in [0, 1]")
    if len(rec.rewards) != len(rec.thetas):
        raise ValueError(f"{where} has {len(rec.thetas)} thetas but {len(rec.rewards)} rewards")
    if any(not 0 <= i < len(rec.thetas) for i in rec.failed):
        raise ValueError(f"{where}.failed = {rec.failed} names a sample that does not exist")


def _as_int(value: Any, name: str, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def _float_list(value: Any, name: str) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().tolist()
    elif not isinstance(value, (list, tuple)) and hasattr(value, "tolist"):  # numpy
        value = value.tolist()
    return [_as_float(v, f"{name}[{i}]") for i, v in enumerate(_as_list(value, name))]


def _vector(value: Any, name: str, D: int) -> torch.Tensor:
    values = _float_list(value, name)
    if len(values) != D:
        raise ValueError(f"{name} must have D={D} numbers, got {len(values)}")
    return torch.tensor(values, dtype=DTYPE)


def _sigma_vector(sigma: Any, D: int) -> torch.Tensor:
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        s = torch.full((D,), _as_float(sigma, "sigma"), dtype=DTYPE)
    else:
        s = _vector(sigma, "sigma", D)
    bad = [(i, v) for i, v in enumerate(s.tolist()) if not v > 0]
    if bad:
        i, v = bad[0]
        raise ValueError(f"sigma must be > 0, got {sigma!r}" if isinstance(sigma, (int, float)) else f"sigma[{i}] = {v} must be > 0")
    return s
