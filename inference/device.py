"""Where a model runs: the GPU with the most free memory above the model's ``min_mem``, else the
CPU.

The reference refuses to start without CUDA and parses ``nvidia-smi`` text; here torch is asked
(``torch.cuda.mem_get_info``), a job waits up to ``wait_s`` for a GPU with room, and a machine
without a GPU runs on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import torch

from nnunet_node.core.errors import InferenceError, JobCancelled

LOGGER = logging.getLogger(__name__)

MiB = 1024 * 1024


def cuda_free_mib() -> list[int]:
    """Free memory of each visible CUDA device in MiB (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    free: list[int] = []
    for index in range(torch.cuda.device_count()):
        try:
            free_bytes, _total = torch.cuda.mem_get_info(index)
        except RuntimeError as exc:  # a device that is busy or lost: skip it
            LOGGER.warning("cannot read free memory of cuda:%d: %s", index, exc)
            free.append(-1)
            continue
        free.append(int(free_bytes // MiB))
    return free


def cuda_memory() -> list[tuple[str, int, int]]:
    """``(device, used bytes, total bytes)`` of each visible CUDA device (empty without CUDA):
    what the whole device has in use, by any process (``torch.cuda.mem_get_info``)."""
    if not torch.cuda.is_available():
        return []
    out: list[tuple[str, int, int]] = []
    for index in range(torch.cuda.device_count()):
        try:
            free_bytes, total = torch.cuda.mem_get_info(index)
        except RuntimeError as exc:
            LOGGER.warning("cannot read the memory of cuda:%d: %s", index, exc)
            continue
        out.append((f"cuda:{index}", int(total - free_bytes), int(total)))
    return out


class DevicePolicy:
    """Chooses the device for a model needing ``min_mem`` MiB.

    ``mode``: ``auto`` (GPU when there is one, else CPU), ``cpu`` or ``cuda`` (never fall back).
    ``probe`` returns the free MiB per GPU and is injectable for tests.
    """

    def __init__(
        self,
        mode: Literal["auto", "cpu", "cuda"] = "auto",
        wait_s: float = 600.0,
        *,
        poll_s: float = 2.0,
        probe: Callable[[], list[int]] = cuda_free_mib,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if mode not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device mode {mode!r} is not auto, cpu or cuda")
        self.mode = mode
        self.wait_s = wait_s
        self.poll_s = poll_s
        self._probe = probe
        self._sleep = sleep

    def gpu_count(self) -> int:
        return 0 if self.mode == "cpu" else len(self._probe())

    def status(self) -> dict[str, object]:
        """For readiness probes: whether a GPU is there and the most free memory on one."""
        free = [] if self.mode == "cpu" else self._probe()
        return {
            "mode": self.mode,
            "gpu_available": bool(free),
            "max_free_mem": max(free) if free else None,
        }

    def choose(
        self, min_mem: int, *, should_stop: Callable[[], bool] | None = None
    ) -> torch.device:
        """The device to run a model needing ``min_mem`` MiB on; waits up to ``wait_s`` for a
        GPU."""
        if self.mode == "cpu":
            return torch.device("cpu")
        deadline = time.monotonic() + self.wait_s
        while True:
            free = self._probe()
            if not free:
                if self.mode == "cuda":
                    raise InferenceError("device mode is 'cuda' but no CUDA device is visible")
                return torch.device("cpu")
            best = max(range(len(free)), key=lambda i: free[i])
            if free[best] >= min_mem:
                LOGGER.debug("cuda:%d has %d MiB free (need %d)", best, free[best], min_mem)
                return torch.device("cuda", best)
            if should_stop is not None and should_stop():
                raise JobCancelled("cancelled while waiting for a GPU")
            if time.monotonic() >= deadline:
                raise InferenceError(
                    f"no GPU with {min_mem} MiB free after waiting {self.wait_s:.0f} s "
                    f"(most free: {free[best]} MiB)"
                )
            self._sleep(self.poll_s)
