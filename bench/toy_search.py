"""Toy search: does the PPO controller (SPEC §3) find a known optimum?

The reward of θ is -‖θ - θ*‖² for a hidden θ* (D = 41, the RetinaNet search
space): with ``--target random`` (the default) θ* is drawn uniformly in
[0.1, 0.9]^D per seed; with ``--target square`` or ``sqrt`` it is the piecewise-linear
form of that handcrafted loss (all five functions through (x, f(x)) at x = 0.2,
0.4, 0.6, 0.8, gradient scale 1), which answers "how close to ``square`` can a
search of this size get, with a perfect, noise-free reward?". ``--shared`` searches
the shared space instead (one function for all five places, D = 9). Each seed runs
``--rounds`` rounds of ``--samples`` samples with the default controller (σ =
``--sigma``, Adam lr 0.01 for 100 steps, ε = 0.1) and the σ schedule over those
rounds, and reports:

- ‖μ - θ*‖² at the start (the identity θ) and after the last round, and their ratio;
- the best sampled θ's distance, against the best of the same number of samples
  drawn from the starting policy without any update (random search, same budget);
- ‖μ_end - μ_start‖, how far the mean moved (not squared).

``--reward noise`` replaces the reward by i.i.d. uniform noise (no signal at all):
then "moved" is how far the policy drifts on noise alone, the yardstick for how
far a real search's μ moved (``bench.search.mu_travel``).

    python -m bench.toy_search                 # 20 rounds × 8 samples, 5 seeds
    python -m bench.toy_search --rounds 40 --json out.json
    python -m bench.toy_search --target square --rounds 8 --samples 4 --sigma 0.1
    python -m bench.toy_search --target square --rounds 8 --samples 4 --sigma 0.1 --reward noise
"""

from __future__ import annotations

import statistics
import time

import click
import torch
from tqdm import tqdm

from paploss.search import Controller, round_generator, truncnorm_sample
from paploss.spec import form_theta

TARGETS = ("random", "square", "sqrt")
REWARDS = ("distance", "noise")


def run_seed(seed: int, rounds: int, samples: int, target: str = "random", sigma: float = 0.2,
             reward: str = "distance", shared: bool = False) -> dict:
    """One toy search; returns the distances (squared) it reached and how far μ moved.
    ``shared``: the shared search's space (one function for all five places, D = 9)."""
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
    c = Controller(rounds=rounds, seed=seed, sigma=sigma, shared=shared)
    if target == "random":
        gen = torch.Generator().manual_seed(10_000 + seed)
        target_t = 0.1 + 0.8 * torch.rand(c.dim, generator=gen, dtype=torch.float64)
    else:
        target_t = torch.tensor(form_theta(target, functions=1 if shared else 5), dtype=torch.float64)

    def dist(x: torch.Tensor) -> torch.Tensor:
        return ((x - target_t) ** 2).sum(-1)

    start = float(dist(c.mu))
    mu0, sigma0 = c.mu, c.sigma
    curve = [start]
    noise = torch.Generator().manual_seed(20_000 + seed)
    for _ in range(rounds):
        thetas = c.sample(samples)
        if reward == "noise":
            c.update(thetas, torch.rand(samples, generator=noise, dtype=torch.float64).tolist())
        else:
            c.update(thetas, (-dist(thetas)).tolist())
        curve.append(float(dist(c.mu)))
    best = c.best()
    # random search with the same budget: rounds × samples draws from the starting policy
    v = torch.rand((rounds * samples, c.dim), generator=round_generator(seed, 10_000), dtype=torch.float64)
    random_best = float(dist(truncnorm_sample(mu0, sigma0, v)).min())
    return {
        "seed": seed,
        "start": start,
        "end": curve[-1],
        "ratio": curve[-1] / start,
        "best_sample": float(dist(torch.tensor(best.theta, dtype=torch.float64))),
        "random_search_best": random_best,
        "moved": float(torch.linalg.vector_norm(c.mu - mu0)),
        "dim": c.dim,
        "curve": curve,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rounds", type=click.IntRange(min=1), default=20, show_default=True, help="Rounds per search (σ decays over them).")
@click.option("--samples", type=click.IntRange(min=2), default=8, show_default=True, help="Samples per round.")
@click.option("--target", type=click.Choice(TARGETS), default="random", show_default=True,
              help="θ*: uniform per seed, or the piecewise-linear form of a handcrafted loss.")
@click.option("--reward", type=click.Choice(REWARDS), default="distance", show_default=True,
              help="-‖θ - θ*‖², or i.i.d. uniform noise (how far μ drifts without any signal).")
@click.option("--sigma", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.2, show_default=True,
              help="Starting spread of the policy.")
@click.option("--shared", is_flag=True, help="The shared search's space (one function for all five places, D = 9).")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True, help="Independent searches (seeds 0..N-1).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads.")
@click.option("--json", "json_out", default=None, help="Also write the results as JSON to this path.")
def main(rounds: int, samples: int, target: str, reward: str, sigma: float, shared: bool, seeds: int, threads: int,
         json_out: str | None) -> None:
    """Run the toy search and print a Markdown table for BENCHMARKS.md."""
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    results = [run_seed(s, rounds, samples, target, sigma, reward, shared) for s in tqdm(range(seeds), desc="toy search", unit="seed")]
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    what = "-||theta - theta*||^2" if reward == "distance" else "uniform noise"
    print(f"\nD = {results[0]['dim']}{' (shared)' if shared else ''}, reward = {what}, theta* {target}, sigma {sigma}, "
          f"{rounds} rounds x {samples} samples, {seeds} seeds")
    print("\n| seed | ‖μ−θ*‖² start | ‖μ−θ*‖² end | end/start | best sample | random search best (same budget) "
          "| ‖μ_end−μ_start‖ |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['seed']} | {r['start']:.4f} | {r['end']:.4f} | {r['ratio']:.3f} | "
              f"{r['best_sample']:.4f} | {r['random_search_best']:.4f} | {r['moved']:.3f} |")
    keys = ("start", "end", "ratio", "best_sample", "random_search_best", "moved")
    mean = {k: statistics.mean(r[k] for r in results) for k in keys}
    print(f"| mean | {mean['start']:.4f} | {mean['end']:.4f} | {mean['ratio']:.3f} | "
          f"{mean['best_sample']:.4f} | {mean['random_search_best']:.4f} | {mean['moved']:.3f} |")
    print(f"\n{seconds:.1f} s wall, {cpu:.1f} s CPU in all; per round (sample + 100-step update): "
          f"{seconds / (seeds * rounds):.2f} s wall, {cpu / (seeds * rounds):.2f} s CPU")
    if json_out:
        from paploss import storage

        storage.write_json(json_out, {"rounds": rounds, "samples": samples, "target": target, "reward": reward, "sigma": sigma,
                                      "shared": shared,
                                      "seconds": seconds, "cpu_seconds": cpu, "results": results})


if __name__ == "__main__":
    main()
