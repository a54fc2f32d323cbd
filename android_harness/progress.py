"""Trial progress: a live bar on a terminal, one plain line every few seconds in a log (CI, `> file`)."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

from tqdm import tqdm

PLAIN_EVERY_S = 10.0


class Progress(Protocol):
    """What a trial reports its progress through (tqdm's own names)."""

    n: int

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> None: ...

    def close(self) -> None: ...


class PlainProgress:
    """One line per PLAIN_EVERY_S (and a last one at the end), instead of a stream of carriage returns."""

    def __init__(self, *, total: int, desc: str, every_s: float = PLAIN_EVERY_S) -> None:
        self.n = 0
        self.total = total
        self.desc = desc
        self.every_s = every_s
        self._started = self._printed = time.monotonic()
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._printed >= self.every_s:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self._postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        self._print()

    def _print(self) -> None:
        self._printed = time.monotonic()
        elapsed = self._printed - self._started
        line = f"{self.desc}: {self.n}/{self.total} {self._postfix} ({elapsed:.0f} s)"
        print(" ".join(line.split()), file=sys.stderr, flush=True)


def progress_bar(*, total: int, desc: str, enabled: bool) -> Progress:
    """A tqdm bar where standard error is a terminal, plain lines where it is not, nothing when disabled."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total=total, desc=desc)
    return tqdm(total=total, desc=desc, unit="ep", disable=not enabled)
