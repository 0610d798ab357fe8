"""``python -m bench.paired``: the paired gap between two benchmarks' finals, against one
computed by hand, and its errors naming the file, dataset or loss."""

from __future__ import annotations

import json
import math
import random

import pytest

from bench.paired import main


def _bench_json(path, dataset, loss, aps):
    path.write_text(json.dumps({dataset: {loss: {"AP": aps, "AP50": aps, "AP75": aps}}}))
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
