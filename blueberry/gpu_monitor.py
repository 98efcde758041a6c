"""A low-frequency NVML sampler: GPU utilisation, memory, power and temperature, and the run's energy.

It runs on a daemon thread so the training loop never waits on NVML; the trainer's log rows pick up the
latest reading. Without NVML (CPU machines) it is inert: no thread, no metrics, no error.
"""

from __future__ import annotations

import os
import threading
import time

# metric -> how to read it from NVML; NVML reports power in milliwatts and memory in bytes
READERS = {
    "util_pct": lambda nvml, h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
    "mem_used_mb": lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20,
    "power_w": lambda nvml, h: nvml.nvmlDeviceGetPowerUsage(h) / 1000,
    "temp_c": lambda nvml, h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
}


class GpuMonitor:
    """Samples the GPUs a run trains on: `devices` are their CUDA indices as torch numbers them (None: every
    visible GPU), mapped to NVML through CUDA_VISIBLE_DEVICES."""

    def __init__(self, interval_s: float = 10.0, devices: list[int] | None = None):
        self.interval_s = interval_s
        self._latest: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_start: list[float | None] = []
        self._energy_j: list[float] = []  # integrated from power where the energy counter is missing
        self._last_sample: float | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            visible = visible_handles(pynvml)
            self._handles = visible if devices is None else [visible[i] for i in devices if i < len(visible)]
        except Exception:  # no library, no driver, no GPU: nothing to monitor
            self._nvml, self._handles = None, []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> GpuMonitor:
        if not self.active:
            return self
        self._energy_start = [self._energy_mj(h) for h in self._handles]
        self._energy_j = [0.0] * len(self._handles)
        self.sample()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def _energy_mj(self, handle) -> float | None:
        try:  # Volta and newer keep a millijoule counter since the driver loaded
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception:
            return None

    def sample(self) -> dict[str, float]:
        """Read every GPU once; a metric NVML cannot read on this GPU is left out."""
        nvml, now = self._nvml, time.monotonic()
        reading: dict[str, float] = {}
        for i, handle in enumerate(self._handles):
            prefix = f"gpu/{i}/" if len(self._handles) > 1 else "gpu/"
            for key, read in READERS.items():
                try:
                    reading[prefix + key] = float(read(nvml, handle))
                except Exception:
                    pass
            if prefix + "power_w" in reading and self._last_sample is not None:
                self._energy_j[i] += reading[prefix + "power_w"] * (now - self._last_sample)
        self._last_sample = now
        with self._lock:
            self._latest = reading
        return reading

    def latest(self) -> dict[str, float]:
        with self._lock:
            return dict(self._latest)

    def energy_wh(self) -> float | None:
        """Energy since start over all monitored GPUs: the hardware counter, else integrated power."""
        if not self.active:
            return None
        total_j, known = 0.0, False
        for i, handle in enumerate(self._handles):
            start, now = self._energy_start[i], self._energy_mj(handle)
            if start is not None and now is not None:
                total_j, known = total_j + (now - start) / 1000, True
            elif self._energy_j[i]:
                total_j, known = total_j + self._energy_j[i], True
        return total_j / 3600 if known else None

    def stop(self) -> dict[str, float]:
        """Stop sampling; return the summary keys (energy where power is read)."""
        if not self.active:
            return {}
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1)
        self.sample()  # the closing reading also closes the power integral
        energy = self.energy_wh()
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass
        return {} if energy is None else {"gpu/energy_wh": energy}


def nvidia_driver_loaded() -> bool:
    """Whether NVML answers, that is, an NVIDIA driver is loaded (CUDA needs one): milliseconds, where asking
    torch means importing it (seconds)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVMLError: no library, no driver
        return False
    pynvml.nvmlShutdown()
    return True


def visible_device_entries() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as its entries (indices, GPU-<uuid>, ...), or None when it is not set (all GPUs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if visible is None else [entry.strip() for entry in visible.split(",")]


def visible_handles(nvml) -> list:
    """NVML handles of the GPUs this process may use, in CUDA's numbering: NVML ignores CUDA_VISIBLE_DEVICES, so
    apply it here (indices or GPU-<uuid>; like CUDA, stop at the first entry that names no GPU; MIG instances
    are not monitored)."""
    count = nvml.nvmlDeviceGetCount()
    entries = visible_device_entries()
    if entries is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    handles = []
    for entry in entries:
        try:
            if entry.isdigit() and int(entry) < count:
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
            elif entry.startswith("GPU-"):
                handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
            else:
                break
        except Exception:  # NVMLError: no such GPU
            break
    return handles
