"""A low-frequency NVML sampler: GPU utilisation, memory, power and temperature, and the run's energy.

It runs on a daemon thread so the training loop never waits on NVML; the trainer's log rows pick up the
latest reading. Without NVML (CPU machines) it is inert: no thread, no metrics, no error.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

# metric -> how to read it from NVML; NVML reports power in milliwatts and memory in bytes
READERS = {
    "util_pct": lambda nvml, h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
    "mem_used_mb": lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20,
    "power_w": lambda nvml, h: nvml.nvmlDeviceGetPowerUsage(h) / 1000,
    "temp_c": lambda nvml, h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
}
# What a run on a MIG slice gets, and from which handle: NVML counts the slice's own memory; it has no utilisation
# per slice, and the power and energy are the whole board's, spent by the other slices too, so they are left out.
MIG_READERS = {"mem_used_mb": "slice", "temp_c": "board"}


class GpuMonitor:
    """Samples the GPUs a run trains on: `devices` are their CUDA indices as torch numbers them (None: every
    visible GPU), mapped to NVML handles by `visible_handles`."""

    def __init__(self, interval_s: float = 10.0, devices: list[int] | None = None):
        self.interval_s = interval_s
        self._latest: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_start: list[float | None] = []
        self._energy_j: list[float] = []  # integrated from power where the energy counter is missing
        self._last_sample: float | None = None
        self._nvml, self._handles, self._reads = None, [], []
        if devices == []:  # a run on the CPU: no GPU of its to read, so NVML is not loaded (at every run's start)
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            # a caller that names its devices trains on them: CUDA is initialised anyway, so ask it
            visible = visible_handles(pynvml, ask_cuda=bool(devices))
            self._handles = visible if devices is None else [visible[i] for i in devices if i < len(visible)]
            self._reads = [metric_handles(pynvml, handle) for handle in self._handles]
        except Exception:  # no library, no driver, no GPU: nothing to monitor
            self._nvml, self._handles, self._reads = None, [], []  # (as far as it got)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> GpuMonitor:
        if not self.active:
            return self
        # the energy counter of a GPU whose power is read: not a MIG slice's, which is the whole board's
        self._energy_start = [
            self._energy_mj(h) if "power_w" in r else None for h, r in zip(self._handles, self._reads)
        ]
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
        for i, reads in enumerate(self._reads):
            prefix = f"gpu/{i}/" if len(self._handles) > 1 else "gpu/"
            for key, target in reads.items():
                try:
                    reading[prefix + key] = float(READERS[key](nvml, target))
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


@contextlib.contextmanager
def nvml_session():
    """pynvml, initialised for the block and shut down after it. Raises ImportError without nvidia-ml-py and
    NVMLError without the NVML library or a driver (the GpuMonitor keeps its session for the whole run)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        yield pynvml
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def nvidia_driver_loaded() -> bool:
    """Whether NVML answers, that is, an NVIDIA driver is loaded (CUDA needs one): milliseconds, where asking
    torch means importing it (seconds)."""
    try:
        with nvml_session():
            return True
    except Exception:  # no library, no driver
        return False


def visible_device_entries() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as its entries (indices, GPU-<uuid>, ...), or None when it is not set (all GPUs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if visible is None else [entry.strip() for entry in visible.split(",")]


def unpinned_device_names() -> list[str] | None:
    """With CUDA_VISIBLE_DEVICES not set, how it would name each GPU this process may use: its index, or for a
    MIG slice its MIG-<uuid> (an index names the whole board); None without NVML."""
    try:
        with nvml_session() as nvml:
            names = []
            for index in range(nvml.nvmlDeviceGetCount()):
                slices = mig_slices(nvml, nvml.nvmlDeviceGetHandleByIndex(index))
                names += [str(index)] if slices is None else [nvml_text(nvml.nvmlDeviceGetUUID(h)) for h in slices]
            return names
    except Exception:  # no library, no driver, or an NVMLError while asking: the caller names them by index
        return None


def nvml_text(value) -> str:
    """A string from NVML: older bindings return bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_handles(nvml, ask_cuda: bool = False) -> list:
    """NVML handles of the GPUs this process may use, in CUDA's numbering.

    NVML numbers GPUs in PCI bus order, CUDA by default fastest first (CUDA_DEVICE_ORDER=FASTEST_FIRST), and
    CUDA_VISIBLE_DEVICES' indices are CUDA's: on a machine of mixed GPUs NVML's GPU i need not be CUDA's. So each
    CUDA device is matched by its UUID where torch can say it (`cuda_uuids`), else by `handles_by_entries`."""
    uuids = cuda_uuids(ask_cuda)
    if uuids:
        # what CUDA numbers: a whole GPU, or where MIG is on, its slices (never the board itself)
        by_uuid = {bare_uuid(uuid): handle for uuid, handle in nvml_uuids(nvml, mig_boards=False).items()}
        handles = [by_uuid.get(uuid) for uuid in uuids]
        if None not in handles:
            return handles
        # a device NVML lists under no such UUID (a driver writing a MIG slice's UUID otherwise): by the entries
    return handles_by_entries(nvml)


def cuda_uuids(ask_cuda: bool) -> list[str] | None:
    """Each CUDA device's UUID, in CUDA's numbering, as torch writes it (8-4-4-4-12 hex, NVML's without its GPU- or
    MIG- prefix); None where torch has not initialised CUDA, unless `ask_cuda` (then it does, where CUDA is there).

    Asking initialises CUDA: seconds, and a process that has initialised it cannot use CUDA in a forked child. So
    only a process that uses CUDA anyway asks (`ask_cuda`); one that only looks (a study recording its machine) does
    not, and one that never imported torch (the sweep controller on a CPU machine) is not made to."""
    torch = sys.modules.get("torch")  # not imported: CUDA is not initialised either
    if torch is None:
        return None
    try:
        if not (torch.cuda.is_initialized() or (ask_cuda and torch.cuda.is_available())):
            return None
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    except Exception:  # a CUDA error while asking: number by the entries instead
        return None


def bare_uuid(nvml_uuid: str) -> str:
    """NVML's GPU-<uuid> or MIG-<uuid> without its prefix, as CUDA (and torch) write a device's UUID."""
    return nvml_uuid.removeprefix("GPU-").removeprefix("MIG-")


def nvml_uuids(nvml, mig_boards: bool) -> dict:
    """Every GPU's and MIG slice's handle by its NVML UUID (GPU-…, MIG-…, in NVML's order); a board with MIG on
    only with `mig_boards` (CUDA numbers its slices, not the board; CUDA_VISIBLE_DEVICES may still name it)."""
    handles = {}
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            board = nvml.nvmlDeviceGetHandleByIndex(index)
            slices = mig_slices(nvml, board) or []
            for handle in [board, *slices] if mig_boards or not slices else slices:
                handles[nvml_text(nvml.nvmlDeviceGetUUID(handle))] = handle
        except Exception:  # NVMLError: a GPU this process may not use (no permission); CUDA does not see it either
            continue
    return handles


def handles_by_entries(nvml) -> list:
    """`visible_handles` without CUDA's own UUIDs: NVML ignores CUDA_VISIBLE_DEVICES, so apply it here (indices,
    GPU-<uuid> or MIG-<uuid>, whole or, as CUDA takes them, the start of one; like CUDA, stop at the first entry
    that names no GPU or several). Not set, every GPU, or where MIG is on, its slices (`gpu_or_slices`).

    An index is taken as NVML's, which is CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID; CUDA's default, FASTEST_FIRST,
    puts the fastest GPU first and leaves the others' order unspecified, so on a machine of mixed GPUs it may not
    be."""
    count = nvml.nvmlDeviceGetCount()
    entries = visible_device_entries()
    if entries is None:
        return [h for i in range(count) for h in gpu_or_slices(nvml, nvml.nvmlDeviceGetHandleByIndex(i))]
    handles, by_uuid = [], None
    for entry in entries:
        if entry.isdigit() and int(entry) < count:
            try:
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
            except Exception:  # NVMLError: no such GPU
                break
        elif entry.startswith(("GPU-", "MIG-")):  # MIG-<uuid> since driver R470; the older MIG-GPU-… is not
            by_uuid = nvml_uuids(nvml, mig_boards=True) if by_uuid is None else by_uuid
            named = [handle for uuid, handle in by_uuid.items() if uuid.startswith(entry)]
            if len(named) != 1:
                break
            handles.append(named[0])
        else:
            break
    return handles


def gpu_or_slices(nvml, handle) -> list:
    """A GPU's handle, or where MIG is on, its slices' handles (`mig_slices`)."""
    slices = mig_slices(nvml, handle)
    return [handle] if slices is None else slices


def mig_slices(nvml, handle) -> list | None:
    """Where MIG is on, the GPU's slices' handles in NVML's order (`nvidia-smi -L`'s), taken for CUDA's; a
    container given one slice sees that one alone. None where MIG is off."""
    try:
        if nvml.nvmlDeviceGetMigMode(handle)[0] != nvml.NVML_DEVICE_MIG_ENABLE:
            return None
        slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    except Exception:  # NVMLError: a GPU without MIG, or a driver without the call
        return None
    slices = []
    for slot in range(slots):
        try:
            slices.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
        except Exception:  # NVMLError: no slice in this slot, or not one this process may see
            continue
    return slices


def metric_handles(nvml, handle) -> dict:
    """The handle each metric of one GPU is read from: for a whole GPU its own, for every metric; for a MIG slice
    those of MIG_READERS, each from the slice or its board."""
    board = mig_board(nvml, handle)
    if board is None:
        return {key: handle for key in READERS}
    return {key: handle if source == "slice" else board for key, source in MIG_READERS.items()}


def mig_board(nvml, handle):
    """The whole GPU a MIG slice's handle belongs to (the slice's own handle where NVML does not say); None for a
    whole GPU's handle."""
    try:
        if not nvml.nvmlDeviceIsMigDeviceHandle(handle):
            return None
    except Exception:  # NVMLError: a driver or GPU without MIG
        return None
    try:
        return nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    except Exception:
        return handle
