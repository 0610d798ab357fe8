"""One progress display for a whole search (``paploss run`` and ``paploss search``).

The steps say what they do in ``paploss>`` lines (:func:`paploss.steps.work._log`),
whichever process runs them; :class:`Progress` reads those lines (:func:`parse`
turns one into an :class:`Event`) and shows

- the stage (data, warm start, search, lr sweep, finals, report),
- each trial as it lands: ``round r/R  trial k/S  reward x`` (1-based, one
  numbering for rounds and trials), each round's mean, each sweep point and final,
- an ETA that learns from the work done: seconds per training iteration, measured
  on the trials (then sweeps and finals) that finished, times the iterations still
  to train, divided by the trainings that run side by side.

On a terminal (``tty``) a status line at the bottom is redrawn every second (stage,
elapsed, ETA); without one (CI, a log file) each event is one plain line and, when
nothing happened for ``heartbeat`` seconds, one line says what is still running, so
no minute passes in silence.

::

    plan = Plan.of(preset)                    # what the search will train
    with Progress(plan, sys.stdout) as show:  # the ticker thread lives inside the with
        show.feed("paploss> round 1 sample 3: reward 0.1234 (35s)")
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

__all__ = ["Plan", "Event", "parse", "Progress", "format_duration", "PREFIX"]

#: The prefix of the steps' progress lines.
PREFIX = "paploss>"

_STAGE_NAMES = {"prepare-data": "data", "pretrain": "warm start", "search": "search", "selection": "selection",
                "lr-sweep": "lr sweep", "finals": "finals", "report": "report"}


@dataclass(frozen=True)
class Plan:
    """What a search will train: ``rounds`` × ``samples`` proxy trials (each of
    ``proxy_iterations``; ``reward_seeds`` trainings per sample), ``selection`` more
    trials, ``sweep`` lr-sweep trainings of ``sweep_iterations``, ``finals`` final
    trainings of ``final_iterations``; ``parallelism`` of them side by side."""

    rounds: int
    samples: int
    parallelism: int = 1
    proxy_iterations: int = 0
    reward_seeds: int = 1
    selection: int = 0
    sweep: int = 0
    sweep_iterations: int = 0
    finals: int = 0
    final_iterations: int = 0

    @classmethod
    def of(cls, preset: Any, finals: int = 4, parallelism: int | None = None) -> "Plan":
        """The plan of a :class:`paploss.presets.Preset` (iterations from its resolved options;
        a schedule in epochs counts 0 iterations and so no ETA for that part)."""
        from paploss.steps.lr_sweep import sweep_lrs
        from paploss.steps.options import train_options

        proxy = train_options(preset.proxy, preset.detector)
        final = train_options(preset.final, preset.detector)
        lrs = sweep_lrs(preset.lr_sweep)
        sweep_its = int({**final, **{k: v for k, v in preset.lr_sweep.items() if k != "lrs"}}.get("iterations") or 0)
        return cls(rounds=int(preset.rounds), samples=int(preset.samples),
                   parallelism=int(preset.parallelism if parallelism is None else parallelism),
                   proxy_iterations=int(proxy.get("iterations") or 0), reward_seeds=int(preset.reward_seeds),
                   selection=int(preset.select_top) * len(preset.select_seeds) if preset.select_top else 0,
                   sweep=finals * len(lrs) if len(lrs) >= 2 else 0, sweep_iterations=sweep_its,
                   finals=finals, final_iterations=int(final.get("iterations") or 0))

    def iterations(self) -> dict[str, tuple[int, int]]:
        """``{kind: (trainings, iterations each)}`` of the trial, sweep and final trainings."""
        return {"trial": (self.rounds * self.samples * self.reward_seeds + self.selection, self.proxy_iterations),
                "sweep": (self.sweep, self.sweep_iterations), "final": (self.finals, self.final_iterations)}


@dataclass(frozen=True)
class Event:
    """One thing that happened, parsed from a step's line.

    ``kind``: ``stage`` (``stage`` starts), ``trial`` (``round``/``sample`` 0-based,
    ``reward`` None when failed), ``round`` (``round`` 1-based, ``reward`` its mean),
    ``sweep`` (``loss``, ``lr``, ``reward``), ``final`` (``loss``, ``reward`` = AP) or
    ``note`` (any other line, shown as it is). ``seconds``: the training's own time, if said."""

    kind: str
    text: str = ""
    stage: str = ""
    round: int | None = None
    sample: int | None = None
    loss: str = ""
    lr: float | None = None
    reward: float | None = None
    seconds: float | None = None


_NUM = r"([-+0-9.eE]+|nan)"
_PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], Event]]] = [
    (re.compile(r"^(generating bundled dataset|copying .* for the search split|drawing search splits)"),
     lambda m: Event("stage", m.string, stage="prepare-data")),
    (re.compile(r"^pre-training the warm start"), lambda m: Event("stage", m.string, stage="pretrain")),
    (re.compile(r"^search \S+: \d+ rounds x \d+ samples"), lambda m: Event("stage", m.string, stage="search")),
    (re.compile(rf"^round (\d+) sample (\d+): (?:reward {_NUM}|FAILED) \((\d+)s"),
     lambda m: Event("trial", m.string, round=int(m[1]) - 1, sample=int(m[2]) - 1,  # the lines count from 1
                     reward=float(m[3]) if m[3] is not None else None, seconds=float(m[4]))),
    (re.compile(rf"^round (\d+)/(\d+): mean reward {_NUM}"),
     lambda m: Event("round", m.string, round=int(m[1]), reward=float(m[3]))),
    (re.compile(rf"^selection candidate (\d+) seed (\d+): (?:reward {_NUM}|FAILED) \((\d+)s"),
     lambda m: Event("trial", m.string, stage="selection", sample=int(m[1]),
                     reward=float(m[3]) if m[3] is not None else None, seconds=float(m[4]))),
    (re.compile(r"^lr sweep (\S+) at lr (\S+): training"),
     lambda m: Event("stage", m.string, stage="lr-sweep", loss=m[1], lr=float(m[2]))),
    (re.compile(rf"^lr sweep (\S+) at lr (\S+): search-val AP {_NUM} \((\d+)s"),
     lambda m: Event("sweep", m.string, loss=m[1], lr=float(m[2]), reward=float(m[3]) / 100, seconds=float(m[4]))),
    (re.compile(r"^lr sweep: "), lambda m: Event("stage", m.string, stage="lr-sweep")),
    (re.compile(r"^final training with (\S+)"), lambda m: Event("stage", m.string, stage="finals", loss=m[1])),
    (re.compile(rf"^final (\S+): AP {_NUM}"), lambda m: Event("final", m.string, loss=m[1], reward=float(m[2]))),
]


def parse(line: str) -> Event | None:
    """The event of one output line: a ``paploss>`` line (the prefix anywhere after
    indentation); None for any other line."""
    text = line.strip()
    if not text.startswith(PREFIX):
        return None
    text = text[len(PREFIX):].strip()
    for pattern, make in _PATTERNS:
        m = pattern.match(text)
        if m:
            return make(m)
    return Event("note", text)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass
class _Done:
    trainings: dict[str, int] = field(default_factory=lambda: {"trial": 0, "sweep": 0, "final": 0})
    seconds: float = 0.0  # the finished trainings' own seconds
    iterations: int = 0  # ... and their iterations


class Progress:
    """The display: :meth:`feed` it output lines (or :meth:`event` events); it writes
    to ``stream``. ``tty`` None: ``stream.isatty()``. ``clock``: seconds (tests pass
    a fake). Used as a context manager, a ticker thread calls :meth:`tick` every
    ``tick_every`` seconds (the status line, the heartbeat)."""

    def __init__(self, plan: Plan, stream: TextIO, *, tty: bool | None = None, heartbeat: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, tick_every: float = 1.0) -> None:
        self.plan, self.stream = plan, stream
        self.tty = bool(stream.isatty()) if tty is None else bool(tty)
        self.heartbeat, self.clock, self.tick_every = float(heartbeat), clock, float(tick_every)
        self.start = self.last = clock()
        self.stage = ""
        self.detail = ""
        self.done = _Done()
        self._learned_at = self.start
        self._status = ""  # the status line now on screen (tty)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ input
    def feed(self, line: str) -> None:
        """One output line: a ``paploss>`` line becomes an event; other lines are ignored."""
        ev = parse(line)
        if ev is not None:
            self.event(ev)

    def event(self, ev: Event) -> None:
        with self._lock:
            text = self._describe(ev)
            if text:
                self._print(text)

    # ------------------------------------------------------------------ what is shown
    def _set_stage(self, stage: str) -> str:
        if stage == self.stage:
            return ""
        self.stage = stage
        return f"stage: {_STAGE_NAMES.get(stage, stage)}"

    def _learn(self, kind: str, seconds: float | None) -> None:
        self.done.trainings[kind] += 1
        count, iterations = self.plan.iterations()[kind]
        if seconds is not None and iterations:
            self.done.seconds += float(seconds)
            self.done.iterations += iterations
        self._learned_at = self.clock()

    def eta(self) -> float | None:
        """Seconds still to go, from the measured seconds per iteration, less the time since
        the last training finished; None before one finished."""
        if not self.done.iterations:
            return None
        per_iteration = self.done.seconds / self.done.iterations
        left = sum(max(0, count - self.done.trainings[kind]) * its
                   for kind, (count, its) in self.plan.iterations().items())
        return max(0.0, per_iteration * left / max(1, self.plan.parallelism) - (self.clock() - self._learned_at))

    def _suffix(self) -> str:
        eta = self.eta()
        return f"   [{format_duration(self.clock() - self.start)} elapsed" + (
            f", ETA {format_duration(eta)}]" if eta is not None else "]")

    def _describe(self, ev: Event) -> str:
        p = self.plan
        if ev.kind == "stage":
            head = self._set_stage(ev.stage)
            if ev.stage == "lr-sweep" and ev.lr is not None:
                self.detail = f"lr sweep: {ev.loss} at lr {ev.lr:g}"
                return head
            if ev.stage == "finals":
                self.detail = f"final training: {ev.loss}"
                return "\n".join(x for x in (head, f"final {ev.loss}: training") if x)
            self.detail = f"round 1/{self.plan.rounds}: trials training" if ev.stage == "search" else ev.text
            return "\n".join(x for x in (head, ev.text) if x)
        if ev.kind == "trial":
            self._learn("trial", ev.seconds)
            reward = "FAILED" if ev.reward is None else f"reward {100 * ev.reward:.2f} AP"
            if ev.stage == "selection":
                head = self._set_stage("selection")
                line = f"selection candidate {ev.sample}: {reward} ({ev.seconds:.0f} s)"
            else:
                head = self._set_stage("search")
                line = f"round {ev.round + 1}/{p.rounds}  trial {ev.sample + 1}/{p.samples}: {reward} " \
                       f"({ev.seconds:.0f} s)"
            self.detail = line
            return "\n".join(x for x in (head, line + self._suffix()) if x)
        if ev.kind == "round":
            line = f"round {ev.round}/{p.rounds} done: mean reward {100 * ev.reward:.2f} AP"
            self.detail = f"round {ev.round + 1}/{p.rounds}: trials training" if ev.round < p.rounds else line
            return line + self._suffix()
        if ev.kind == "sweep":
            self._learn("sweep", ev.seconds)
            head = self._set_stage("lr-sweep")
            k = self.done.trainings["sweep"]
            line = f"lr sweep {k}/{p.sweep or '?'}: {ev.loss} at lr {ev.lr:g}: search-val AP {100 * ev.reward:.2f}"
            return "\n".join(x for x in (head, line + self._suffix()) if x)
        if ev.kind == "final":
            self._learn("final", None)
            k = self.done.trainings["final"]
            return f"final {k}/{p.finals or '?'}: {ev.loss}: AP {100 * ev.reward:.2f}" + self._suffix()
        return ev.text

    # ------------------------------------------------------------------ output
    def _print(self, text: str) -> None:
        self.last = self.clock()
        if self.tty and self._status:
            self.stream.write("\r\x1b[2K")  # clear the status line, print, redraw it below
        self.stream.write(text + "\n")
        if self.tty:
            self._draw()
        self.stream.flush()

    def _status_text(self) -> str:
        stage = _STAGE_NAMES.get(self.stage, self.stage) or "starting"
        return f"▸ {stage}: {self.detail}"[:100] + self._suffix()

    def _draw(self) -> None:
        self._status = self._status_text()
        self.stream.write("\r\x1b[2K" + self._status)

    def tick(self) -> None:
        """Redraw the status line (tty), or, without a tty, say what still runs when
        nothing was printed for ``heartbeat`` seconds."""
        with self._lock:
            if self.tty:
                self._draw()
                self.stream.flush()
            elif self.clock() - self.last >= self.heartbeat:
                stage = _STAGE_NAMES.get(self.stage, self.stage) or "starting"
                self._print(f"... still running: {stage}" + (f" ({self.detail})" if self.detail else "")
                            + self._suffix())

    def close(self) -> None:
        """Stop the ticker; leave the cursor on a fresh line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.tty and self._status:
                self.stream.write("\r\x1b[2K")
                self._status = ""
                self.stream.flush()

    def __enter__(self) -> "Progress":
        def ticker() -> None:
            while not self._stop.wait(self.tick_every):
                self.tick()

        self._stop.clear()
        self._thread = threading.Thread(target=ticker, name="paploss-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

