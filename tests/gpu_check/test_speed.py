"""The in-process checks on CPU at a tiny shape: the same code gpu-check runs on a GPU at the study shape."""

from pathlib import Path

import pytest
import torch

from blueberry.bench.suite import TINY
from blueberry.gpu_check import speed
from blueberry.gpu_check.projection import read_experiment
from blueberry.gpu_check.suite import CheckFailed, CheckSkipped, Context
from blueberry.hardware import resolve_precision

SHAPE = [*TINY, "--train.threads=1"]


@pytest.fixture
def context(tmp_path):
    return Context(torch.device("cpu"), tmp_path, shape=SHAPE, log=lambda m: None)


def test_throughput_check_measures_presets_on_cpu(context):
    presets = read_experiment().presets[1:3]  # mlp, attention_mlp: seconds each at the tiny shape
    # The precision this CPU has: bf16 where it is native (AMX, AVX512-BF16), fp32 on AVX2 only, where bf16 is
    # emulated 20-90x slower and its square-GEMM "ceiling" is below what small matrices reach (MFU > 1).
    precision = speed.main_precision(context.device)
    assert precision == resolve_precision("auto", context.device)
    figures = speed.measure_presets(context, 60, [f"--train.precision={precision}", "--train.compile=false"], presets)
    assert set(figures["cases"]) == {"mlp", "attention_mlp"}
    for case in figures["cases"].values():
        assert case["precision"] == precision and case["tokens_per_s"] > 0 and case["peak_memory_mb"] > 0
        assert 0 < case["mfu"] < 1 and case["tokens_per_step"] == 4 * 32  # TINY: 4 windows × 32 tokens
    assert [label for label, _ in figures["rows"]] == ["mlp", "attention_mlp"]


def test_a_spent_time_box_skips_the_remaining_presets(context):
    figures = speed.measure_presets(context, 0.0, ["--train.compile=false"], read_experiment().presets[1:3])
    assert list(figures["cases"]) == ["mlp"] and figures["rows"][1] == ("attention_mlp", "skipped: time box spent")


def test_chunked_loss_experts_batch_auto_and_doctor_checks_run_on_cpu(context):
    chunked = speed.check_chunked_loss(context, 60)
    assert chunked["full"]["tokens_per_s"] > 0 and chunked["chunked"]["tokens_per_s"] > 0
    experts = speed.check_experts(context, 60)
    assert set(experts["cases"]) == {"sorted", "grouped"} and experts["rows"][-1][0] == "grouped / sorted"
    assert experts["rows"][0][0] == "grouped = sorted" and experts["difference"] < 1e-4
    auto = speed.check_batch_auto(context, 60)
    assert auto["micro_batch"] * auto["grad_accum"] == 16  # 4 of TINY's 4-window micro-batches
    doctor = speed.check_doctor(context, 60)
    assert doctor["plan"]["device"] == "cpu" and "A run of Experiment 1's spec" in doctor["doctor"]
    with pytest.raises(CheckSkipped, match="CUDA"):
        speed.check_fp16(context, 60)


def test_the_compiled_check_compiles_the_first_preset_twice_the_second_time_with_warm_caches(context, monkeypatch):
    measured = []  # (preset overrides, first steps): a cold compile 20 s, a warm one 5 s, on a GPU's scale

    def fake_measure(context, overrides, *args):
        first = 5.0 if overrides in [o for o, _ in measured] else 20.0
        measured.append((overrides, first))
        return {"tokens_per_s": 1000.0, "first_step_s": first, "mfu": None, "peak_memory_mb": 1.0}

    monkeypatch.setattr(speed, "measure", fake_measure)
    figures = speed.check_compiled(context, 600)
    presets = read_experiment().presets
    assert len(measured) == len(presets) + 1 and measured[0][0] == measured[1][0]
    assert all("--train.compile=true" in overrides for overrides, _ in measured)
    assert figures["compile_first_steps_s"] == {"preset": presets[0][0], "cold": 20.0, "warm": 5.0}
    assert list(figures["cases"]) == [label for label, _ in presets]
    assert figures["rows"][1] == (
        f"{presets[0][0]} compiled again",
        "first steps 5.0 s with Inductor's caches warm (cold 20.0 s)",
    )


def crashing_on(preset_overrides: list[str], error: str):
    """A stand-in for speed.measure: 1 s and 1,000 tokens/s for every preset, a RuntimeError for this one."""

    def fake_measure(context, overrides, *args):
        if overrides[: len(preset_overrides)] == preset_overrides:
            raise RuntimeError(error)
        return {"tokens_per_s": 1000.0, "first_step_s": 1.0, "mfu": None, "peak_memory_mb": 1.0}

    return fake_measure


def test_a_preset_that_crashes_is_its_own_result_and_the_others_are_kept(context, monkeypatch):
    presets = read_experiment().presets
    monkeypatch.setattr(speed, "measure", crashing_on(presets[1][1], "CUDA error: an illegal memory access"))
    with pytest.raises(CheckFailed, match=f"failed: {presets[1][0]}") as failed:
        speed.measure_presets(context, 600, [])
    figures = failed.value.figures
    assert len(figures["cases"]) == len(presets) and figures["cases"][presets[1][0]]["error"].startswith("RuntimeError")
    assert sum("tokens_per_s" in case for case in figures["cases"].values()) == len(presets) - 1


def test_a_compiled_preset_that_crashes_keeps_the_others_and_the_first_ones_compile_times(context, monkeypatch):
    presets = read_experiment().presets
    monkeypatch.setattr(speed, "measure", crashing_on(presets[2][1], "InductorError: compile failed"))
    with pytest.raises(CheckFailed, match=f"failed: {presets[2][0]}") as failed:
        speed.check_compiled(context, 600)
    figures = failed.value.figures
    assert list(figures["cases"]) == [label for label, _ in presets] and "compile_first_steps_s" in figures
    assert sum("tokens_per_s" in case for case in figures["cases"].values()) == len(presets) - 1


def test_the_compiled_check_keeps_its_time_box(context, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(speed.time, "monotonic", lambda: clock[0])

    def fake_measure(context, overrides, *args):  # every compiled preset takes 3 s
        clock[0] += 3.0
        return {"tokens_per_s": 1000.0, "first_step_s": 3.0, "mfu": None, "peak_memory_mb": 1.0}

    monkeypatch.setattr(speed, "measure", fake_measure)
    figures = speed.check_compiled(context, 7.0)  # the first preset and its warm rerun fit, a third would not
    assert clock[0] <= 7.0 and "compile_first_steps_s" in figures
    figures = speed.check_compiled(context, 5.0)  # only the first: no warm rerun, no second preset
    assert clock[0] <= 7.0 + 5.0 and figures["rows"][1][1] == "skipped: time box spent"
    assert "compile_first_steps_s" not in figures


def test_the_experts_check_fails_where_grouped_mm_computes_something_else(context, monkeypatch):
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda a, b, offs: grouped_mm(a, b, offs=offs) * 1.1)
    with pytest.raises(CheckFailed, match="grouped_mm differs from the sorted dispatch"):
        speed.check_experts(context, 60)


def test_projection_takes_the_speed_compile_auto_would_run_at_and_charges_a_compiled_run_its_compile(
    context, monkeypatch
):
    labels = [label for label, _ in read_experiment().presets]
    context.results["throughput_eager"] = {
        "cases": {label: {"tokens_per_s": 1000.0, "first_step_s": 1.0} for label in labels}
    }
    context.results["throughput_compiled"] = {
        "cases": {"mlp": {"tokens_per_s": 2000.0, "first_step_s": 16.0}, "moe": {"error": "x"}}
    }
    context.results["blueberry_run"] = {"startup_s": 10.0}
    tokens = 375 * 4 * 16 * 256
    figures = speed.check_projection(context, 5)  # the study's 1,500 micro-steps: auto runs them eagerly
    assert set(figures["measured"].values()) == {"eager"}
    assert figures["train_s_here"] == pytest.approx(3 * tokens * len(labels) / 1000)
    basis = dict(figures["rows"])["projection basis"]
    assert figures["rows"][0][0] == "PROJECTION CPU" and "start-up 10 s" in basis
    assert f"{len(labels)} eager, 0 compiled" in basis
    not_compiled = ", ".join(label for label in labels if label != "mlp")
    assert figures["rows"][-1] == (
        "PROJECTION CPU, a sweep compiling every run",
        f"not projected: no compiled speed for {not_compiled}",
    )
    monkeypatch.setattr(speed, "resolve_compile", lambda requested, device, micro_steps: micro_steps >= 1500)
    figures = speed.check_projection(context, 5)  # as if auto compiled runs this long
    assert figures["measured"]["mlp"] == "compiled" and figures["measured"]["moe"] == "eager"  # moe: no compiled speed
    assert figures["train_s_here"] == pytest.approx(3 * tokens * ((len(labels) - 1) / 1000 + 1 / 2000))
    here = figures["targets"][0]
    assert here["wall_s"] == pytest.approx(figures["train_s_here"] + 3 * len(labels) * 10.0 + 3 * 15.0)


def test_projection_of_a_sweep_compiling_every_run_charges_each_presets_first_seed_a_cold_compile(context):
    labels = [label for label, _ in read_experiment().presets]
    context.results["throughput_eager"] = {
        "cases": {label: {"tokens_per_s": 1000.0, "first_step_s": 1.0} for label in labels}
    }
    context.results["throughput_compiled"] = {  # every preset compiled: 15 s cold; warm, the first one took 3 s
        "cases": {label: {"tokens_per_s": 2000.0, "first_step_s": 16.0} for label in labels},
        "compile_first_steps_s": {"preset": labels[0], "cold": 16.0, "warm": 4.0},
    }
    context.results["blueberry_run"] = {"startup_s": 10.0}
    figures = speed.check_projection(context, 5)
    swept, tokens, seeds = figures["compiled_sweep"], 375 * 4 * 16 * 256, len(read_experiment().seeds)
    assert swept["warm_share"] == pytest.approx(0.2)  # (4 - 1) / (16 - 1)
    per_preset = seeds * tokens / 2000 + seeds * 10.0 + 15.0 + (seeds - 1) * 15.0 * 0.2
    assert swept["wall_s"] == pytest.approx(len(labels) * per_preset)
    assert figures["rows"][-1][0] == "PROJECTION CPU, a sweep compiling every run"
    assert figures["rows"][-1][1].startswith(f"{swept['wall_s'] / 60:.1f} min")


def test_projection_splits_each_presets_step_by_the_compute_speed_from_two_micro_batch_sizes(context):
    labels = [label for label, _ in read_experiment().presets]
    fpt = 2e8
    small = {"tokens_per_step": 4096, "flops_per_token": fpt, "step_s": 0.030 + 4096 * fpt / 500e12}
    cases = {label: {**small, "tokens_per_s": 4096 / small["step_s"], "first_step_s": 1.0} for label in labels}
    context.results["throughput_eager"] = {"cases": cases}
    large = {"tokens_per_step": 16384, "flops_per_token": fpt, "step_s": 0.030 + 16384 * fpt / 500e12}
    context.results["batch_auto"] = {"run": large, "grad_accum": 1}
    figures = speed.check_projection(context, 5)
    share = 4096 * fpt / 500e12 / small["step_s"]  # 1.6 ms of compute in a 31.6 ms micro-step
    assert [run["compute_share"] for run in figures["runs_projected"]] == pytest.approx([share] * len(labels))
    model = dict(figures["rows"])["projection model"]
    assert model.startswith("a micro-step = host overhead + its FLOPs at 500 TFLOP/s") and "30.0 ms" in model
    del context.results["batch_auto"]  # no second size: every step scales whole (equal MFU)
    figures = speed.check_projection(context, 5)
    assert {run["compute_share"] for run in figures["runs_projected"]} == {1.0}
    assert dict(figures["rows"])["projection model"].startswith("equal MFU")


def test_projection_is_skipped_when_a_preset_was_not_measured(context):
    context.results["throughput_eager"] = {"cases": {"mlp": {"tokens_per_s": 1.0}}}
    with pytest.raises(CheckSkipped, match="no measured speed for baseline"):
        speed.check_projection(context, 5)


def test_study_shape_is_the_reports():
    spec = speed.study_spec(Context(torch.device("cpu"), Path("."), shape=speed.STUDY_SHAPE), ["--model.variant=mlp"])
    assert (spec.model.d_model, spec.model.n_layers, spec.model.n_heads) == (512, 3, 8)
    assert (spec.data.seq_len, spec.data.vocab_size, spec.train.batch_size) == (256, 49152, 16)
