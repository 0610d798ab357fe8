"""Benchmark of :func:`paploss.pap_loss` (issue 2): `python -m bench.loss`.

Measured side by side in one run (forward + backward unless said otherwise):

1. N = 100,000 ranked entries, P = 200 and 1,000 positives, searched 5-function
   spec: the fast kernel vs a dense twin that materialises the N×P matrices (what
   the paper's code does); time and peak memory.
2. ``top_k=None`` over 8,000,000 entries (100k anchors × 80 classes) with 1,000
   positives vs one ``torch.sort`` of those logits.
3. The same entries through torchvision's ``sigmoid_focal_loss`` (and the loss with
   its default ``top_k = 100,000``).
4. The handcrafted ``sigmoid`` and ``sqrt`` forms at N = 100,000, P = 200 (``--p-hc``):
   their piecewise-quadratic approximations on the fast path (the default) vs the
   exact functions on the tiled dense path (``pap_loss(..., exact=True)``), run
   interleaved; ``--handcrafted-only`` runs just this group.

Every case runs in its own fresh subprocess (same seed, same inputs), so that peak
memory is that case's alone. Peak memory is the growth of the process's resident
set over the measured call: the kernel's peak-RSS mark (``VmHWM``) is reset through
``/proc/self/clear_refs`` just before the call and read just after, minus the RSS
before it. ``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc return every freed tensor
buffer to the kernel at once, so RSS follows live memory. Time is the median of
``--repeats`` calls after one warm-up call (the dense twin: one call, no warm-up).
``torch.set_num_threads(--threads)`` (default 1: on a shared 2-core machine one
thread gives the steadiest ratios).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import click

SEED = 0
SPEC_THETA_SEED = 1


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def dense_pap_loss(logits, targets, qualities, spec, top_k=100_000):
    """SPEC §1 with explicit N×P matrices (as the paper's code): the slow twin."""
    import torch

    s, t = logits.reshape(-1), targets.reshape(-1)
    u = torch.where(t == 1, qualities.reshape(-1), torch.zeros_like(qualities.reshape(-1)))
    P = torch.nonzero(t == 1).squeeze(1)
    J = torch.nonzero(t != -1).squeeze(1)
    if top_k is not None and len(J) > top_k:
        J = J[torch.topk(s[J], top_k).indices]
    x = (s[J][:, None] - s[P][None, :]) / 2 + 0.5            # (|J|, |P|)
    H2, H1 = spec.function("H2"), spec.function("H1")
    I1, I2, I3 = spec.function("I1"), spec.function("I2"), spec.function("I3")
    num = (H2(x) * (1 - I2(u[J]))[:, None]).sum(0)
    den = H1(x).detach().sum(0)
    ratio = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    return ((1 - I1(u[P])) + I3(u[P]) * ratio).sum() / (len(P) + 1e-8)


def _inputs(n: int, p: int):
    import torch

    g = torch.Generator().manual_seed(SEED)
    logits = torch.randn(n, generator=g) * 2.0 - 3.0
    targets = torch.zeros(n, dtype=torch.long)
    targets[torch.randperm(n, generator=g)[:p]] = 1
    qualities = torch.rand(n, generator=g)
    return logits, targets, qualities


def _spec():
    import torch

    from paploss import LossSpec

    theta = torch.rand(41, generator=torch.Generator().manual_seed(SPEC_THETA_SEED)).tolist()
    return LossSpec.from_theta(theta)


def _measure(call) -> tuple[float, float, object]:
    """(seconds, peak extra MB, result) of one call."""
    import gc

    gc.collect()
    have_peak = _reset_peak()
    before = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    value = call()
    seconds = time.perf_counter() - t0
    peak = (_rss_kb("VmHWM") - before) / 1024 if have_peak else float("nan")
    return seconds, peak, value


def _calls(n: int, p: int):
    """The measured operations on the same inputs, by name."""
    import torch
    import torchvision

    from paploss import pap_loss

    spec = _spec()
    logits, targets, qualities = _inputs(n, p)
    t_float = targets.float()

    def loss_call(fn, top_k):
        def call():
            s = logits.clone().requires_grad_()
            q = qualities.clone().requires_grad_()
            loss = fn(s, targets, q, spec, top_k=top_k)
            loss.backward()
            return float(loss)
        return call

    def sort():
        torch.sort(logits)

    def focal():
        s = logits.clone().requires_grad_()
        loss = torchvision.ops.sigmoid_focal_loss(s, t_float, reduction="sum")
        loss.backward()
        return float(loss)

    return {
        "fast": loss_call(pap_loss, 100_000),
        "dense": loss_call(dense_pap_loss, 100_000),
        "fast_all": loss_call(pap_loss, None),
        "sort": sort,
        "focal": focal,
        "sigmoid": lambda: _handcrafted_call(logits, targets, qualities, "sigmoid", exact=True),
        "sigmoid_fast": lambda: _handcrafted_call(logits, targets, qualities, "sigmoid", exact=False),
        "sqrt": lambda: _handcrafted_call(logits, targets, qualities, "sqrt", exact=True),
        "sqrt_fast": lambda: _handcrafted_call(logits, targets, qualities, "sqrt", exact=False),
    }


def _handcrafted_call(logits, targets, qualities, form, exact):
    from paploss import LossSpec, pap_loss

    s = logits.clone().requires_grad_()
    q = qualities.clone().requires_grad_()
    loss = pap_loss(s, targets, q, LossSpec.handcrafted(form), top_k=100_000, exact=exact)
    loss.backward()
    return float(loss)


def _child(cases: list[str], n: int, p: int, repeats: int, threads: int) -> list[dict]:
    """Run ``cases`` interleaved (one call of each per round) so that their time ratios
    see the same machine load; one warm-up round first (none for the dense twin)."""
    import torch

    torch.set_num_threads(threads)
    calls = _calls(n, p)
    for c in cases:
        if c not in calls:
            raise click.BadParameter(f"unknown case {c!r}")
    warm = "dense" not in cases
    if warm:
        for c in cases:
            calls[c]()
    rows = {c: {"case": c, "n": n, "p": p, "times_s": [], "peaks_mb": [], "threads": threads} for c in cases}
    for _ in range(repeats if warm else 1):
        for c in cases:
            seconds, peak, value = _measure(calls[c])
            rows[c]["times_s"].append(seconds)
            rows[c]["peaks_mb"].append(peak)
            rows[c]["loss"] = value
    for r in rows.values():
        r["time_s"] = statistics.median(r["times_s"])
        r["peak_mb"] = max(r["peaks_mb"])
    return list(rows.values())


def _run(cases: list[str], n: int, p: int, repeats: int, threads: int) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "bench.loss", "--child", ",".join(cases), "--n", str(n), "--p", str(p),
           "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise click.ClickException(f"cases {cases} (N={n}, P={p}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--child", default=None, hidden=True)
@click.option("--n", "n_child", default=0, type=int, hidden=True)
@click.option("--p", "p_child", default=0, type=int, hidden=True)
@click.option("--repeats", default=3, show_default=True, help="timed calls per case (median reported)")
@click.option("--threads", default=1, show_default=True, help="torch threads in each case")
@click.option("--quick", is_flag=True, help="small sizes (N = 20,000 and 400,000) to check the script")
@click.option("--skip-dense-1000", is_flag=True, help="skip the dense twin at P = 1000 (needs about 5 GB and minutes)")
@click.option("--json", "json_path", default=None, help="also write all measurements here (local path or s3://)")
@click.option("--handcrafted-only", is_flag=True,
              help="only the sigmoid/sqrt group: piecewise-quadratic fast path vs exact dense path")
@click.option("--p-hc", default=200, show_default=True, help="positives in the sigmoid/sqrt group")
def main(child, n_child, p_child, repeats, threads, quick, skip_dense_1000, json_path, handcrafted_only, p_hc):
    """Time and memory of pap_loss vs a dense twin, torch.sort and sigmoid_focal_loss."""
    if child:
        print(json.dumps(_child(child.split(","), n_child, p_child, repeats, threads)))
        return
    n_small, n_big = (20_000, 400_000) if quick else (100_000, 8_000_000)
    from tqdm import tqdm

    hc_group = (["sigmoid_fast", "sigmoid", "sqrt_fast", "sqrt"], n_small, p_hc)
    plan = [(["fast"], n_small, 200), (["dense"], n_small, 200), (["fast"], n_small, 1000)]
    if not skip_dense_1000:
        plan.append((["dense"], n_small, 1000))
    plan += [(["sigmoid"], n_small, 1000), (["sort", "fast_all", "focal", "fast"], n_big, 1000), hc_group]
    if handcrafted_only:
        plan = [hc_group]
    rows, res = [], {}
    for cases, n, p in tqdm(plan, desc="bench.loss", unit="run"):
        for r in _run(cases, n, p, repeats, threads):
            rows.append(r)
            res[(r["case"], n, p)] = r

    labels = {"fast": "pap_loss searched (top_k=100k)", "dense": "dense twin (N×P matrices)",
              "fast_all": "pap_loss searched (top_k=None)", "sort": "one torch.sort (forward only)",
              "focal": "sigmoid_focal_loss",
              "sigmoid": "pap_loss sigmoid form, exact, tiled dense path (top_k=100k)",
              "sigmoid_fast": "pap_loss sigmoid form, piecewise-quadratic, fast path (top_k=100k)",
              "sqrt": "pap_loss sqrt form, exact, tiled dense path (top_k=100k)",
              "sqrt_fast": "pap_loss sqrt form, piecewise-quadratic, fast path (top_k=100k)"}
    print(f"\nthreads={threads}, repeats={repeats} (median), forward + backward unless said otherwise, "
          "peak = RSS growth during the call\n")
    print("| case | N | P | time (s) | peak extra memory (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {labels[r['case']]} | {r['n']:,} | {r['p']:,} | {r['time_s']:.3f} | {r['peak_mb']:.1f} |")
    print()
    for p in (200, 1000):
        f, d = res.get(("fast", n_small, p)), res.get(("dense", n_small, p))
        if f and d:
            print(f"- N={n_small:,} P={p}: dense twin / pap_loss: time {d['time_s'] / f['time_s']:.0f}x, "
                  f"peak memory {d['peak_mb'] / max(f['peak_mb'], 1e-3):.0f}x "
                  f"(loss {f['loss']:.6f} vs {d['loss']:.6f})")
    def ratio(group, a, b):  # median over rounds of the per-round ratio (same load in a round)
        return statistics.median(x / y for x, y in zip(group[a]["times_s"], group[b]["times_s"]))

    if not handcrafted_only:
        big = {c: res[(c, n_big, 1000)] for c in ("sort", "fast_all", "focal", "fast")}
        print(f"- N={n_big:,} P=1000: pap_loss(top_k=None) / torch.sort = {ratio(big, 'fast_all', 'sort'):.2f}x "
              "(median of per-round ratios)")
        print(f"- N={n_big:,} P=1000: pap_loss(top_k=None) / sigmoid_focal_loss = "
              f"{ratio(big, 'fast_all', 'focal'):.2f}x; "
              f"pap_loss(top_k=100k) / sigmoid_focal_loss = {ratio(big, 'fast', 'focal'):.2f}x")
    hc = {c: res[(c, n_small, p_hc)] for c in hc_group[0]}
    for form in ("sigmoid", "sqrt"):
        print(f"- N={n_small:,} P={p_hc}: {form}: exact dense / piecewise-quadratic fast = "
              f"{ratio(hc, form, form + '_fast'):.0f}x time (median of per-round ratios), "
              f"peak memory {hc[form]['peak_mb']:.1f} vs {hc[form + '_fast']['peak_mb']:.1f} MB, "
              f"loss {hc[form]['loss']:.6f} (exact) vs {hc[form + '_fast']['loss']:.6f} "
              f"(difference {hc[form + '_fast']['loss'] - hc[form]['loss']:.1e}, float32)")
    if json_path:
        from paploss import storage

        storage.write_json(json_path, rows)


if __name__ == "__main__":
    main()
