"""The GPUs' clocks while a run is timed (stages/generate/gpu_clocks.py), read from a stand-in for NVML: this
machine has no NVIDIA driver."""

from __future__ import annotations

import time
import types

import pytest

from stages.generate import gpu_clocks
from stages.generate.gpu_clocks import ClockWatch
from stages.generate.clock import noise


def fake_nvml(readings: list[tuple[int, int, int]], renamed: bool = True, fail_after: int | None = None):
    """An NVML whose one device gives ``readings`` in turn (the last one repeats)."""
    calls = {"n": 0}

    def reading():
        i = calls["n"] // 3
        calls["n"] += 1
        if fail_after is not None and i >= fail_after:
            raise RuntimeError("GPU is lost")
        return readings[min(i, len(readings) - 1)]

    lib = types.SimpleNamespace(NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
                                nvmlDeviceGetMaxClockInfo=lambda h, kind: 1980,
                                nvmlDeviceGetClockInfo=lambda h, kind: reading()[kind - 1])
    reasons = lambda h: reading()[2]  # noqa: E731
    if renamed:
        lib.nvmlDeviceGetCurrentClocksEventReasons = reasons
    else:  # bindings before NVML 12.5
        lib.nvmlDeviceGetCurrentClocksThrottleReasons = reasons
    return lib


def watch(monkeypatch, lib, samples: int = 6) -> ClockWatch:
    """Open a watch until it has ``samples`` samples or its thread has stopped (a busy machine starts
    threads late: no fixed sleep)."""
    monkeypatch.setattr(gpu_clocks, "nvml", lambda: lib)
    monkeypatch.setattr(gpu_clocks, "handle", lambda lib, device: f"handle {device}")
    with ClockWatch([0], period_s=0.001) as clocks:
        deadline = time.monotonic() + 30
        while len(clocks.samples[0]) < samples and clocks._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)
    return clocks


@pytest.mark.parametrize("renamed", [True, False])
def test_a_power_capped_card_is_named_and_makes_the_run_noisy(monkeypatch, renamed):
    steady, capped = (1980, 3201, 0x0), (1410, 3201, 0x4)  # 0x4: the software power cap
    clocks = watch(monkeypatch, fake_nvml([steady, steady, capped], renamed))
    m = clocks.metrics()
    assert m["gpu_sm_clock_mhz_min"] == 1410 and m["gpu_mem_clock_mhz_p50"] == 3201
    assert 0 < m["gpu_slowdown_share"] < 1 and clocks.slowdowns() == ["sw_power_cap"]
    assert clocks.describe().startswith("SM 1410 MHz median, 1410 lowest (max 1980); memory 3201 MHz; SLOWED: sw_power_cap in ")
    assert "GPU clocks slowed" in noise({**m, "decode_tokens_per_s_spread_pct": 1.0}, cuda=True)


def test_a_steady_card_is_not_noise_and_idle_is_no_slowdown(monkeypatch):
    clocks = watch(monkeypatch, fake_nvml([(1980, 3201, 0x1)]))  # 0x1: idle between runs
    assert clocks.describe() == "SM 1980 MHz median, 1980 lowest (max 1980); memory 3201 MHz; no slowdown reason"
    assert noise({**clocks.metrics(), "decode_tokens_per_s_spread_pct": 1.0}, cuda=True) == ""


def test_no_driver_or_a_lost_reading_leaves_the_run_running_and_says_so(monkeypatch):
    def no_driver():
        raise OSError("NVML Shared Library Not Found")

    monkeypatch.setattr(gpu_clocks, "nvml", no_driver)
    with ClockWatch([0]) as clocks:
        pass
    assert clocks.metrics() == {} and clocks.describe() == "not read (NVML: OSError: NVML Shared Library Not Found)"
    lost = watch(monkeypatch, fake_nvml([(1980, 3201, 0)], fail_after=2))
    assert len(lost.samples[0]) == 2 and lost.why_not == "NVML: RuntimeError: GPU is lost"
    assert lost.metrics()["gpu_sm_clock_mhz_p50"] == 1980  # the samples before it still count
    assert ClockWatch([]).describe() == "not read (no CUDA device)"
