"""Stall warnings name the phase the run is stuck in, once per stall, after factor x the median step."""

from __future__ import annotations

import time

from rlhf.production.metrics import Timer, current_phase
from rlhf.production.watchdog import StallWatchdog


def test_a_stalled_step_is_reported_once_with_its_phase():
    warnings: list[str] = []
    dog = StallWatchdog(factor=5, warn=warnings.append, min_s=0.0)
    start = time.monotonic()
    assert dog.check(start + 100) is None  # no median yet
    for seconds in (1.0, 2.0, 3.0):
        dog.step_done(seconds)
    now = dog.last_end
    assert dog.check(now + 9.9) is None  # median 2 s: within 5 x 2 = 10 s
    timer = Timer()
    with timer.phase("generate"):
        assert current_phase()[0] == "generate"
        message = dog.check(now + 12.0)
        assert message.startswith("warning: no step finished in 12s (5 x the median step time 2.0s)")
        assert "in phase 'generate'" in message
        assert dog.check(now + 30.0) is None  # once per stall
    assert current_phase()[0] is None
    dog.step_done(2.0)  # a step finished: the next stall is reported again
    assert "between phases" in dog.check(dog.last_end + 11.0)


def test_floor_and_off_switch():
    dog = StallWatchdog(factor=5, warn=print, min_s=60.0)
    dog.step_done(1.0)
    dog.step_done(1.0)
    assert dog.check(dog.last_end + 30.0) is None  # 5 x 1 s, but never before the 60 s floor
    assert dog.check(dog.last_end + 61.0) is not None
    off = StallWatchdog(factor=0, warn=print)
    off.step_done(1.0)
    off.step_done(1.0)
    assert off.check(off.last_end + 1e6) is None


def test_the_thread_warns_and_stops():
    warnings: list[str] = []
    dog = StallWatchdog(factor=1, warn=warnings.append, min_s=0.0, poll_s=0.02)
    dog.step_done(0.01)
    dog.step_done(0.01)
    dog.start()
    time.sleep(0.3)
    dog.stop()
    assert len(warnings) == 1 and "no step finished" in warnings[0]
