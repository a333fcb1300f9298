"""The predictor cache (hit, TTL refreshed on use, expiry, flush, bound, concurrency) and the device
policy (GPU with most free memory, waiting, CPU fallback)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from nnunet_node.core.errors import InferenceError, JobCancelled
from nnunet_node.inference.cache import PredictorCache
from nnunet_node.inference.device import DevicePolicy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_hit_refresh_and_expiry() -> None:
    clock = Clock()
    cache = PredictorCache(ttl_s=300, max_entries=4, sweep_s=60, timer=clock)
    loads: list[str] = []

    def loader() -> object:
        loads.append("m")
        return object()

    first = cache.get("m", loader)
    assert cache.get("m", loader) is first and loads == ["m"]
    # Used every 200 s: the reference's TTL counted from insertion would drop it at 300 s.
    for _ in range(5):
        clock.now += 200
        assert cache.get("m", loader) is first
    assert loads == ["m"] and cache.stats.hits == 6
    snap = cache.snapshot()
    assert snap == [{"key": "m", "expires_in_s": 300.0}]
    clock.now += 301
    assert cache.expire() == 1 and len(cache) == 0
    assert cache.get("m", loader) is not first and loads == ["m", "m"]


def test_clear_empties_everything_not_only_expired_entries() -> None:
    cache = PredictorCache(ttl_s=300, max_entries=4, sweep_s=60, timer=Clock())
    for key in "abc":
        cache.get(key, object)
    assert cache.clear() == 3 and len(cache) == 0 and cache.snapshot() == []


def test_entries_are_bounded_least_recently_used_first() -> None:
    cache = PredictorCache(ttl_s=300, max_entries=2, sweep_s=60, timer=Clock())
    cache.get("a", object)
    cache.get("b", object)
    cache.get("a", object)  # a is now the most recently used
    cache.get("c", object)
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.stats.evictions == 1


def test_sweeper_thread_drops_expired_entries() -> None:
    clock = Clock()
    cache = PredictorCache(ttl_s=10, max_entries=2, sweep_s=0.01, timer=clock)
    cache.get("a", object)
    cache.start()
    try:
        clock.now += 11
        deadline = time.monotonic() + 5
        while "a" in cache and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "a" not in cache
    finally:
        cache.stop()


def test_two_jobs_asking_for_one_model_load_it_once() -> None:
    cache = PredictorCache(ttl_s=300, max_entries=2, sweep_s=60)
    started = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def slow_loader() -> object:
        calls.append(1)
        started.set()
        release.wait(5)
        return "predictor"

    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("k", slow_loader)))
        for _ in range(3)
    ]
    threads[0].start()
    assert started.wait(5)
    for t in threads[1:]:
        t.start()
    # Another key stays available while "k" loads.
    assert cache.get("other", lambda: "x") == "x"
    release.set()
    for t in threads:
        t.join(5)
    assert results == ["predictor"] * 3 and len(calls) == 1


def test_a_failed_load_is_not_cached_and_can_be_retried() -> None:
    cache = PredictorCache(ttl_s=300, max_entries=2, sweep_s=60)

    def broken() -> object:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        cache.get("k", broken)
    assert cache.get("k", lambda: "ok") == "ok"


def test_device_policy_picks_the_gpu_with_most_free_memory() -> None:
    policy = DevicePolicy("auto", wait_s=0, probe=lambda: [1000, 9000, 5000])
    assert policy.choose(4000) == torch.device("cuda", 1)
    with pytest.raises(InferenceError, match="no GPU with 10000 MiB free"):
        policy.choose(10000)


def test_device_policy_waits_for_memory() -> None:
    readings = iter([[100], [200], [8000]])
    sleeps: list[float] = []
    policy = DevicePolicy(
        "auto", wait_s=60, poll_s=1, probe=lambda: next(readings), sleep=sleeps.append
    )
    assert policy.choose(4000) == torch.device("cuda", 0)
    assert sleeps == [1, 1]
    waiting = DevicePolicy("auto", wait_s=60, probe=lambda: [10], sleep=lambda s: None)
    with pytest.raises(JobCancelled):
        waiting.choose(4000, should_stop=lambda: True)


def test_cpu_fallback_without_gpu() -> None:
    assert DevicePolicy("auto", probe=list).choose(4000) == torch.device("cpu")
    assert DevicePolicy("cpu", probe=lambda: [99999]).choose(1) == torch.device("cpu")
    with pytest.raises(InferenceError, match="no CUDA device"):
        DevicePolicy("cuda", probe=list).choose(1)
    # On this machine (no CUDA) the real probe falls back too.
    if not torch.cuda.is_available():
        assert DevicePolicy("auto").choose(4000) == torch.device("cpu")
        assert DevicePolicy("auto").status()["gpu_available"] is False
