"""The progress display: step lines in, display lines out; a terminal gets a status line,
CI (no terminal) one plain line per event and a heartbeat instead of silence."""

from __future__ import annotations

import io

import pytest

from paploss import presets
from paploss.progress import Event, Plan, Progress, format_duration, parse

PLAN = Plan(rounds=2, samples=4, parallelism=2, proxy_iterations=100, sweep=8, sweep_iterations=100, finals=4,
            final_iterations=400)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _show(tty: bool, heartbeat: float = 30.0):
    out, clock = io.StringIO(), Clock()
    return Progress(PLAN, out, tty=tty, clock=clock, heartbeat=heartbeat), out, clock


def test_parse_reads_the_steps_lines_wherever_indented():
    ev = parse("      paploss> round 1 sample 4: reward 0.1234 (35s)")  # the lines count from 1, the events from 0
    assert ev == Event("trial", "round 1 sample 4: reward 0.1234 (35s)", round=0, sample=3, reward=0.1234,
                       seconds=35.0)
    failed = parse("paploss> round 2 sample 1: FAILED (3s; stopped early: its boxes collapsed)")
    assert failed.kind == "trial" and failed.reward is None and (failed.round, failed.sample) == (1, 0)
    assert parse("paploss> round 2/2: mean reward 0.1000, max 0.2, failed 0 (total 0)").round == 2
    assert parse("paploss> final focal+l1: AP 0.2500").loss == "focal+l1"
    sweep = parse("paploss> lr sweep start at lr 0.02: search-val AP 3.50 (41s)")
    assert (sweep.kind, sweep.loss, sweep.lr, sweep.reward, sweep.seconds) == ("sweep", "start", 0.02, 0.035, 41.0)
    assert parse("paploss> pre-training the warm start (x)").stage == "pretrain"
    assert parse("paploss> lr sweep: focal+l1 lr 0.02, start lr 0.01").stage == "lr-sweep"
    assert parse("paploss> something new").kind == "note"
    assert parse("an executor line of kfp") is None


def test_one_numbering_rounds_and_trials_count_from_one():
    show, out, clock = _show(tty=False)
    show.feed("paploss> round 1 sample 1: reward 0.1000 (20s)")
    show.feed("paploss> round 1/2: mean reward 0.1000, max 0.1")
    show.feed("paploss> round 2 sample 4: reward 0.2000 (20s)")
    text = out.getvalue()
    assert "round 1/2  trial 1/4: reward 10.00 AP (20 s)" in text
    assert "round 1/2 done: mean reward 10.00 AP" in text
    assert "round 2/2  trial 4/4: reward 20.00 AP" in text
    assert "round 0" not in text and "\x1b" not in text  # no 0-based round, no terminal codes


def test_the_eta_learns_from_the_trainings_done():
    show, out, clock = _show(tty=False)
    assert show.eta() is None  # nothing finished: no guess
    clock.t += 30
    show.feed("paploss> round 1 sample 1: reward 0.1000 (20s)")  # 20 s per 100 iterations
    # left: 7 trials x 100 + 8 sweeps x 100 + 4 finals x 400 = 3100 iterations, 0.2 s each, 2 side by side
    assert show.eta() == pytest.approx(0.2 * 3100 / 2)
    assert "ETA 5 min 10 s" in out.getvalue() and "30 s elapsed" in out.getvalue()
    show.feed("paploss> round 1 sample 2: reward 0.1000 (40s)")  # now 0.3 s per iteration
    assert show.eta() == pytest.approx(0.3 * 3000 / 2)
    show.feed("paploss> final searched: AP 0.3000")  # a final done: 400 iterations fewer to go
    assert show.eta() == pytest.approx(0.3 * 2600 / 2)
    clock.t += 60  # counts down while nothing finishes
    assert show.eta() == pytest.approx(0.3 * 2600 / 2 - 60)


def test_without_a_terminal_a_quiet_minute_gets_a_line():
    show, out, clock = _show(tty=False, heartbeat=30)
    show.feed("paploss> pre-training the warm start (retinanet)")
    before = out.getvalue()
    clock.t += 10
    show.tick()
    assert out.getvalue() == before  # not yet quiet for long
    clock.t += 25
    show.tick()
    added = out.getvalue()[len(before):]
    assert added.count("\n") == 1 and "still running: warm start" in added and "35 s elapsed" in added
    show.tick()  # just said so: quiet again for 30 s before the next
    assert out.getvalue()[len(before):] == added


def test_a_terminal_gets_a_status_line_redrawn_in_place():
    show, out, clock = _show(tty=True)
    show.feed("paploss> final training with searched")
    clock.t += 5
    show.tick()
    text = out.getvalue()
    assert "stage: finals" in text and "\r\x1b[2K▸ finals: final training: searched" in text
    assert "5 s elapsed" in text.rsplit("\r", 1)[1]
    show.close()
    assert out.getvalue().endswith("\r\x1b[2K")  # the status line is gone at the end


def test_the_ticker_thread_runs_inside_the_with_and_stops_after():
    out = io.StringIO()
    show = Progress(PLAN, out, tty=True, tick_every=0.01)
    import time

    with show:
        time.sleep(0.1)
    drawn = out.getvalue().count("▸")
    assert drawn >= 2
    time.sleep(0.05)
    assert out.getvalue().count("▸") == drawn


def test_the_plan_of_a_preset():
    plan = Plan.of(presets.get_preset("demo"))
    assert plan.iterations() == {"trial": (8, 80), "sweep": (8, 60), "final": (4, 400)}
    smoke = Plan.of(presets.get_preset("smoke"), finals=3)
    assert smoke.sweep == 6 and smoke.finals == 3


def test_format_duration():
    assert [format_duration(x) for x in (0, 42.4, 185, 3720)] == ["0 s", "42 s", "3 min 05 s", "1 h 02 min"]
