"""Hardware detection and choices, with NVML faked: no GPU here, so every GPU path runs against a fake pynvml."""

import contextlib
import json
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from blueberry import hardware
from blueberry.cli import main
from blueberry.gpu_monitor import GpuMonitor, unpinned_device_names
from blueberry.models import build_model
from blueberry.overrides import load_spec
from blueberry.plan import plan_run
from blueberry.spec import TrainSpec

GPUS = {
    "Tesla T4": ((7, 5), 15360),
    "NVIDIA GeForce RTX 4090": ((8, 9), 24564),
    "NVIDIA A100-SXM4-80GB": ((8, 0), 81920),
    "NVIDIA H100 80GB HBM3": ((9, 0), 81559),
}


def fake_pynvml(names, energy_mj=None, fail_init=False, mig_slices=None):
    """A module with the NVML calls blueberry uses; handles are indices into `names`. `mig_slices` {GPU index:
    slices} turns MIG on there: a slice's handle is (GPU, slot), its UUID MIG-<GPU>-<slot>, and NVML reads only
    its memory (512 MiB used)."""
    nvml = types.ModuleType("pynvml")
    mig_slices = mig_slices or {}

    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")
        nvml.sessions += 1

    def shutdown():
        nvml.sessions -= 1

    def energy(handle):
        if energy_mj is None:
            raise NVMLError("Not Supported")
        energy_mj[handle] += 3.6e6  # one watt-hour per read
        return energy_mj[handle]

    nvml.NVMLError = NVMLError
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.nvmlInit = init
    nvml.nvmlShutdown = shutdown
    nvml.sessions = 0  # NVML initialisations not shut down yet
    nvml.nvmlSystemGetDriverVersion = lambda: "550.54"
    nvml.nvmlDeviceGetCount = lambda: len(names)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: [f"GPU-{i}" for i in range(len(names))].index(uuid)
    nvml.nvmlDeviceGetName = lambda h: names[h].encode()  # old bindings return bytes
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=GPUS[names[h]][1] * 2**20, used=2**30)
    nvml.nvmlDeviceGetCudaComputeCapability = lambda h: GPUS[names[h]][0]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87, memory=40)
    nvml.nvmlDeviceGetPowerUsage = lambda h: 250_000  # milliwatts
    nvml.nvmlDeviceGetTemperature = lambda h, sensor: 66
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy

    def whole_gpu_only(read):  # NVML answers Not Supported for a slice's handle
        def call(h, *args):
            if isinstance(h, tuple):
                raise NVMLError("Not Supported")
            return read(h, *args)

        return call

    for name in ("UtilizationRates", "PowerUsage", "Temperature", "TotalEnergyConsumption", "CudaComputeCapability"):
        setattr(nvml, f"nvmlDeviceGet{name}", whole_gpu_only(getattr(nvml, f"nvmlDeviceGet{name}")))
    memory, name = nvml.nvmlDeviceGetMemoryInfo, nvml.nvmlDeviceGetName
    slice_memory = types.SimpleNamespace(total=10240 * 2**20, used=2**29)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: slice_memory if isinstance(h, tuple) else memory(h)
    nvml.nvmlDeviceGetName = lambda h: b"MIG 1g.10gb" if isinstance(h, tuple) else name(h)
    by_uuid = nvml.nvmlDeviceGetHandleByUUID

    def handle_by_uuid(uuid):
        if uuid.startswith("MIG-"):
            gpu, slot = map(int, uuid.removeprefix("MIG-").split("-"))
            if slot >= mig_slices.get(gpu, 0):
                raise NVMLError("Not Found")
            return gpu, slot
        return by_uuid(uuid)

    def slice_by_index(h, slot):
        if slot >= mig_slices.get(h, 0):
            raise NVMLError("Not Found")
        return h, slot

    nvml.NVML_DEVICE_MIG_ENABLE = 1
    nvml.nvmlDeviceGetHandleByUUID = handle_by_uuid
    nvml.nvmlDeviceGetMigMode = lambda h: [int(h in mig_slices)] * 2
    nvml.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = slice_by_index
    nvml.nvmlDeviceIsMigDeviceHandle = lambda h: isinstance(h, tuple)
    nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = lambda h: h[0]
    nvml.nvmlDeviceGetUUID = lambda h: (f"MIG-{h[0]}-{h[1]}" if isinstance(h, tuple) else f"GPU-{h}").encode()
    return nvml


@pytest.mark.parametrize(
    "name, preset, precision",
    [
        ("Tesla T4", "T4", "fp16"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", "bf16"),
        ("NVIDIA A100-SXM4-80GB", "A100", "bf16"),
        ("NVIDIA H100 80GB HBM3", "H100", "bf16"),
    ],
)
def test_gpu_detection_picks_preset_and_precision(monkeypatch, name, preset, precision):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([name]))
    info = hardware.detect()
    assert info.nvml == "ok" and len(info.gpus) == 1
    gpu = info.gpus[0]
    assert gpu.name == name and gpu.compute_capability == GPUS[name][0] and gpu.driver == "550.54"
    assert info.preset.name == preset
    assert hardware.precision_for(gpu.compute_capability, cpu_bf16=False) == precision
    assert info.preset.precision == precision and info.preset.peak_tflops[precision] > 10


def test_no_nvml_means_cpu_path_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], fail_init=True))
    info = hardware.detect()
    assert info.gpus == [] and "NVML unavailable" in info.nvml and info.preset.name == "CPU"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed at all
    assert hardware.detect_gpus() == ([], "nvidia-ml-py not installed")
    assert not GpuMonitor().start().active and GpuMonitor().stop() == {}


def test_every_one_off_nvml_query_shuts_nvml_down_also_when_a_query_fails(monkeypatch):
    from blueberry.gpu_monitor import nvidia_driver_loaded, unpinned_device_names

    nvml = fake_pynvml(["Tesla T4", "NVIDIA A100-SXM4-80GB"], mig_slices={1: 2})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert nvidia_driver_loaded() and nvml.sessions == 0
    assert unpinned_device_names() == ["0", "MIG-1-0", "MIG-1-1"] and nvml.sessions == 0
    assert hardware.detect_gpus()[1] == "ok" and nvml.sessions == 0

    def broken(*args):
        raise nvml.NVMLError("Unknown Error")

    monkeypatch.setattr(nvml, "nvmlDeviceGetCount", broken)
    monkeypatch.setattr(nvml, "nvmlSystemGetDriverVersion", broken)
    assert unpinned_device_names() is None and nvml.sessions == 0
    assert hardware.detect_gpus() == ([], "NVML query failed: Unknown Error") and nvml.sessions == 0


def test_a_sweep_counts_gpus_with_torch_only_where_nvml_finds_a_driver(monkeypatch):
    """On a CPU machine the sweep controller never imports torch (seconds) to learn it has no GPU."""
    from blueberry.sweep.controller import _gpu_count

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], fail_init=True))
    assert _gpu_count() == 0  # no driver: torch not asked
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(["Tesla T4"] * 3))
    assert _gpu_count() == 3  # a driver: CUDA's own count


def test_precision_rules():
    assert hardware.precision_for((7, 0), False) == "fp16"  # V100
    assert hardware.precision_for((6, 1), False) == "fp32"  # Pascal
    assert hardware.precision_for(None, cpu_bf16=True) == "bf16"
    assert hardware.precision_for(None, cpu_bf16=False) == "fp32"
    assert hardware.preset_for("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert hardware.preset_for("NVIDIA H100 NVL").peak("bf16") == 835.5  # not the SXM board's 989.4
    assert hardware.preset_for("NVIDIA H100 80GB HBM3").peak("bf16") == 989.4
    assert hardware.preset_for("Some Future GPU").precision == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        hardware.resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize(
    "name",
    # the words NVIDIA's laptop parts have been named with ("… Laptop GPU", "… with Max-Q Design", "… Mobile")
    ["NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA GeForce RTX 4090 with Max-Q Design", "NVIDIA RTX 4090 Mobile"],
)
def test_a_laptop_gpu_gets_no_desktop_boards_peak_or_price(name, monkeypatch):
    for variable in ("BLUEBERRY_PRICE_PER_HOUR", "BLUEBERRY_GPU_PRICES"):
        monkeypatch.delenv(variable, raising=False)
    preset = hardware.preset_for(name)
    assert (preset.name, preset.peak_tflops, preset.usd_per_hour) == (name, {}, None)  # as an unknown GPU
    assert hardware.price_per_hour(None, preset)[0] is None


def test_gpu_monitor_samples_and_reads_energy(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(["Tesla T4"], energy_mj=[0.0]))
    monitor = GpuMonitor(interval_s=3600).start()
    assert monitor.latest() == {"gpu/util_pct": 87, "gpu/mem_used_mb": 1024, "gpu/power_w": 250, "gpu/temp_c": 66}
    assert monitor.stop() == {"gpu/energy_wh": pytest.approx(1.0)}  # counter read at start and at stop


def test_gpu_monitor_integrates_power_without_energy_counter(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(["Tesla T4", "Tesla T4"]))
    monitor = GpuMonitor(interval_s=3600).start()
    monitor._last_sample -= 36.0  # pretend the last reading was 36 s ago: 250 W × 36 s = 2.5 Wh per GPU
    assert "gpu/1/power_w" in monitor.latest()
    assert monitor.stop()["gpu/energy_wh"] == pytest.approx(5.0, rel=1e-3)


def test_gpu_monitor_reads_only_the_gpus_the_run_trains_on(monkeypatch):
    """A run on one GPU of a 4-GPU machine: its energy, not the machine's; CUDA_VISIBLE_DEVICES maps the numbers."""
    energy = [0.0] * 4
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(["Tesla T4"] * 4, energy_mj=energy))
    for visible, devices, read in [(None, [2], 2), ("3,1", [1], 1), ("GPU-3, GPU-0", [0], 3), ("2,x,1", [1], None)]:
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        energy[:] = [0.0] * 4
        monitor = GpuMonitor(interval_s=3600, devices=devices).start()
        assert monitor.active == (read is not None)  # "2,x,1": CUDA stops at "x", so it sees one GPU only
        if read is not None:
            assert "gpu/util_pct" in monitor.latest() and monitor.stop() == {"gpu/energy_wh": pytest.approx(1.0)}
            assert [e > 0 for e in energy] == [i == read for i in range(4)], (visible, energy)


def test_gpu_monitor_on_a_mig_slice_reads_its_memory_and_the_boards_temperature_but_no_power(monkeypatch):
    """A slice named in CUDA_VISIBLE_DEVICES, or the one a container sees with the variable unset: NVML has no
    utilisation per slice, and the board's power and energy are spent by the other slices too."""
    energy = [0.0, 0.0]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(["Tesla T4"] * 2, energy, mig_slices={1: 3}))
    for visible, devices in [("MIG-1-2", [0]), (None, [1])]:  # unset: GPU 0 whole, then GPU 1's three slices
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        monitor = GpuMonitor(interval_s=3600, devices=devices).start()
        assert monitor.latest() == {"gpu/mem_used_mb": 512, "gpu/temp_c": 66}
        assert monitor.stop() == {} and energy == [0.0, 0.0]  # no energy: not the board's counter
    assert len(GpuMonitor(interval_s=3600).start()._handles) == 4  # GPU 0 and GPU 1's three slices
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1-5,0")  # no such slice: CUDA stops there, so do we
    assert not GpuMonitor(interval_s=3600).active


def test_doctor_lists_the_gpus_this_process_may_use_as_cuda_numbers_and_names_them(monkeypatch):
    a100 = "NVIDIA A100-SXM4-80GB"
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([a100, a100, a100], mig_slices={1: 2}))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus, _ = hardware.detect_gpus()  # GPU 0 whole, GPU 1's two slices, GPU 2 whole
    assert [(g.index, g.name, g.memory_mb) for g in gpus] == [
        (0, a100, 81920), (1, f"{a100} MIG 1g.10gb", 10240), (2, f"{a100} MIG 1g.10gb", 10240), (3, a100, 81920)
    ]  # fmt: skip
    assert gpus[1].compute_capability == (8, 0)  # the board's: NVML has none for a slice
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,MIG-1-1")
    info = hardware.detect()
    assert [(g.index, g.name) for g in info.gpus] == [(0, a100), (1, f"{a100} MIG 1g.10gb")]
    assert hardware.preset_for(info.gpus[1].name).name == "A100 MIG 1g.10gb"


def cuda_numbering(monkeypatch, uuids, initialised=True):
    """torch's CUDA, initialised (or only available), numbering its devices with these UUIDs (torch writes them
    without NVML's GPU-/MIG- prefix; the fake NVML's are GPU-<index> and MIG-<GPU>-<slot>)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=uuids[i]))


def test_gpus_are_matched_to_cuda_devices_by_uuid_where_cuda_numbers_them_otherwise_than_nvml(monkeypatch):
    """NVML lists a T4 then an A100 (PCI bus order); CUDA, fastest first, numbers the A100 0: the doctor's GPU 0 and
    the monitor's readings are the A100's, and CUDA_VISIBLE_DEVICES=0, an index of CUDA's, is the A100 too."""
    t4, a100 = "Tesla T4", "NVIDIA A100-SXM4-80GB"
    energy = [0.0, 0.0]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([t4, a100], energy_mj=energy))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cuda_numbering(monkeypatch, ["1", "0"])
    assert [(g.index, g.name, g.compute_capability) for g in hardware.detect().gpus] == [
        (0, a100, (8, 0)), (1, t4, (7, 5))
    ]  # fmt: skip
    GpuMonitor(interval_s=3600, devices=[0]).start().stop()
    assert energy[0] == 0 and energy[1] > 0  # the A100's counter, not the T4's
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cuda_numbering(monkeypatch, ["1"])
    assert [g.name for g in hardware.detect().gpus] == [a100]


def test_gpus_are_numbered_without_initialising_cuda_unless_the_caller_uses_it(monkeypatch):
    """Asking torch for the UUIDs initialises CUDA: only where it is already, or the caller asks (it uses CUDA)."""
    t4, a100 = "Tesla T4", "NVIDIA A100-SXM4-80GB"
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([t4, a100]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cuda_numbering(monkeypatch, ["1", "0"], initialised=False)
    asked = []
    properties = torch.cuda.get_device_properties
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: asked.append(i) or properties(i))
    assert [g.name for g in hardware.detect_gpus()[0]] == [t4, a100] and asked == []  # NVML's order stands in
    assert not GpuMonitor(interval_s=3600, devices=[]).active and asked == []  # a CPU run on a GPU machine
    assert [g.name for g in hardware.detect_gpus(ask_cuda=True)[0]] == [a100, t4] and asked == [0, 1]


def test_a_mig_slice_is_matched_by_its_uuid_and_otherwise_found_as_before(monkeypatch):
    """CUDA numbers a MIG slice under its MIG UUID; where NVML lists no such UUID (a driver writing it otherwise,
    or CUDA giving the board's, which CUDA never numbers with MIG on), CUDA_VISIBLE_DEVICES decides, as before."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(["Tesla T4"] * 2, mig_slices={1: 3}))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cuda_numbering(monkeypatch, ["1-2", "0"])
    assert [g.memory_mb for g in hardware.detect().gpus] == [10240, 15360]  # the slice, then the whole T4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1-1")
    for unknown in ("1", "GPU-1/1/0"):
        cuda_numbering(monkeypatch, [unknown])
        assert [g.memory_mb for g in hardware.detect().gpus] == [10240], unknown


def test_cuda_visible_devices_may_name_a_gpu_by_the_start_of_its_uuid(monkeypatch):
    """As CUDA takes it: the one UUID an entry begins (NVML's own lookup wants it whole); ambiguous, CUDA stops."""
    from blueberry.gpu_monitor import visible_handles

    nvml = fake_pynvml(["Tesla T4"] * 3)
    uuids = [
        "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6",
        "GPU-1b6a30c1-7a4e-3b9e-8f0e-5d2c9b1a7e44",
        "GPU-89aa41d0-2c3b-6d7e-0f1a-2b3c4d5e6f70",
    ]
    monkeypatch.setattr(nvml, "nvmlDeviceGetUUID", lambda h: uuids[h].encode())
    for visible, handles in [
        ("GPU-8932f937", [0]),
        (f"GPU-1b6a,{uuids[0]}", [1, 0]),
        ("GPU-89,0", []),  # GPU 0's and GPU 2's UUIDs both begin GPU-89
        ("GPU-8932f937-ffff", []),
    ]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert visible_handles(nvml) == handles, visible


def test_without_cuda_visible_devices_a_mig_slice_is_named_by_its_uuid(monkeypatch):
    """What a sweep pins its trials to: CUDA_VISIBLE_DEVICES=1 would name GPU 1's whole board, not a slice."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(["Tesla T4"] * 2, mig_slices={1: 2}))
    assert unpinned_device_names() == ["0", "MIG-1-0", "MIG-1-1"]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], fail_init=True))
    assert unpinned_device_names() is None  # no driver


def test_a_mig_slice_gets_its_share_of_the_boards_peak_and_price(monkeypatch):
    a100 = hardware.preset_for("NVIDIA A100-SXM4-80GB")
    slice_ = hardware.preset_for("NVIDIA A100-SXM4-80GB MIG 3g.40gb")  # CUDA's name for the slice
    assert (slice_.name, slice_.board, slice_.precision) == ("A100 MIG 3g.40gb", "A100", "bf16")
    assert slice_.peak("bf16") == pytest.approx(312.0 * 3 / 7) and slice_.usd_per_hour == pytest.approx(1.5 * 3 / 7)
    assert "3/7" in slice_.source and a100.share == 1.0
    compute_instance = hardware.preset_for("NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb")  # 1 compute slice of a 3g
    assert compute_instance.peak("bf16") == pytest.approx(989.4 / 7)
    assert hardware.mig_slice("NVIDIA A30 MIG 2g.12gb") == ("2g.12gb", 2, 4)  # the A30 has 4 slices
    assert hardware.mig_slice("NVIDIA A100-SXM4-80GB") is None
    assert hardware.preset_for("Some GPU MIG 1g.5gb").peak_tflops == {}  # unknown: nothing to share
    monkeypatch.setenv("BLUEBERRY_GPU_PRICES", json.dumps({"A100": 2.1}))  # the board's price in the report's table
    price, source = hardware.price_per_hour(None, slice_)
    assert price == pytest.approx(0.9) and source.startswith("BLUEBERRY_GPU_PRICES (A100)")
    monkeypatch.setenv("BLUEBERRY_GPU_PRICES", json.dumps({"A100 MIG 3g.40gb": 0.5}))  # the slice's own
    assert hardware.price_per_hour(None, slice_) == (0.5, "BLUEBERRY_GPU_PRICES (A100 MIG 3g.40gb)")


def test_a_run_monitors_its_own_gpu_or_under_torchrun_its_machines_ranks(monkeypatch):
    from blueberry.distributed import World, node_devices

    assert node_devices(World(), torch.device("cpu")) == []
    assert node_devices(World(), torch.device("cuda", 3)) == [3]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4, on each machine
    assert node_devices(World(rank=0, size=8, local_rank=0), torch.device("cuda", 0)) == [0, 1, 2, 3]


def test_price_order_and_cost(monkeypatch, tmp_path):
    t4 = hardware.preset_for("Tesla T4")
    assert hardware.price_per_hour(None, t4) == (0.35, "table (T4)")
    assert hardware.price_per_hour(None, hardware.CPU_PRESET)[0] is None
    monkeypatch.setenv("BLUEBERRY_GPU_PRICES", json.dumps({"T4": 0.2}))
    assert hardware.price_per_hour(None, t4) == (0.2, "BLUEBERRY_GPU_PRICES (T4)")
    monkeypatch.setenv("BLUEBERRY_PRICE_PER_HOUR", "0.5")
    assert hardware.price_per_hour(None, hardware.CPU_PRESET) == (0.5, "BLUEBERRY_PRICE_PER_HOUR")
    assert hardware.price_per_hour(1.25, t4) == (1.25, "spec")
    cost = hardware.run_cost(2.0, wall_s=1800, devices=2)
    assert cost["cost/usd"] == pytest.approx(2.0) and cost["cost/device_hours"] == pytest.approx(1.0)
    assert hardware.run_cost(None, 1800, 1)["cost/usd"] is None


def test_batch_auto_keeps_effective_batch():
    # fits up to 12 windows: the largest divisor of 64 that fits is 8, so 8 × 8 accumulation
    choice = hardware.resolve_batch("auto", 1, 64, world=1, fits=lambda m: m <= 12, cap=256)
    assert (choice.micro_batch, choice.grad_accum, choice.effective_batch) == (8, 8, 64)
    choice = hardware.resolve_batch("auto", 1, 64, world=2, fits=lambda m: True, cap=16)
    assert (choice.micro_batch, choice.grad_accum) == (16, 2)  # 32 per rank, capped at 16
    assert hardware.resolve_batch("auto", 1, 6, world=1, fits=lambda m: False, cap=8).micro_batch == 1
    assert hardware.resolve_batch(16, 4, None, world=2, fits=None, cap=8).effective_batch == 128
    with pytest.raises(ValueError, match="not divisible"):
        hardware.resolve_batch("auto", 1, 63, world=2, fits=lambda m: True, cap=8)


def test_the_batch_probe_leaves_the_random_state_as_it_found_it(monkeypatch):
    """Its tokens, dropout and router noise draw from the RNGs: without restoring them, the run's random stream
    would depend on how many sizes were probed. On CPU here, with CUDA's memory calls and RNG faked."""
    spec = load_spec(None, ["--model.d_model=64", "--model.variant=moe", "--model.n_layers=1"])
    assert spec.model.dropout > 0 and spec.model.router_noise_std > 0
    model = build_model(spec.model, 256).train()
    cuda_rng = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=2**40))
    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: cuda_rng.append(("saved", d)) or "state")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, d: cuda_rng.append((f"restored {state}", d)))
    fits = hardware.cuda_probe_fits(model, 256, 16, contextlib.nullcontext, torch.device("cpu"))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert fits(4) and fits(2)
    assert torch.equal(torch.get_rng_state(), before)
    assert cuda_rng == [("saved", torch.device("cpu")), ("restored state", torch.device("cpu"))] * 2  # the device's


def test_batch_auto_spec_rules():
    assert TrainSpec(batch_size="auto", effective_batch=64).batch_size == "auto"
    for bad in ({"batch_size": "auto"}, {"batch_size": 8, "effective_batch": 64}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            TrainSpec(**bad)


def test_plan_run_on_cpu_resolves_auto_batch_and_estimate_grows_with_batch():
    spec = load_spec(None, ["--model.d_model=64", "--train.batch_size=auto", "--train.effective_batch=64"])
    plan = plan_run(spec, torch.device("cpu"), build_model(spec.model, 512), 512)
    assert plan.batch.how == "auto" and plan.batch.micro_batch * plan.batch.grad_accum == 64
    assert plan.preset == "CPU" and plan.price_per_hour is None and plan.flops_per_token > 0
    resolved = plan.apply(spec)
    assert resolved.train.batch_size == plan.batch.micro_batch and resolved.train.effective_batch is None
    header = json.loads(json.dumps(plan.header()))
    assert header["batch"]["effective_batch"] == 64
    assert header["precision"] == hardware.resolve_precision("auto", torch.device("cpu"))  # what auto picks here
    small = hardware.estimate_train_bytes(10**6, 512, 128, 2, 4, 8192, 128, micro=1)
    assert hardware.estimate_train_bytes(10**6, 512, 128, 2, 4, 8192, 128, micro=8) > small


def test_grouped_experts_compiled_outside_bf16_are_refused_before_the_run():
    # torch 2.13 traces grouped_mm for bf16 inputs only: the first compiled fp32/fp16 step would crash mid-run.
    flags = ["--model.d_model=64", "--model.experts_implementation=grouped", "--train.precision=fp32"]
    spec = load_spec(None, [*flags, "--train.compile=true"])
    with pytest.raises(ValueError, match="'grouped' cannot be compiled in fp32"):
        plan_run(spec, torch.device("cpu"), build_model(spec.model, 512), 512, peak=False)
    spec = load_spec(None, [*flags, "--train.compile=false"])  # eager grouped_mm takes fp32 on CPU
    assert not plan_run(spec, torch.device("cpu"), build_model(spec.model, 512), 512, peak=False).compile
    spec = load_spec(None, [*flags, "--train.compile=true", "--model.variant=mlp"])  # dense: no experts to group
    assert plan_run(spec, torch.device("cpu"), build_model(spec.model, 512), 512, peak=False).compile


def test_plan_run_under_torchrun_takes_the_micro_batch_every_rank_fits(monkeypatch):
    """batch_size 'auto' with 2 ranks: each picks from its own memory, then all take the smallest pick."""
    spec = load_spec(None, ["--model.d_model=64", "--train.batch_size=auto", "--train.effective_batch=64"])
    alone = plan_run(spec, torch.device("cpu"), build_model(spec.model, 512), 512, world_size=2).batch
    assert (alone.micro_batch, alone.grad_accum) == (32, 1)  # no process group: this rank's own pick
    monkeypatch.setattr("blueberry.distributed.smallest_across_ranks", lambda micro: min(micro, 4))  # the other: 4
    agreed = plan_run(spec, torch.device("cpu"), build_model(spec.model, 512), 512, world_size=2).batch
    assert (agreed.micro_batch, agreed.grad_accum, agreed.effective_batch, agreed.how) == (4, 8, 64, "auto")


def test_plan_run_decides_compile_from_the_run_s_micro_steps_after_choosing_the_batch(monkeypatch):
    asked = []
    monkeypatch.setattr("blueberry.plan.resolve_compile", lambda requested, device, steps: asked.append(steps))
    fixed = load_spec(None, ["--model.d_model=64", "--train.steps=375", "--train.grad_accum=4"])
    plan_run(fixed, torch.device("cpu"), build_model(fixed.model, 512), 512)
    auto = ["--model.d_model=64", "--train.steps=100", "--train.batch_size=auto", "--train.effective_batch=64"]
    spec = load_spec(None, auto)
    batch = plan_run(spec, torch.device("cpu"), build_model(spec.model, 512), 512).batch
    assert asked == [375 * 4, 100 * batch.grad_accum]


def test_what_the_batch_size_probe_routed_never_moves_a_routing_bias(monkeypatch):
    """On CUDA the probe runs passes in training mode on random tokens: with model.balance = bias_update, what
    they routed must not move the first routing-bias update (only the trainer's micro-steps note their loads)."""
    from blueberry import plan

    def probing_plan_run(spec, device, model, vocab_size, *args, **kwargs):
        model(torch.randint(vocab_size, (2, 16)))  # the probe's pass
        return plan_run(spec, device, model, vocab_size, *args, **kwargs)

    monkeypatch.setattr(plan, "plan_run", probing_plan_run)
    spec = load_spec(None, ["--model.variant=moe", "--model.d_model=64", "--model.balance=bias_update"])
    model = plan.build(spec, torch.device("cpu"), 512, check_causal=False, peak=False).model
    biases = [ffn.moe.gate.e_score_correction_bias.clone() for ffn in model.routed_ffns()]
    model.after_optimizer_step()  # the first bias update, before any training step routed anything
    assert all(torch.equal(ffn.moe.gate.e_score_correction_bias, b) for ffn, b in zip(model.routed_ffns(), biases))


def test_doctor_prints_findings_and_choices():
    result = CliRunner().invoke(main, ["doctor", "--model.d_model=64", "--train.precision=fp32"])
    assert result.exit_code == 0, result.output
    assert "CPU" in result.output and "precision  fp32" in result.output and "GPUs     none" in result.output
    assert "make run on this machine (cpu): sweeps/cpu/ablation.yaml" in result.output  # the twin, not the study shape
    result = CliRunner().invoke(main, ["doctor", "--json", "--model.d_model=64"])
    found = json.loads(result.output)
    assert found["plan"]["device"] == "cpu" and found["hardware"]["preset"] == "CPU"
    assert found["study"]["make_run"] == "sweeps/cpu/ablation.yaml"


def test_make_run_on_cuda_is_the_time_boxed_study_shape():
    from blueberry import study

    assert study.describe("cuda")["make_run"] == "sweeps/ablation_quick.yaml"
    assert "study's shapes" in study.describe("cuda")["make_study"]
    result = CliRunner().invoke(main, ["doctor", "--train.device=cuda"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output


def test_compile_auto_means_cuda_and_a_run_long_enough_to_win_back_the_compile():
    resolve_compile, long = hardware.resolve_compile, hardware.COMPILE_MIN_MICRO_STEPS
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_compile("auto", cuda, long) and not resolve_compile("auto", cpu, 10 * long)
    assert not resolve_compile("auto", cuda, 375 * 4)  # the study's runs: eager was faster on an H200
    assert resolve_compile(True, cpu, 1) and not resolve_compile(False, cuda, 10 * long)
    assert load_spec(None, []).train.compile == "auto"
    assert load_spec(None, ["--train.compile=false"]).train.compile is False
    assert load_spec(None, ["--train.compile=true"]).train.compile is True
