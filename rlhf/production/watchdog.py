"""Stall warnings: a run that has not finished a step in `logging.stall_factor` x its median step
time says so, naming the phase it is in (a hung engine, a reward service that never answers...)."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

from rlhf.production.metrics import current_phase


class StallWatchdog:
    def __init__(self, factor: float, warn: Callable[[str], None], min_s: float = 60.0, poll_s: float = 5.0):
        self.factor, self.warn, self.min_s, self.poll_s = factor, warn, min_s, poll_s
        self.durations: list[float] = []
        self.last_end = time.monotonic()
        self.warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step_done(self, seconds: float) -> None:
        self.durations = [*self.durations[-49:], seconds]
        self.last_end = time.monotonic()
        self.warned = False

    def check(self, now: float | None = None) -> str | None:
        """The warning, once per stall, when the run has waited too long for a step (else None)."""
        if self.factor <= 0 or len(self.durations) < 2 or self.warned:
            return None
        median = statistics.median(self.durations)
        waited = (time.monotonic() if now is None else now) - self.last_end
        if waited <= max(self.min_s, self.factor * median):
            return None
        self.warned = True
        name, since = current_phase()
        where = f"in phase '{name}' for {time.perf_counter() - since:.0f}s" if name else "between phases"
        return (
            f"warning: no step finished in {waited:.0f}s ({self.factor:g} x the median step time "
            f"{median:.1f}s); the run is {where}"
        )

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.poll_s):
                if message := self.check():
                    self.warn(message)

        self._thread = threading.Thread(target=loop, name="rlhf-stall-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
