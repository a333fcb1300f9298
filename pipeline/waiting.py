"""Waiting for a job from the event loop, without blocking it.

:meth:`JobWaiter.wait` is a coroutine: it reads the job's status in a thread, then sleeps on an
asyncio event until :meth:`JobWaiter.notify` (called from any thread when this process changes
the job) or ``poll_s`` passes (a worker in another process changed it).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from nnunet_node.storage.jobs import JobRecord, JobStore, is_terminal


class JobWaiter:
    """Waiters per job id, each an (event loop, event) pair, woken thread-safely."""

    def __init__(self, store: JobStore, *, poll_s: float = 1.0) -> None:
        self.store = store
        self.poll_s = poll_s
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._lock = threading.Lock()

    async def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Wait until the job is finished (done, failed, cancelled, superseded); after
        ``timeout`` seconds return it as it is then. Raises
        :class:`~nnunet_node.core.errors.NotFound` for an unknown job."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(entry)
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                # Cleared before the read, so a worker's notice after the read is not lost.
                event.clear()
                status = await asyncio.to_thread(self.store.status, job_id)
                remaining = None if deadline is None else deadline - loop.time()
                if is_terminal(status) or (remaining is not None and remaining <= 0):
                    return await asyncio.to_thread(self.store.get, job_id)
                step = self.poll_s if remaining is None else min(self.poll_s, remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=step)
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiters[job_id]

    def notify(self, job_id: str) -> None:
        """The job changed: wake its waiters (from any thread)."""
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(event.set)


__all__ = ["JobWaiter"]
