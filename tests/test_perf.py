"""FLOPs per token against PyTorch's own FLOP counter, peak FLOP/s sources and the MFU metrics."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from blueberry import perf
from blueberry.hardware import CPU_PRESET, preset_for
from blueberry.models import build_model
from blueberry.spec import VARIANTS, ModelSpec
from blueberry.train.metrics import MetricsProcessor


def tiny(variant, **kw):
    shape = dict(d_model=64, n_heads=4, n_layers=2, d_ff=256, expert_d_ff=128, n_experts=4, q_lora_rank=32)
    return ModelSpec(variant=variant, kv_lora_rank=32, dropout=0.0, router_noise_std=0.0, **{**shape, **kw})


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_per_token_match_torch_flop_counter(variant):
    """The counted forward+backward FLOPs of one batch equal ours exactly (math SDPA: attention is plain matmuls).

    Every token visits exactly top_k distinct experts, so the MoE count of active experts is exact too.
    """
    torch.manual_seed(0)
    model = build_model(tiny(variant), 512)
    tokens = torch.randint(512, (3, 48))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(tokens)
        F.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()).backward()
    flops = perf.flops_per_token(model, seq_len=48)
    assert counter.get_total_flops() == pytest.approx(flops.total * tokens.numel(), rel=1e-9)


def test_moe_flops_count_active_experts_only():
    few = perf.flops_per_token(build_model(tiny("moe", n_experts=4, top_k=2), 512), 64)
    many = perf.flops_per_token(build_model(tiny("moe", n_experts=16, top_k=2), 512), 64)
    router_growth = 6 * 2 * 64 * (16 - 4)  # only the router (d_model × n_experts per layer) grows
    assert many.matmul - few.matmul == pytest.approx(router_growth)
    assert few.attention == 6 * 2 * 64 * 4 * (2 * 16)  # 6 × layers × T × heads × (qk + v head dims)


def test_peak_flops_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path))
    peak, source = perf.peak_flops(torch.device("cuda"), "bf16", preset_for("NVIDIA A100-SXM4-80GB"))
    assert peak == 312e12 and "data sheet" in source
    assert perf.peak_flops(torch.device("cuda"), "bf16", preset_for("Tesla T4"))[0] is None  # T4 has no bf16
    peak, source = perf.peak_flops(torch.device("cuda"), "fp32", preset_for("NVIDIA H100 80GB HBM3"))
    assert peak == 494.7e12 and source == "data sheet (H100, tf32)"  # fp32 matmuls run as TF32 on Ampere+
    assert perf.peak_flops(torch.device("cuda"), "fp32", preset_for("Tesla T4"))[0] == 8.1e12  # no TF32 on Turing
    quick, source = perf.peak_flops(torch.device("cpu"), "fp32", CPU_PRESET)
    assert quick > 0 and source.startswith("quick")
    perf.save_ceiling("fp32", 1.5e11)  # what `blueberry bench --ceiling` leaves for later runs
    peak, source = perf.peak_flops(torch.device("cpu"), "fp32", CPU_PRESET)
    assert peak == 1.5e11 and source.startswith("measured GEMM ceiling")
    monkeypatch.setattr(perf, "bf16_emulated", lambda device, precision: False)  # an AMX CPU
    assert perf.peak_flops(torch.device("cpu"), "bf16", CPU_PRESET)[1].startswith("quick")  # cached per precision


def test_emulated_bf16_has_no_peak_and_so_no_mfu(monkeypatch):
    """On a CPU without native bf16 the model's small products beat any emulated ceiling: MFU would read > 100 %."""
    monkeypatch.setattr("blueberry.hardware.cpu_supports_bf16", lambda flags=None: False)
    peak, source = perf.peak_flops(torch.device("cpu"), "bf16", CPU_PRESET)
    assert peak is None and "emulated" in source
    assert perf.peak_flops(torch.device("cuda"), "bf16", preset_for("NVIDIA A100-SXM4-80GB"))[0] == 312e12


def test_perf_tracker_adds_mfu_and_gpu_readings():
    class Monitor:
        def latest(self):
            return {"gpu/util_pct": 90.0}

    rows, summaries = [], []

    class Inner:
        def log(self, metrics, step):
            rows.append(metrics)

        def summary(self, values):
            summaries.append(values)

        def finish(self, state, reason=None):
            pass

    tracker = MetricsProcessor(Inner(), flops_per_token=6e6, peak=1e12, monitor=Monitor())
    tracker.log({"perf/tokens_per_s": 50_000.0}, 10)
    tracker.log({"val/loss": 3.0}, 10)
    assert rows[0]["perf/mfu"] == pytest.approx(0.3) and rows[0]["perf/tflops"] == pytest.approx(0.3)
    assert rows[0]["gpu/util_pct"] == 90.0 and rows[1] == {"val/loss": 3.0}
    tracker.summary({"perf/tokens_per_s": 50_000.0})
    assert summaries[0]["perf/mfu"] == pytest.approx(0.3)
