"""paploss.steps: input checks, option handling, idempotence, failed trials."""

from __future__ import annotations

import json
import math
import os
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paploss import presets, steps, storage
from paploss.search import Controller
from tests._servers import free_port


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "name, value, message",
    [("rounds", 0, "rounds=0"), ("samples", 1, "samples=1"), ("parallelism", 0, "parallelism=0"),
     ("max_failed_trials", -1, "max_failed_trials=-1"), ("attempts", 0, "attempts=0"),
     ("rounds", 1.5, "rounds=1.5"), ("samples", True, "samples=True")],
)
def test_out_of_range_parameters_are_named(name, value, message):
    good = dict(rounds=2, samples=2, parallelism=1, max_failed_trials=0, search_name="s", attempts=1)
    steps.validate_search_params(**good)
    with pytest.raises(steps.StepError, match=message):
        steps.validate_search_params(**{**good, name: value})


@pytest.mark.parametrize("bad", ["", "a b", "../x", "x/y", "-x", "x" * 200])
def test_bad_search_names(bad):
    with pytest.raises(steps.StepError, match="search_name"):
        steps.validate_search_params(rounds=1, samples=2, parallelism=1, max_failed_trials=0, search_name=bad)


def test_check_dataset(tmp_path, monkeypatch):
    steps.check_dataset("bundled:shapes")
    with pytest.raises(steps.StepError, match="unknown bundled dataset 'nope'"):
        steps.check_dataset("bundled:nope")
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(steps.StepError, match=f"dataset='{missing}' has no annotations/train.json"):
        steps.check_dataset(str(missing))
    (tmp_path / "d" / "annotations").mkdir(parents=True)
    (tmp_path / "d" / "annotations" / "train.json").write_text("{}")
    with pytest.raises(steps.StepError, match="annotations/val.json"):
        steps.check_dataset(str(tmp_path / "d"))
    # an S3 endpoint that does not answer is named, quickly
    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(steps.StepError, match=f"127.0.0.1:{port}"):
        steps.check_dataset("s3://bucket/data")
    with pytest.raises(steps.StepError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        steps.check_work("s3://bucket/work")


def test_check_work_local(tmp_path):
    steps.check_work(str(tmp_path / "new" / "folder"))  # creatable
    (tmp_path / "file").write_text("x")
    with pytest.raises(steps.StepError, match="not a writable folder"):
        steps.check_work(str(tmp_path / "file" / "below"))


# ----------------------------------------------------------------------------- options


@settings(max_examples=50, deadline=None)
@given(st.recursive(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                              st.text(max_size=3), st.booleans()),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                    max_leaves=10))
def test_plain_undoes_protobuf_doubles(value):
    """KFP turns every number of a dict parameter into a double; plain() maps the
    round trip back to the original ints, and leaves everything else as it was."""
    def as_double(v):
        if isinstance(v, dict):
            return {k: as_double(x) for k, x in v.items()}
        if isinstance(v, list):
            return [as_double(x) for x in v]
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    def ints_of_integral(v):  # the slow, obvious twin
        if isinstance(v, dict):
            return {k: ints_of_integral(x) for k, x in v.items()}
        if isinstance(v, list):
            return [ints_of_integral(x) for x in v]
        if isinstance(v, float) and v == int(v) and abs(v) < 2**53:
            return int(v)
        return v

    out = steps.plain(as_double(value))
    assert out == ints_of_integral(value)
    assert json.dumps(out, sort_keys=True) == json.dumps(ints_of_integral(value), sort_keys=True)


def test_train_options_expand_engine_presets():
    from paploss.engine import PROXY_PRESETS

    out = steps.train_options({"preset": "smoke", "batch_size": 2.0})
    assert out == {**PROXY_PRESETS["smoke"], "batch_size": 2}
    out = steps.train_options({"preset": "smoke"}, detector="retinanet_mobilenet_v3", epochs=0.5)
    assert out["epochs"] == 0.5 and out["iterations"] is None and out["detector"] == "retinanet_mobilenet_v3"
    assert steps.train_options({"preset": "smoke", "epochs": 1})["iterations"] is None
    with pytest.raises(steps.StepError, match="training preset 'nope' is unknown"):
        steps.train_options({"preset": "nope"})
    with pytest.raises(steps.StepError, match="unknown training option"):
        steps.check_train_options({"preset": "smoke", "learning_rate": 1}, "proxy options")
    with pytest.raises(steps.StepError, match="batch_size must be >= 1"):
        steps.check_train_options({"preset": "smoke", "batch_size": 0}, "proxy options")
    # PAP-loss options pass for the proxies (PAP loss only), not for the finals (baselines too)
    steps.check_train_options({"preset": "smoke", "box_collapse": 0.3, "detach_i3": True}, "proxy options",
                              loss="paploss")
    with pytest.raises(steps.StepError, match="final options: detach_i3 needs the PAP loss"):
        steps.check_train_options({"preset": "smoke", "detach_i3": True}, "final options")
    for name, p in presets.PRESETS.items():
        steps.check_train_options(p.proxy, f"{name} proxy", loss="paploss")  # proxies train the PAP loss only
        steps.check_train_options(p.final, f"{name} final", loss="paploss")  # as the preflight checks them:
        steps.check_train_options(steps.loss_options(p.final, steps.BASELINES[0]), f"{name} final")  # baselines too
        steps.check_detectors(p.proxy, p.final, p.pretrain, p.detector)
    with pytest.raises(steps.StepError, match="detectors must agree"):
        steps.check_detectors({"preset": "smoke"}, {"preset": "smoke", "detector": "retinanet_mobilenet_v3"}, {})
    with pytest.raises(steps.StepError, match="detectors must agree"):
        steps.check_detectors({"preset": "smoke"}, {"preset": "smoke"}, {"detector": "retinanet_mobilenet_v3"})
    # the warm start follows the trials' detector unless told otherwise
    warm = steps.pretrain_options({"iterations": 3.0}, {"preset": "quick"})
    assert warm == {"iterations": 3, "detector": PROXY_PRESETS["quick"]["detector"],
                    "image_size": PROXY_PRESETS["quick"]["image_size"]}
    assert steps.pretrain_options({}, {"preset": "quick"}, detector="retinanet_resnet50")["detector"] == \
        "retinanet_resnet50"


def test_preset_overrides():
    p = presets.get_preset("smoke").with_overrides(rounds=5, samples=4)
    assert (p.rounds, p.samples, p.max_failed_trials) == (5, 4, 5)
    # max_failed_trials counts trainings: a quarter of rounds x samples x reward_seeds
    assert p.with_overrides(reward_seeds=2).max_failed_trials == 10
    with pytest.raises(ValueError, match="unknown preset field"):
        p.with_overrides(round=3)
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        presets.get_preset("fast")


# ----------------------------------------------------------------------------- the search steps


def _bad_init(tmp_path):
    """A warm-start file the real engine refuses: every trial using it raises."""
    import torch

    path = tmp_path / "not-a-backbone.pt"
    torch.save({"state_dict": {}}, path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("work"))
    return work, steps.prepare_data("bundled:shapes", work, bundled={"n_train": 24, "n_val": 8, "image_size": 64})


def test_prepare_data_is_idempotent_and_splits(tiny_data):
    work, data = tiny_data
    for split in ("train", "val", "search_train", "search_val"):
        assert storage.exists(storage.join(data, "annotations", f"{split}.json"))
    st_ = os.stat(os.path.join(data, "annotations", "search_val.json")).st_mtime_ns
    # same inputs -> the same folder, untouched; floats from KFP name the same folder
    assert steps.prepare_data("bundled:shapes", work,
                              bundled={"n_train": 24.0, "n_val": 8.0, "image_size": 64.0}) == data
    assert os.stat(os.path.join(data, "annotations", "search_val.json")).st_mtime_ns == st_
    tr = storage.read_json(storage.join(data, "annotations", "search_train.json"))
    va = storage.read_json(storage.join(data, "annotations", "search_val.json"))
    assert not {i["file_name"] for i in tr["images"]} & {i["file_name"] for i in va["images"]}
    # a dataset that already has its search split is used as it is
    assert steps.prepare_data(data, work) == data
    # a larger search_val_fraction: another folder, whose search-val holds that share of train
    half = steps.prepare_data("bundled:shapes", work, search_val_fraction=0.5,
                              bundled={"n_train": 24, "n_val": 8, "image_size": 64})
    assert half != data
    sizes = [len(storage.read_json(storage.join(half, "annotations", f"{n}.json"))["images"])
             for n in ("search_train", "search_val")]
    assert sum(sizes) == 24 and abs(sizes[1] - 12) <= 2 and len(va["images"]) < sizes[1]
    for bad in (0, 1.0, "x", True):
        with pytest.raises(steps.StepError, match=f"search_val_fraction={bad!r} must be in"):
            steps.prepare_data("bundled:shapes", work, search_val_fraction=bad)


def test_prepare_data_crash_leaves_nothing_and_a_rerun_builds_it(tmp_path, monkeypatch):
    """The dataset folder is built beside its final name and renamed into place: a
    crash partway (here: the search split) leaves no folder, half or whole, and no
    temporary folder; the next call builds it."""
    import paploss.data

    def broken_split(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(paploss.data, "search_split", broken_split)
    bundled = {"n_train": 12, "n_val": 4, "image_size": 64}
    with pytest.raises(RuntimeError, match="disk full"):
        steps.prepare_data("bundled:shapes", str(tmp_path), bundled=bundled)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
    monkeypatch.undo()
    data = steps.prepare_data("bundled:shapes", str(tmp_path), bundled=bundled)
    assert storage.exists(storage.join(data, "annotations", "search_val.json"))
    assert [p.name for p in (tmp_path / "data").iterdir()] == [os.path.basename(data)]


def test_failed_trials_count_and_stop_the_search(tiny_data, tmp_path):
    """Trials whose training raises (the real engine, refusing a corrupt warm start)
    are failed results; the round goes on with min_reward; beyond
    max_failed_trials the search stops and writes no new state."""
    work, data = tiny_data
    out = steps.init_search(work, "fails", rounds=2, samples=2, seed=3)
    results = [steps.proxy_trial(data, _bad_init(tmp_path), t, {"preset": "smoke"}, work, "fails",
                                 state=out["state"], attempts=2) for t in out["trials"]]
    parsed = [json.loads(r) for r in results]
    assert all(p["failed"] and p["reward"] is None for p in parsed)
    assert all("attempt 2/2" in p["error"] and "expected a backbone written by" in p["error"] for p in parsed)
    # the trial is idempotent: its stored result comes back
    assert json.loads(steps.proxy_trial(data, _bad_init(tmp_path), out["trials"][0], {"preset": "smoke"}, work,
                                        "fails", state=out["state"])) == parsed[0]

    nxt = steps.controller_update(out["state"], results, work, "fails", max_failed_trials=2)
    assert nxt["round"] == 1 and nxt["failed_trials"] == 2 and len(nxt["trials"]) == 2
    c = Controller.from_state_dict(storage.read_json(nxt["state"])["controller"])
    assert c.history[0].failed == [0, 1] and c.history[0].rewards == [0.0, 0.0]  # min_reward

    results2 = [steps.proxy_trial(data, _bad_init(tmp_path), t, {"preset": "smoke"}, work, "fails",
                                  state=nxt["state"]) for t in nxt["trials"]]
    with pytest.raises(steps.SearchFailed, match=r"4 failed trials exceed max_failed_trials=2"):
        steps.controller_update(nxt["state"], results2, work, "fails", max_failed_trials=2)
    assert not storage.exists(storage.join(steps.search_dir(work, "fails"), "state", "round-002.json"))
    # with room for them, the search finishes
    last = steps.controller_update(nxt["state"], results2, work, "fails", max_failed_trials=4)
    assert last["round"] == 2 and last["trials"] == [] and last["failed_trials"] == 4


def _fake_results(trials, **extra):
    return [json.dumps({**json.loads(t), "reward": 0.1 * i, "failed": False, "error": "", **extra})
            for i, t in enumerate(trials)]


def test_controller_update_is_idempotent_and_checks_its_inputs(tiny_data):
    work, _ = tiny_data
    out = steps.init_search(work, "idem", rounds=3, samples=3, seed=1)
    results = _fake_results(out["trials"])
    first = steps.controller_update(out["state"], results, work, "idem")
    mtime = os.stat(first["state"]).st_mtime_ns
    assert steps.controller_update(out["state"], list(reversed(results)), work, "idem") == first
    assert os.stat(first["state"]).st_mtime_ns == mtime
    # the next round's θ are the controller's own draw, reproducible from the state
    c = Controller.from_state_dict(storage.read_json(first["state"])["controller"])
    assert [json.loads(t)["theta"] for t in first["trials"]] == c.sample(3).tolist()
    forged = [json.dumps({**json.loads(r), "theta": [0.5] * 41}) for r in results]
    with pytest.raises(steps.StepError, match="another θ than the controller drew"):
        steps.controller_update(out["state"], forged, work, "idem")
    with pytest.raises(steps.StepError, match="at round 1"):
        steps.controller_update(first["state"], results, work, "idem")
    # init of an existing search with other options is refused, not overwritten
    with pytest.raises(steps.StepError, match=r"other controller options \(its starting sigma differs\)"):
        steps.init_search(work, "idem", rounds=3, samples=3, seed=1, controller={"sigma": 0.1})
    with pytest.raises(steps.StepError, match=r"other controller options \(rounds=3 there, 5 now; samples=3 there, 4 now\)"):
        steps.init_search(work, "idem", rounds=5, samples=4, seed=1)
    assert steps.init_search(work, "idem", rounds=3, samples=3, seed=1)["trials"] == out["trials"]


def test_reward_seeds_train_each_theta_n_times_and_reward_it_by_the_mean(tiny_data):
    """``reward_seeds=n``: each sampled θ is n trials (seeds REWARD_SEED_STRIDE apart,
    numbered θ-major), its reward the mean of theirs (a failed one fails the θ), and
    the controller moves as one given those means directly; the choice is kept in the
    state, results of other seeds are refused, and the selection keeps off every one."""
    work, _ = tiny_data
    out = steps.init_search(work, "rs2", rounds=3, samples=3, seed=5, reward_seeds=2)
    trials = [json.loads(t) for t in out["trials"]]
    assert [(t["sample"], t["seed"], t["repeat"]) for t in trials] == [
        (0, 5, 0), (1, 1005, 1), (2, 5, 0), (3, 1005, 1), (4, 5, 0), (5, 1005, 1)]
    twin = Controller(rounds=3, seed=5, samples=3)  # the slow, obvious twin: rewards averaged by hand
    thetas = twin.sample(3).tolist()
    assert [t["theta"] for t in trials] == [th for th in thetas for _ in range(2)]
    rewards = [0.11, 0.31, 0.2, 0.4, 0.05, 0.25]
    first = [json.dumps({**t, "reward": r, "failed": False, "error": ""}) for t, r in zip(trials, rewards)]
    nxt = steps.controller_update(out["state"], list(reversed(first)), work, "rs2")
    twin.update(thetas, [0.21, 0.3, 0.15])
    c = steps.load_controller(nxt["state"])
    assert c.history[0].rewards == pytest.approx([0.21, 0.3, 0.15])
    assert c.mu.tolist() == pytest.approx(twin.mu.tolist(), abs=1e-12)
    assert nxt["mean_reward"] == pytest.approx(0.22) and nxt["max_reward"] == pytest.approx(0.3)
    assert storage.read_json(nxt["state"])["reward_seeds"] == 2
    assert [json.loads(t)["seed"] for t in nxt["trials"]] == [5, 1005] * 3  # the search's seed, then + stride
    # one failed trial of a θ fails the θ (min_reward); failed_trials counts trainings
    trials = [json.loads(t) for t in nxt["trials"]]
    results = [json.dumps({**t, "reward": None if k == 3 else 0.2, "failed": k == 3, "error": "x" if k == 3 else ""})
               for k, t in enumerate(trials)]
    last = steps.controller_update(nxt["state"], results, work, "rs2", max_failed_trials=1)
    assert steps.load_controller(last["state"]).history[1].failed == [1] and last["failed_trials"] == 1
    # refused: results of one seed only, of the wrong seeds, a reopen with another reward_seeds, bad values
    with pytest.raises(steps.StepError, match="not a multiple of the search's reward_seeds=2"):
        steps.controller_update(out["state"], first[:5], work, "rs2")
    one_seed = [json.dumps({**json.loads(t), "seed": 5, "reward": 0.1, "failed": False, "error": ""})
                for t in out["trials"]]
    with pytest.raises(steps.StepError, match=r"not the search's \[5, 1005\] \(trial_seeds='fixed', reward_seeds=2\)"):
        steps.controller_update(out["state"], one_seed, work, "rs2")
    with pytest.raises(steps.SearchExists, match="with reward_seeds=2, not 1"):
        steps.init_search(work, "rs2", rounds=3, samples=3, seed=5)
    for bad in (0, True, 9, 1.5):
        with pytest.raises(steps.StepError, match=f"reward_seeds={bad!r} is out of range"):
            steps.init_search(work, "rs-bad", rounds=3, samples=3, reward_seeds=bad)
    assert not storage.exists(steps.state_uri(work, "rs-bad", 0))
    # the selection refuses any of a candidate's reward seeds
    with pytest.raises(steps.StepError, match="holds 1005, the training seed of candidate r000-s01"):
        steps.selection_trials(last["state"], 1, [1, 1005])
    assert len(steps.selection_trials(last["state"], 2, [1, 2])) == 4
    # round_noise reads the stored trials back: round 0's (0.11, 0.31), (0.2, 0.4), (0.05, 0.25) agree up to
    # repeat 1's +0.2 on every sample: no noise; round 1 has one failed θ and no stored results
    for t in first:
        storage.write_json(steps._trial_uri(work, "rs2", 0, json.loads(t)["sample"]), json.loads(t))
    noise = steps.round_noise(last["state"])
    assert len(noise) == 2 and noise[1] is None
    assert noise[0] == pytest.approx((statistics.stdev([0.21, 0.3, 0.15]), 0.0), abs=1e-12)


def test_reward_noise_against_its_definition():
    """reward_noise: with n = 2 the noise variance is that of the two trainings'
    differences over 4 (the textbook paired form); a table that is sample + repeat
    has none; on many samples with Gaussian luck of sd σ it finds σ / sqrt(n)."""
    rng = random.Random(3)
    groups = [[rng.random(), rng.random()] for _ in range(7)]
    spread, noise = steps.reward_noise(groups)
    assert spread == pytest.approx(statistics.stdev([(a + b) / 2 for a, b in groups]), rel=1e-12)
    assert noise == pytest.approx(math.sqrt(statistics.variance([a - b for a, b in groups]) / 4), rel=1e-12)
    additive = [[a, a + 0.3, a - 0.1] for a in (0.1, 0.5, 0.2, 0.9)]
    assert steps.reward_noise(additive)[1] == pytest.approx(0.0, abs=1e-12)
    sigma, n = 0.02, 3
    luck = [[0.3 * i / 2000 + j * 0.05 + rng.gauss(0.0, sigma) for j in range(n)] for i in range(2000)]
    assert steps.reward_noise(luck)[1] == pytest.approx(sigma / math.sqrt(n), rel=0.05)
    # a failed sample (nan) is left out; too little to say: None
    assert steps.reward_noise(groups + [[float("nan"), 0.2]]) == steps.reward_noise(groups)
    assert steps.reward_noise([[0.1, 0.2]]) is None and steps.reward_noise([[0.1], [0.2]]) is None


def test_search_splits_are_drawn_beside_the_first_and_cycled_by_round(tiny_data):
    """``search_splits=n``: prepare_data adds splits 1 … n − 1 (split seed + k, each a
    stratified cut of train) to the same data folder, leaving split 0 as it was; round r's
    trials carry split r mod n, the selection's the number of rounds mod n; results of
    another split, a reopen with another n and bad values are refused by name."""
    work, data = tiny_data
    marker = os.path.join(data, "annotations", "search_val.json")
    before = open(marker, "rb").read(), os.stat(marker).st_mtime_ns
    assert steps.prepare_data("bundled:shapes", work, bundled={"n_train": 24, "n_val": 8, "image_size": 64},
                              search_splits=3) == data
    assert (open(marker, "rb").read(), os.stat(marker).st_mtime_ns) == before
    train_ids = {i["id"] for i in storage.read_json(os.path.join(data, "annotations", "train.json"))["images"]}
    vals = []
    for k in range(3):
        tr_name, va_name = steps.search_split_files(k)
        tr, va = (storage.read_json(os.path.join(data, "annotations", f"{n}.json")) for n in (tr_name, va_name))
        tr_ids, va_ids = {i["id"] for i in tr["images"]}, {i["id"] for i in va["images"]}
        assert not tr_ids & va_ids and tr_ids | va_ids == train_ids
        assert va["info"]["split_seed"] == k and va["info"]["split"] == va_name
        vals.append(va_ids)
    assert steps.search_split_files(2) == ("search_train-2", "search_val-2")
    assert vals[0] != vals[1] and vals[1] != vals[2]
    # only_cached draws nothing; a dataset with its own splits must bring them all
    assert steps.prepare_data("bundled:shapes", work, bundled={"n_train": 24, "n_val": 8, "image_size": 64},
                              search_splits=4, only_cached=True) == ""
    assert not os.path.exists(os.path.join(data, "annotations", "search_val-3.json"))
    assert steps.prepare_data(data, work, search_splits=3) == data
    with pytest.raises(steps.StepError, match=r"brings its own search split .* not search_val-3\.json"):
        steps.prepare_data(data, work, search_splits=4)
    # the trials: round r on split r mod 3, refused on another split
    out = steps.init_search(work, "ss3", rounds=4, samples=2, seed=3, search_splits=3)
    assert storage.read_json(out["state"])["search_splits"] == 3
    splits = []
    for r in range(4):
        splits.append({json.loads(t)["split"] for t in out["trials"]})
        if r == 1:
            wrong = _fake_results([json.dumps({**json.loads(t), "split": 0}) for t in out["trials"]])
            with pytest.raises(steps.StepError, match=r"scored on search splits \[0\], not split 1"):
                steps.controller_update(out["state"], wrong, work, "ss3")
        out = steps.controller_update(out["state"], _fake_results(out["trials"]), work, "ss3")
    assert splits == [{0}, {1}, {2}, {0}] and out["trials"] == []
    assert {json.loads(t)["split"] for t in steps.selection_trials(out["state"], 2, [1, 2])} == {1}  # 4 mod 3
    with pytest.raises(steps.SearchExists, match="with search_splits=3, not 1"):
        steps.init_search(work, "ss3", rounds=4, samples=2, seed=3)
    for bad in (0, True, 17, 2.0):
        with pytest.raises(steps.StepError, match=f"search_splits={bad!r} is out of range"):
            steps.init_search(work, "ss-bad", rounds=2, samples=2, search_splits=bad)
        with pytest.raises(steps.StepError, match=f"search_splits={bad!r} is out of range"):
            steps.prepare_data("bundled:shapes", work, search_splits=bad)
    # one split: the state and the trials as before search_splits existed (kfp's cache keys)
    one = steps.init_search(work, "ss1", rounds=2, samples=2, seed=3)
    assert "search_splits" not in storage.read_json(one["state"])
    assert all("split" not in json.loads(t) for t in one["trials"])


def test_a_proxy_trial_trains_and_scores_on_its_split(tiny_data, tmp_path, monkeypatch):
    """A trial's ``split`` picks the annotation files of its training and reward (a
    real smoke training, its config looked at on the way), the result records it, a
    stored result of another split is not reused, and a split the data lacks is named
    before anything trains."""
    work, data = tiny_data
    steps.prepare_data("bundled:shapes", work, bundled={"n_train": 24, "n_val": 8, "image_size": 64},
                       search_splits=3)
    out = steps.init_search(str(tmp_path), "split-trial", 3, 2, seed=0, search_splits=3)
    seen = []
    from paploss.steps import trials

    real = trials._run_training

    def spy(cfg, on_step=None):
        seen.append((cfg.train_ann, cfg.val_ann))
        return real(cfg, on_step=on_step)

    monkeypatch.setattr(trials, "_run_training", spy)
    trial = {**json.loads(out["trials"][0]), "split": 2}
    res = json.loads(steps.proxy_trial(data, "", trial, {"preset": "smoke", "iterations": 4}, str(tmp_path),
                                       "split-trial", state=out["state"]))
    assert seen == [("search_train-2", "search_val-2")] and res["split"] == 2 and not res["failed"]
    assert steps.stored_trial(str(tmp_path), "split-trial", trial) is not None
    assert steps.stored_trial(str(tmp_path), "split-trial", {**trial, "split": 1}) is None
    with pytest.raises(steps.StepError, match=r"search split 5, but .* has no annotations/search_train-5\.json, "
                                              r"annotations/search_val-5\.json"):
        steps.proxy_trial(data, "", {**trial, "split": 5}, {"preset": "smoke"}, str(tmp_path), "split-trial",
                          state=out["state"])
    assert len(seen) == 1


def test_mmdet_detector_gets_no_warm_start(tmp_path):
    """An MMDetection config as the search's detector (``mmdet:<config>``) starts as
    its config says: the pretrain step returns no file and trains nothing."""
    out = steps.pretrain("unused-data-uri", str(tmp_path), detector="mmdet:configs/mmdet/paploss_retinanet_tiny_shapes.py")
    assert out == ""
    assert not any(tmp_path.iterdir())
    # the trials and final trainings of such a search agree with it (one detector for all three)
    steps.check_detectors({"preset": "quick"}, {"preset": "quick"}, {}, detector="mmdet:configs/x.py")


# ----------------------------------------------------------------------------- selection by re-evaluation


def _finished_search(work, name, rounds=2, samples=3, seed=0, trial_seeds="fixed", rewards=None):
    """A search run to its end on made-up rewards (``rewards[round][sample]``, None: a
    failed trial; default 0.1 * sample index, + 0.05 * round)."""
    out = steps.init_search(work, name, rounds=rounds, samples=samples, seed=seed, trial_seeds=trial_seeds)
    for r in range(rounds):
        got = rewards[r] if rewards is not None else [0.1 * i + 0.05 * r for i in range(samples)]
        results = [json.dumps({**json.loads(t), "reward": got[i], "failed": got[i] is None, "error": ""})
                   for i, t in enumerate(out["trials"])]
        out = steps.controller_update(out["state"], results, work, name, max_failed_trials=rounds * samples)
    return out["state"]


def test_selection_trials_are_the_best_distinct_samples_with_each_new_seed(tiny_data):
    work, _ = tiny_data
    state = _finished_search(work, "sel-trials")
    c = steps.load_controller(state)
    trials = [json.loads(t) for t in steps.selection_trials(state, 2, [4, 7])]
    # the best rewards: round 1 sample 2 (0.25), then round 0 sample 2 (0.2)
    want = [c.history[1].thetas[2], c.history[0].thetas[2]]
    assert [(t["candidate"], t["seed"], t["sample"]) for t in trials] == [(0, 4, 0), (0, 7, 1), (1, 4, 2), (1, 7, 3)]
    assert [t["theta"] for t in trials] == [list(want[0])] * 2 + [list(want[1])] * 2
    assert {t["round"] for t in trials} == {2}  # numbered after the last round
    assert [t["search_reward"] for t in trials[::2]] == pytest.approx([0.25, 0.2])
    assert steps.selection_trials(state, 0, [4]) == []  # off
    assert len(steps.selection_trials(state, 50, [4])) == 6  # no more candidates than samples


def test_selection_ranked_by_round_takes_each_rounds_mean_out(tiny_data):
    """``rank="round"``: the best rewards relative to their round's mean over its
    finished samples. Round 1 (on an easier split, say) beats every sample of round 0
    on the reward; relative to its round, round 0's best sample comes first, and round
    1's failed sample (reward 0 in the history) does not lower round 1's mean."""
    work, _ = tiny_data
    rewards = [[0.10, 0.30, 0.11], [0.40, 0.45, None]]
    state = _finished_search(work, "sel-rank", rewards=rewards)

    def picked(rank, top):
        trials = map(json.loads, steps.selection_trials(state, top, [4], rank))
        return [(t["search_round"], t["search_sample"]) for t in trials]

    assert picked("reward", 2) == [(1, 1), (1, 0)]
    assert picked("round", 3) == [(0, 1), (1, 1), (1, 0)]  # +0.13, +0.025, -0.025 (round means 0.17 and 0.425)
    # the slow twin: every sample's reward minus its round's mean, ranked by hand
    rel = sorted(((r, i) for r in range(2) for i in range(3) if rewards[r][i] is not None),
                 key=lambda ri: -(rewards[ri[0]][ri[1]] - statistics.fmean(x for x in rewards[ri[0]] if x is not None)))
    assert picked("round", 5) == rel
    with pytest.raises(steps.StepError, match=r"select_rank='best' is not one of \['reward', 'round'\]"):
        steps.selection_trials(state, 2, [4], "best")


@pytest.mark.parametrize("top, seeds, message", [
    (-1, [1], "select_top=-1"), (2, [], "select_seeds is empty"), (2, [1, 1], "repeats a seed"),
    (2, [3, 0], "holds 0, the training seed of candidate"),
])
def test_bad_selections_are_refused_by_name(tiny_data, top, seeds, message):
    work, _ = tiny_data
    state = _finished_search(work, "sel-bad")
    with pytest.raises(steps.StepError, match=message):
        steps.selection_trials(state, top, seeds)


def test_select_loss_takes_the_best_mean_and_the_final_training_uses_it(tiny_data):
    work, data = tiny_data
    state = _finished_search(work, "sel-pick")
    trials = [json.loads(t) for t in steps.selection_trials(state, 3, [1, 2])]
    # candidate 0 (the best search reward) is unlucky now; candidate 2 has one failed trial (reward 0)
    rewards = {(0, 1): 0.30, (0, 2): 0.10, (1, 1): 0.25, (1, 2): 0.24, (2, 1): 0.60, (2, 2): None}
    results = [json.dumps({**t, "reward": rewards[(t["candidate"], t["seed"])],
                           "failed": rewards[(t["candidate"], t["seed"])] is None}) for t in trials]
    uri = steps.select_loss(state, results, work, "sel-pick")
    doc = storage.read_json(uri)
    assert os.path.basename(uri).startswith("selected-") and doc["controller"] == storage.read_json(state)["controller"]
    means = [c["mean_reward"] for c in doc["selected"]["candidates"]]
    assert means == pytest.approx([0.20, 0.245, 0.30])  # the failed trial counts 0 (SPEC §3)
    assert doc["selected"]["theta"] == trials[4]["theta"]
    c = steps.load_controller(state)
    assert steps.searched_spec(uri) == c.spec_of(trials[4]["theta"]) != c.spec()
    assert steps.searched_spec(state) == c.spec()  # no selection: the policy's mean μ
    assert steps.select_loss(state, list(reversed(results)), work, "sel-pick") == uri  # same inputs, same file
    assert doc["selected"]["rank"] == "reward"
    # the same trials picked by rank "round" are another selection: another file, which says so
    by_round = steps.select_loss(state, results, work, "sel-pick", rank="round")
    assert by_round != uri and storage.read_json(by_round)["selected"]["rank"] == "round"
    assert storage.read_json(uri)["selected"]["rank"] == "reward"
    other = [json.dumps({**json.loads(r), "reward": 0.9 if json.loads(r)["candidate"] == 0 else 0.1}) for r in results]
    assert steps.select_loss(state, other, work, "sel-pick") != uri  # another choice never overwrites this one
    with pytest.raises(steps.StepError, match="results are for round"):
        steps.select_loss(state, [json.dumps({**trials[0], "round": 1, "reward": 0.1, "failed": False})], work,
                          "sel-pick")

    final = json.loads(steps.final_train(data, "", "searched", {"preset": "smoke", "iterations": 2}, work,
                                         "sel-pick", state=uri))
    assert final["spec"] == steps.searched_spec(uri).to_json()
    report = json.loads(steps.report([final], uri, work, "sel-pick"))
    assert report["searched_spec"] == final["spec"] and report["selection"]["theta"] == trials[4]["theta"]


def test_outputs_are_found_however_work_is_spelled(tiny_data, monkeypatch):
    """Warm start, selection and final training are named by keys in which the data,
    warm start and state are places in the work folder (``storage.location_id``): a run
    that spells the folder another way (relative here, absolute before) finds them."""
    work, data = tiny_data
    monkeypatch.chdir(os.path.dirname(work))
    rel = os.path.basename(work)
    rel_data = os.path.join(rel, os.path.relpath(data, work))
    config = {"iterations": 1, "batch_size": 4, "num_threads": 1}
    init = steps.pretrain(data, work, config=config)
    assert os.path.realpath(steps.pretrain(rel_data, rel, config=config, only_cached=True)) == init
    assert steps.pretrain(data, work, config={**config, "lr": 0.01}, only_cached=True) == ""  # other options

    state = _finished_search(work, "spelled")
    trials = [json.loads(t) for t in steps.selection_trials(state, 2, [1])]
    results = [json.dumps({**t, "reward": 0.1 * t["candidate"], "failed": False}) for t in trials]
    chosen = steps.select_loss(state, results, work, "spelled")
    rel_state = os.path.join(rel, os.path.relpath(state, work))
    assert os.path.realpath(steps.select_loss(rel_state, results, rel, "spelled")) == chosen

    final = {"preset": "smoke", "iterations": 2}
    first = json.loads(steps.final_train(data, init, "focal+l1", final, work, "spelled"))
    rel_init = os.path.join(rel, os.path.relpath(init, work))
    again = json.loads(steps.final_train(rel_data, rel_init, "focal+l1", final, rel, "spelled"))
    assert again["seconds"] == first["seconds"] and again["metrics"] == first["metrics"]  # read back, not retrained


def test_a_stored_trial_of_another_seed_is_not_reused(tiny_data, tmp_path):
    """The same θ trained with another seed (a selection run again with other seeds)
    is trained anew, not read back from the file of the first seed."""
    work, data = tiny_data
    state = _finished_search(work, "sel-seed")
    first, second = (json.loads(steps.selection_trials(state, 1, [s])[0]) for s in (1, 2))
    out = steps._trial_uri(work, "sel-seed", first["round"], first["sample"])
    storage.write_json(out, {**first, "reward": 0.5, "failed": False, "error": ""})
    assert json.loads(steps.proxy_trial(data, _bad_init(tmp_path), first, {"preset": "smoke"}, work, "sel-seed",
                                        state=state))["reward"] == 0.5  # its own seed: the stored result
    again = json.loads(steps.proxy_trial(data, _bad_init(tmp_path), second, {"preset": "smoke"}, work, "sel-seed",
                                         state=state))
    assert again["failed"] and "expected a backbone written by" in again["error"] and again["seed"] == 2


def test_a_selection_run_again_with_more_seeds_reuses_and_keeps_the_first_ones_trials(tiny_data, tmp_path):
    """Seeds 1,2 then 1,2,3: the trials are numbered anew (candidate × 3 + seed index),
    yet seeds 1 and 2 are read back from the first selection's files, a result whose
    name a new trial takes is kept aside rather than overwritten, and a result of
    another warm start is not reused."""
    work, data = tiny_data
    state = _finished_search(work, "sel-more")
    warm, other = str(tmp_path / "ws0.pt"), str(tmp_path / "ws1.pt")
    first = [json.loads(t) for t in steps.selection_trials(state, 2, [1, 2])]
    for t in first:
        storage.write_json(steps._trial_uri(work, "sel-more", t["round"], t["sample"]),
                           {**t, "init": warm, "reward": 0.3 + 0.1 * t["candidate"] + 0.01 * t["seed"],
                            "failed": False, "error": ""})
    more = [json.loads(t) for t in steps.selection_trials(state, 2, [1, 2, 3])]
    assert [t["sample"] for t in more if t["candidate"] == 1 and t["seed"] == 1] == [3]  # s02 in the first
    for t in more:
        got = steps.stored_trial(work, "sel-more", t, warm)
        if t["seed"] == 3:
            assert got is None
        else:
            assert (got["round"], got["sample"], got["seed"]) == (t["round"], t["sample"], t["seed"])
            assert got["reward"] == pytest.approx(0.3 + 0.1 * t["candidate"] + 0.01 * t["seed"])
        assert steps.stored_trial(work, "sel-more", t, other) is None  # another warm start
    new = next(t for t in more if t["candidate"] == 0 and t["seed"] == 3)
    assert new["sample"] == 2 == first[2]["sample"] and first[2]["candidate"] == 1  # the name the first's c1 s1 held
    res = json.loads(steps.proxy_trial(data, _bad_init(tmp_path), new, {"preset": "smoke"}, work, "sel-more",
                                       state=state))
    assert res["failed"] and res["seed"] == 3
    kept = steps.stored_trial(work, "sel-more", first[2], warm)
    assert kept is not None and kept["reward"] == pytest.approx(0.41) and kept["seed"] == 1
    assert len([f for f in storage.list_files(os.path.join(steps.search_dir(work, "sel-more"), "trials"))
                if f.startswith("r002-s02-")]) == 1


def test_a_proxy_trial_whose_boxes_collapse_stops_early_with_its_measured_reward(tiny_data, tmp_path):
    """The proxy option box_collapse reaches the engine: a trial of a loss that trains its
    boxes worse stops early, is not failed (a search goes on past it), and its reward is
    the AP of the model as it was then; the stored result says so."""
    from tests.test_engine import BOX_COLLAPSING

    work, data = tiny_data
    out = steps.init_search(str(tmp_path), "collapse", 1, 2, seed=0, controller={"sigma": 0.1})
    trial = {**json.loads(out["trials"][0]), "theta": list(BOX_COLLAPSING.to_theta())}
    proxy = {"preset": "smoke", "iterations": 40, "diverge_patience": 3, "box_collapse": 0.5}
    res = json.loads(steps.proxy_trial(data, "", trial, proxy, str(tmp_path), "collapse", state=out["state"]))
    assert res["box_collapsed"] and not res["failed"] and not res["diverged"]
    assert res["reward"] == res["metrics"]["AP"]
    stored = storage.read_json(steps._trial_uri(str(tmp_path), "collapse", 0, 0))
    assert stored["box_collapsed"] and 3 < len(stored["losses"]) < 40
    assert len(stored["box_quality"]) == len(stored["losses"]) and stored["box_quality"][-1] < 0.5
    assert "box_quality" not in res and "losses" not in res  # the step's output stays small
