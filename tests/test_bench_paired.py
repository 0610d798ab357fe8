"""``python -m bench.paired``: the paired gap between two benchmarks' finals, against one
computed by hand, and its errors naming the file, dataset or loss."""

from __future__ import annotations

import json
import math
import random

import pytest

from bench.paired import main


def _bench_json(path, dataset, loss, aps, ap75=None):
    path.write_text(json.dumps({dataset: {loss: {"AP": aps, "AP50": aps, "AP75": aps if ap75 is None else ap75}}}))
    return f"{path}:{dataset}:{loss}"


@pytest.mark.parametrize("seed", range(4))
def test_paired_gap_matches_one_by_hand(tmp_path, capsys, seed):
    rng = random.Random(seed)
    a = [rng.uniform(0.1, 0.3) for _ in range(rng.randint(3, 9))]
    b = [rng.uniform(0.1, 0.3) for _ in range(len(a) + rng.randint(0, 2))]  # B may have more seeds
    main([_bench_json(tmp_path / "a.json", "digits", "searched", a),
          _bench_json(tmp_path / "b.json", "digits", "square", b)])
    n = len(a)
    gaps = [100 * (a[k] - b[k]) for k in range(n)]
    mean = sum(gaps) / n
    se = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (n - 1) / n)
    head, per_seed = capsys.readouterr().out.splitlines()
    assert head == (f"A {100 * sum(a) / n:.2f} - B {100 * sum(b[:n]) / n:.2f} over {n} seeds: "
                    f"{mean:+.2f} ± {se:.2f}, {sum(g > 0 for g in gaps)} won")
    assert per_seed == "A per seed: " + ", ".join(f"{100 * v:.2f}" for v in a)


@pytest.mark.parametrize("seed", range(3))
def test_metric_and_the_change_of_a_gap_match_them_by_hand(tmp_path, capsys, seed):
    """``--metric AP75`` reads that metric, not AP; ``--minus C D`` prints the per-seed
    change (A - B) - (C - D) over the seeds all four have, mean ± standard error."""
    rng = random.Random(seed)
    n = rng.randint(3, 9)
    draw = lambda k: [rng.uniform(0.1, 0.5) for _ in range(k)]  # noqa: E731
    ap75 = {x: draw(n + (x == "d")) for x in "abcd"}  # D has one seed more: left out
    args = [_bench_json(tmp_path / f"{x}.json", "digits", x, draw(n + 1), ap75[x]) for x in "abcd"]
    main([args[0], args[1], "--metric", "AP75", "--minus", args[2], args[3]])
    a, b, c, d = ([100 * v for v in ap75[x][:n]] for x in "abcd")
    diffs = [(a[k] - b[k]) - (c[k] - d[k]) for k in range(n)]
    mean = sum(diffs) / n
    se = math.sqrt(sum((g - mean) ** 2 for g in diffs) / (n - 1) / n)
    head, per_seed, change = capsys.readouterr().out.splitlines()
    assert per_seed == "A per seed: " + ", ".join(f"{v:.2f}" for v in a)
    assert head.startswith(f"A {sum(a) / n:.2f} - B {sum(b) / n:.2f} over {n} seeds: ")
    assert change == f"(A - B) - (C - D) over {n} seeds: {mean:+.2f} ± {se:.2f}, {sum(x > 0 for x in diffs)} larger"


@pytest.mark.parametrize("b_arg, named", [
    ("{dir}/b.json:shapes:square", "no dataset 'shapes'"),
    ("{dir}/b.json:digits:focal+l1", "no AP for loss 'focal+l1'"),
    ("{dir}/b.json", "expected PATH:DATASET:LOSS"),
    ("{dir}/missing.json:digits:square", "missing.json"),
    ("{dir}/bad.json:digits:square", "bad.json: not a bench_search.json"),
])
def test_bad_argument_is_named(tmp_path, capsys, b_arg, named):
    a = _bench_json(tmp_path / "a.json", "digits", "searched", [0.1, 0.2])
    _bench_json(tmp_path / "b.json", "digits", "square", [0.1, 0.2])
    (tmp_path / "bad.json").write_text('{"digits": ')
    with pytest.raises(SystemExit) as e:
        main([a, b_arg.format(dir=tmp_path)])
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_one_seed_is_not_a_paired_gap(tmp_path, capsys):
    a = _bench_json(tmp_path / "a.json", "digits", "searched", [0.1])
    b = _bench_json(tmp_path / "b.json", "digits", "square", [0.1, 0.2])
    with pytest.raises(SystemExit):
        main([a, b])
    assert "2 seeds or more" in capsys.readouterr().err
