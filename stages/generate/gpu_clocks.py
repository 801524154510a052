"""What the GPUs' clocks did while a run was timed: NVML samples taken from a thread beside the timed
runs. A card whose SM or memory clock drops (a power cap, heat, a hardware slowdown signal) decodes
slower with the very same kernels; one-GPU jobs of one 4 × H200 host decoded at 186–191 or 209–214
tok/s and nothing between (BENCHMARKS.md). The run's tag says what the clocks were, and the generate
stage calls the run noisy when a slowdown reason was on, so a slow card is not read as a slow engine.
"""

from __future__ import annotations

import statistics
import threading
from typing import Any

# NVML's clock-event ("throttle") reasons that slow a busy GPU, by bit. Left out on purpose: idle (the
# gaps between runs), the applications-clocks setting, sync boost and the display clock: not slowdowns.
SLOWDOWNS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal",
             0x80: "hw_power_brake"}
PERIOD_S = 0.05  # NVML itself averages over 1/6 s to 1 s, so faster sampling adds nothing


def nvml() -> Any:
    """The pynvml module (nvidia-ml-py), initialized; raises when there is no NVIDIA driver."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


class ClockWatch:
    """Context manager: samples each CUDA device in ``devices`` (ordinals of this process) while open."""

    def __init__(self, devices: list[int], period_s: float = PERIOD_S) -> None:
        self.devices, self.period_s = devices, period_s
        self.samples: dict[int, list[tuple[int, int, int]]] = {d: [] for d in devices}  # (SM MHz, memory MHz, reasons)
        self.max_sm: dict[int, int] = {}
        self.why_not = "" if devices else "no CUDA device"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ClockWatch":
        if not self.devices:
            return self
        try:
            lib = nvml()
            handles = {d: handle(lib, d) for d in self.devices}
            self.max_sm = {d: lib.nvmlDeviceGetMaxClockInfo(h, lib.NVML_CLOCK_SM) for d, h in handles.items()}
        except Exception as e:  # no driver, no library, an old one: the run goes on without clocks
            self.why_not = f"NVML: {type(e).__name__}: {e}"[:200]
            return self
        # NVML 12.5 renamed its "throttle reasons" to "clocks event reasons"; older bindings have the first
        reasons = getattr(lib, "nvmlDeviceGetCurrentClocksEventReasons", None) or lib.nvmlDeviceGetCurrentClocksThrottleReasons
        self._thread = threading.Thread(target=self._sample, args=(lib, handles, reasons), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self, lib: Any, handles: dict[int, Any], reasons: Any) -> None:
        while True:
            for d, h in handles.items():
                try:
                    self.samples[d].append((lib.nvmlDeviceGetClockInfo(h, lib.NVML_CLOCK_SM),
                                            lib.nvmlDeviceGetClockInfo(h, lib.NVML_CLOCK_MEM),
                                            reasons(h)))
                except Exception as e:  # a reading that fails once fails again: say so and stop
                    self.why_not = f"NVML: {type(e).__name__}: {e}"[:200]
                    return
            if self._stop.wait(self.period_s):
                return

    def metrics(self) -> dict[str, float]:
        """Median and lowest SM and memory clocks over every device's samples (MHz), and the share of
        samples in which a slowdown reason was on."""
        every = [s for d in self.devices for s in self.samples[d]]
        if not every:
            return {}
        sm, mem = [s[0] for s in every], [s[1] for s in every]
        slowed = sum(bool(s[2] & sum(SLOWDOWNS)) for s in every)
        return {"gpu_sm_clock_mhz_p50": float(statistics.median(sm)), "gpu_sm_clock_mhz_min": float(min(sm)),
                "gpu_mem_clock_mhz_p50": float(statistics.median(mem)), "gpu_mem_clock_mhz_min": float(min(mem)),
                "gpu_slowdown_share": slowed / len(every)}

    def slowdowns(self) -> list[str]:
        """The slowdown reasons seen on any device, by name."""
        seen = 0
        for d in self.devices:
            for s in self.samples[d]:
                seen |= s[2]
        return [name for bit, name in SLOWDOWNS.items() if seen & bit]

    def describe(self) -> str:
        """One line for the run's tags."""
        m = self.metrics()
        if not m:
            return f"not read ({self.why_not or 'no sample'})"
        top = max(self.max_sm.values(), default=0)
        reasons = self.slowdowns()
        return (f"SM {m['gpu_sm_clock_mhz_p50']:.0f} MHz median, {m['gpu_sm_clock_mhz_min']:.0f} lowest"
                + (f" (max {top})" if top else "") + f"; memory {m['gpu_mem_clock_mhz_p50']:.0f} MHz; "
                + (f"SLOWED: {', '.join(reasons)} in {m['gpu_slowdown_share']:.0%} of samples" if reasons
                   else "no slowdown reason"))


def handle(lib: Any, device: int) -> Any:
    """NVML's handle of this process's CUDA device ``device``, found by UUID (CUDA_VISIBLE_DEVICES
    renumbers the CUDA ordinals, not NVML's indices)."""
    import torch

    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return lib.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
