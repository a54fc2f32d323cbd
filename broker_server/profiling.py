"""Profile every thread of the server into one pstats file (cProfile alone sees only the thread that enabled it)."""

from __future__ import annotations

import cProfile
import pstats
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any


class ThreadProfiles:
    """cProfile in the calling thread and in every thread started after `start()`, dumped together by `dump()`.

    Times are each thread's CPU time, so blocking waits and a busy machine's preemption do not count.
    `threading.setprofile` hands each new thread a hook that, on its first event, enables a fresh profiler in
    that thread (cProfile replaces the hook from then on). Dump once the threads of interest have stopped.
    """

    def __init__(self) -> None:
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.setprofile(self._enable_here)
        self._enable_here(None, "call", None)

    def _enable_here(self, _frame: FrameType | None, _event: str, _arg: Any) -> None:
        profile = cProfile.Profile(time.thread_time)  # CPU time of the thread: waits and preemption excluded
        with self._lock:
            self._profiles.append(profile)
        profile.enable()

    def dump(self, path: Path) -> None:
        """Write the threads' profiles, merged, to `path` (pstats format)."""
        threading.setprofile(None)  # None removes the hook
        with self._lock:
            profiles = list(self._profiles)
        for profile in profiles:
            profile.disable()
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(str(path))
