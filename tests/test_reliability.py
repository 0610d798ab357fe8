"""Reliability: the controller keeps its word, files are made for a team, secrets stay
secret, temporary files do not outlive their writer (docs/reliability.md)."""

from __future__ import annotations

import copy
import math
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from paploss import storage
from paploss.errors import mask
from paploss.search import Controller


# ----------------------------------------------------------------------------- the controller


@pytest.mark.parametrize("rewards", [
    [1.7e308, 1.7e308, 0.0, 0.0],     # the mean overflows
    [1.7e308, -1.7e308, 0.0, 0.0],    # an advantage overflows
    [float("nan"), 1.7e308, 1.7e308, 0.0],  # with a failed trial among them
])
def test_overflowing_rewards_raise_and_leave_the_controller_unchanged(rewards):
    c = Controller(rounds=3, steps=5)
    c.update(c.sample(4), [0.1, 0.2, 0.3, 0.4])
    before = copy.deepcopy(c.state_dict())
    thetas = c.sample(4)
    with pytest.raises(ValueError, match="overflow|not finite"):
        c.update(thetas, rewards)
    assert c.state_dict() == before
    assert all(math.isfinite(x) for x in c.mu.tolist())
    # and it goes on as if the bad call had not happened
    twin = Controller.from_state_dict(before)
    assert c.update(thetas, [0.0, 0.1, 0.2, 0.3]) == twin.update(thetas, [0.0, 0.1, 0.2, 0.3])


def test_failed_trials_still_count_as_min_reward():
    """NaN / Inf rewards are failed trials (SPEC §3), not an overflow."""
    c = Controller(rounds=2, steps=5, min_reward=0.0)
    with pytest.warns(RuntimeWarning, match="failed trial"):
        rec = c.update(c.sample(4), [float("nan"), float("inf"), 0.2, 0.3])
    assert rec.failed == [0, 1] and c.round == 1


def test_controller_has_no_file_io():
    assert not any(hasattr(Controller, name) for name in ("save", "load"))
    c = Controller(rounds=2, steps=5)
    with pytest.raises(ValueError, match="JSON object"):
        Controller.from_state_dict('{"format": "paploss.search.Controller"}')
    assert Controller.from_state_dict(c.state_dict()).state_dict() == c.state_dict()
