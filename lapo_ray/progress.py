"""Progress lines with rate and ETA for long work (collection, training, labelling, rollouts)."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Prints ``desc: done/total unit (pct) | rate unit/s | elapsed | ETA`` at most every
    ``interval`` seconds and once at the end. Plain lines, so they read well in ``ray job logs``."""

    def __init__(self, total: float, desc: str, unit: str = "it", interval: float = 5.0, stream=None):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = stream or sys.stdout
        self.done = 0.0
        self.start = self._last = time.monotonic()
        self.extra = ""

    def update(self, n: float = 1, extra: str = "") -> None:
        self.done += n
        if extra:
            self.extra = extra
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            self.print()

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_s = format_duration(eta) if eta != float("inf") else "?"
        s = (f"{self.desc}: {self.done:,.0f}/{self.total:,.0f} {self.unit} ({pct:.1f}%) | "
             f"{rate:,.1f} {self.unit}/s | elapsed {format_duration(elapsed)} | ETA {eta_s}")
        return s + (f" | {self.extra}" if self.extra else "")

    def print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
