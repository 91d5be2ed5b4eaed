"""What this worker process has rendered: counted where a micro-batch's render returns
(worker/tasks.py), read by the heartbeat (worker/presence.py) and the metrics endpoint
(worker/metrics.py).

One instance per process: a prefork child starts from the zeros it inherited at the fork (the
parent never renders). A threads pool renders from several threads at once, hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Totals:
    images: int
    render_s: float  # inside pipeline calls
    busy_s: float  # inside render tasks: rendering, claiming, waiting for storage
    peak_memory_mb: float | None  # the highest micro-batch peak (worker/memory.py), weights included


# Told about every rendered micro-batch: (images, seconds). The metrics endpoint observes here.
RenderObserver = Callable[[int, float], None]


class RenderCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._images = 0
        self._render_s = 0.0
        self._busy_s = 0.0
        self._peak_mb: float | None = None
        self.observers: list[RenderObserver] = []

    def rendered(self, images: int, seconds: float, peak_mb: float | None) -> None:
        with self._lock:
            self._images += images
            self._render_s += seconds
            if peak_mb is not None:
                self._peak_mb = max(self._peak_mb or 0.0, peak_mb)
        for observe in self.observers:
            observe(images, seconds)

    def busy(self, seconds: float) -> None:
        with self._lock:
            self._busy_s += seconds

    def totals(self) -> Totals:
        with self._lock:
            return Totals(self._images, self._render_s, self._busy_s, self._peak_mb)


COUNTERS = RenderCounters()
