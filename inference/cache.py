"""A TTL cache of loaded predictors whose time-to-live restarts on every use.

Loading a real nnU-Net checkpoint takes seconds; keeping predictors between jobs is what makes a
node fast. The reference keeps them in a ``cachetools.TTLCache`` whose TTL counts from the
insertion, so a busy model is reloaded every five minutes, and its ``/expire`` only drops entries
that have already expired. Here an entry lives ``ttl_s`` after its *last* use, a background thread
sweeps expired entries every ``sweep_s``, :meth:`PredictorCache.clear` empties everything, the
number of entries is bounded (least recently used evicted first), and two jobs asking for the same
key at once load it once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from cachetools import TTLCache

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


class _Pending:
    """A load in progress: others asking for the same key wait on it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class PredictorCache:
    """Loaded predictors by key (model folder, folds, checkpoint, mirroring, device).

    ``get(key, loader)`` returns the cached value and restarts its TTL, or calls ``loader()`` once
    (outside the lock, so other keys stay available while a model loads) and caches the result.
    ``timer`` is injectable so tests can move time without sleeping. A key's value is what its
    loader returned, so ``get`` returns the loader's type.
    """

    def __init__(
        self,
        ttl_s: float = 300.0,
        max_entries: int = 4,
        sweep_s: float = 60.0,
        *,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_entries < 1 or sweep_s <= 0:
            raise ValueError("ttl_s and sweep_s must be > 0 and max_entries >= 1")
        self.ttl_s = ttl_s
        self.sweep_s = sweep_s
        self.max_entries = max_entries
        self._timer = timer
        self._entries: TTLCache[Hashable, Any] = TTLCache(
            maxsize=max_entries, ttl=ttl_s, timer=timer
        )
        self._lock = threading.RLock()
        self._pending: dict[Hashable, _Pending] = {}
        self._used: dict[Hashable, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = CacheStats()

    # --- use ------------------------------------------------------------------------------
    def get(self, key: Hashable, loader: Callable[[], T]) -> T:
        while True:
            with self._lock:
                try:
                    value = self._entries[key]
                except KeyError:
                    pass
                else:
                    # Re-inserting restarts the TTL: cachetools counts from the last write.
                    self._entries[key] = value
                    self._used[key] = self._timer()
                    self.stats.hits += 1
                    return cast(T, value)
                pending = self._pending.get(key)
                if pending is None:
                    pending = _Pending()
                    self._pending[key] = pending
                    owner = True
                    self.stats.misses += 1
                else:
                    owner = False
            if owner:
                return self._load(key, loader, pending)
            pending.done.wait()
            if pending.error is None:
                with self._lock:
                    self.stats.hits += 1
                return cast(T, pending.value)
            # The load failed for the first caller; try once more ourselves.
            with self._lock:
                if self._pending.get(key) is pending:
                    del self._pending[key]

    def _load(self, key: Hashable, loader: Callable[[], T], pending: _Pending) -> T:
        try:
            started = time.perf_counter()
            value = loader()
            LOGGER.info("loaded %s in %.2f s", _describe(key), time.perf_counter() - started)
        except BaseException as exc:
            pending.error = exc
            with self._lock:
                self._pending.pop(key, None)
            pending.done.set()
            raise
        with self._lock:
            self._entries.expire()
            if key not in self._entries and len(self._entries) >= self.max_entries:
                self.stats.evictions += 1  # TTLCache drops the least recently used one
            self._entries[key] = value
            self._used[key] = self._timer()
            for old_key in [k for k in self._used if k not in self._entries]:
                del self._used[old_key]
            self.stats.loads += 1
            self._pending.pop(key, None)
        pending.value = value
        pending.done.set()
        return value

    # --- maintenance ------------------------------------------------------------------------
    def expire(self) -> int:
        """Drop entries whose TTL has run out; return how many."""
        with self._lock:
            expired = self._entries.expire()
            return len(expired)

    def clear(self) -> int:
        """Drop every entry (``/expire``); return how many were held."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
        if count:
            LOGGER.info("predictor cache emptied (%d entries)", count)
        return count

    def snapshot(self) -> list[dict[str, Any]]:
        """What is held now and for how long it stays, for status pages."""
        with self._lock:
            self._entries.expire()
            now = self._timer()
            return [
                {
                    "key": _describe(key),
                    "expires_in_s": round(self._used.get(key, now) + self.ttl_s - now, 1),
                }
                for key in self._entries
            ]

    def held_keys(self) -> list[Hashable]:
        """The keys held now (for status pages: the engine's keys name folder and device)."""
        with self._lock:
            self._entries.expire()
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            self._entries.expire()
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def start(self) -> None:
        """Sweep expired entries every ``sweep_s`` in a daemon thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._sweep, name="predictor-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _sweep(self) -> None:
        while not self._stop.wait(self.sweep_s):
            dropped = self.expire()
            if dropped:
                LOGGER.info("predictor cache: %d expired entries dropped", dropped)


def _describe(key: Hashable) -> str:
    return str(key)
