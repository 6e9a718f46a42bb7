"""Per-point file locks in a result folder, so that concurrent sweeps into one folder split the work.

    locks = PointLocks("results/sweep")
    busy = [k for k in keys if not locks.claim(k)]  # another process evaluates these now
    ...                                             # evaluate the claimed points
    locks.wait(busy)                                # until the other process has finished them
    locks.release()

A claimed point is an exclusive lock (:mod:`filelock`) on ``<root>/locks/<key>.lock``, held until
:meth:`PointLocks.release` or the end of the process (the operating system drops the lock of a
process that dies, so a crashed sweep never blocks the next one). The lock files stay behind,
empty; they hold no result.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock, Timeout


class PointLocks:
    """The points of one results folder this process evaluates (``enabled=False``: every claim
    succeeds without a lock, for processes that split questions instead, redundancy.distributed)."""

    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.folder = Path(root) / "locks"
        self.enabled = enabled
        self.held: dict[str, FileLock] = {}

    def _lock(self, key: str) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(self.folder / f"{key}.lock")

    def claim(self, key: str) -> bool:
        """Take ``key`` if no other process holds it; False when one does."""
        if not self.enabled or key in self.held:
            return True
        lock = self._lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        self.held[key] = lock
        return True

    def wait(self, keys: Iterable[str]) -> None:
        """Block until no other process holds any of ``keys``."""
        for key in keys:
            if self.enabled and key not in self.held:
                with self._lock(key):
                    pass

    def release(self) -> None:
        for lock in self.held.values():
            lock.release()
        self.held.clear()
