"""Progress of the slow starts (model load, conversion, CUDA-graph capture): a tqdm bar when
stderr is a terminal, and a few plain log lines when it is not (a log file, a pod's log), so
neither a person watching nor a log collector gets a wall of carriage returns."""

from __future__ import annotations

import logging
import sys
import time


class Progress:
    def __init__(self, what: str, total: int, unit: str, log: logging.Logger):
        self.what, self.total, self.unit, self.log = what, total, unit, log
        self.done, self.started, self._next_line = 0, time.perf_counter(), 0.25
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done / self.total >= self._next_line and self.done < self.total:
            self.log.info("%s: %d/%d %s", self.what, self.done, self.total, self.unit)
            self._next_line += 0.25

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log.info("%s: %d %s in %.1f s", self.what, self.done, self.unit,
                      time.perf_counter() - self.started)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
