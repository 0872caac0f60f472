"""Progress of a long stage: done/total, rate and time left, in one mechanism for every stage.

On a terminal it is a progress bar (tqdm, with the stage's log lines printed above it); in a
log file or a pipe, a plain log line at most every `every` seconds and one at the end, so a
long stage is never silent for more than that. Early-stopped stages (the MLE fits, DPG) give
their maximum as the total: their time left is an upper bound ("<=").
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("gam_rl")

EVERY_S = 20.0  # the longest silence of a long stage in a log file


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """progress = Progress("z", total=200000, unit="samples"); progress.update(done, note="...")"""

    def __init__(self, stage: str, total: float, unit: str, *, upper_bound: bool = False, every: float = EVERY_S,
                 bar: bool | None = None):
        self.stage, self.total, self.unit, self.upper_bound, self.every = stage, total, unit, upper_bound, every
        self.started = self.last_line = time.perf_counter()
        self.done, self.note = 0.0, ""
        self.bar = None
        if bar if bar is not None else sys.stderr.isatty():
            self.bar = tqdm(total=total, unit=f" {unit}", desc=stage, leave=False, dynamic_ncols=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else ("<= " if self.upper_bound else "") + _duration(left)
        return (f"[{self.stage}] {self.done:,.0f}/{self.total:,.0f} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{rate:,.1f} {self.unit}/s, {_duration(elapsed)} elapsed, {eta} left"
                + (f"; {self.note}" if self.note else ""))

    def update(self, done: float, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        if self.bar is not None:
            self.bar.update(done - self.done)
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
        self.done = done
        now = time.perf_counter()
        if self.bar is None and now - self.last_line >= self.every:
            self.last_line = now
            log.info("%s", self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def stage_output():
    """Log lines printed above a progress bar (on a terminal) instead of through it."""
    if sys.stderr.isatty():
        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            yield
    else:
        yield
