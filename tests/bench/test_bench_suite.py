"""The bench's machinery on tiny shapes: it measures through the real trainer and reports what it measured.

No timing is asserted: figures on a shared 2-core machine are noise. `make bench` is where speed is read.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blueberry.bench.measure import measure_throughput, tracking_overhead
from blueberry.bench.suite import QUICKSTART, TARGETS, TINY, build_cases, check_targets, compute_ratios, format_table
from blueberry.overrides import load_spec


def test_measure_throughput_runs_the_trainer_and_counts_flops():
    spec = load_spec(QUICKSTART, [*TINY, "--model.variant=moe"])
    result = measure_throughput(spec, warmup=1, repeats=2)
    assert len(result["timed_step_s"]) == 2 and result["step_s"] > 0
    assert result["tokens_per_step"] == 4 * 32 and result["tokens_per_s"] > 0
    assert result["flops_per_token"] > 0 and result["peak_rss_mb"] > 0 and result["precision"] == "fp32"


def test_tracking_overhead_runs_record_and_wandb_offline():
    spec = load_spec(QUICKSTART, [*TINY, "--model.variant=mlp", "--train.log_every=2"])
    result = tracking_overhead(spec, steps=4, repeats=1)
    assert result["on_s"] > 0 and result["off_s"] > 0 and 0 <= result["log_share"] < 1


def test_cases_ratios_targets_and_table():
    keys = {case.key for case in build_cases(quick=True)}
    assert {"q/moe/bf16", "q/moe/fp32/grouped_mm", "q/moe/fp32/eager", "q/attention_moe/fp32/dense_equal"} <= keys
    full = {case.key for case in build_cases(quick=False)}
    assert {"s/mlp/bf16", "s/mlp/fp32", "s/moe/bf16/dense_equal", "q/attention_moe/fp32/compiled"} <= full

    def case(tokens_per_s, step_s, **extra):
        return {
            "shape": "512d",
            "label": "x",
            "precision": "bf16",
            "tokens_per_s": tokens_per_s,
            "step_s": step_s,
            "mfu": 0.3,
            "tflops": 0.3,
            "peak_rss_mb": 900.0,
            "first_step_s": 1.0,
            **extra,
        }

    results = {
        "s/mlp/bf16": case(2000, 2.0),
        "s/mlp/fp32": case(500, 8.0),
        "s/moe/bf16": case(1000, 2.6),
        "s/moe/bf16/dense_equal": case(1600, 2.0),
        "s/moe/bf16/eager": case(800, 3.2),
        "s/moe/bf16/grouped_mm": {"shape": "512d", "label": "x", "error": "RuntimeError: no"},
    }
    ratios = compute_ratios(results)
    assert "bf16/fp32 s/moe" not in ratios  # no fp32 case to compare with: no row
    assert ratios["bf16/fp32 s/mlp"] == 4.0 and ratios["MoE/dense step s/moe/bf16"] == pytest.approx(1.3)
    assert ratios["sorted/eager experts s/moe/bf16"] == pytest.approx(1.25)  # a speed-up of the default
    assert ratios["grouped_mm/sorted experts s/moe/bf16"] is None  # a failed case gives no ratio, not a crash
    tracking = {"overhead": 0.01, "log_share": 0.005, "wandb_init_s": 1.0, "steps": 60, "log_every": 10}
    latency = {"warm": {"first_step_s": 12.0}}
    targets = check_targets(results, ratios, {"bf16": 1e12, "fp32": 2e11}, tracking, latency)
    assert set(targets) == set(TARGETS)
    assert targets["mfu_512d_dense"]["met"] is False and targets["mfu_512d_dense"]["value"] == pytest.approx(0.3)
    assert targets["moe_vs_dense_512d"]["met"] is True and targets["tracking_overhead"]["met"] is True
    assert targets["first_step_warm_s"]["met"] is False
    outcome = {
        "gemm_ceiling_flops": {"bf16": 1e12, "fp32": 2e11},
        "hardware": {"cpu": {"model": "cpu", "cores": 2}},
        "torch_threads": 2,
        "load_average": [1.0, 1.5],
        "cases": results,
        "ratios": ratios,
        "tracking": tracking,
        "first_step_latency": latency,
        "report_build": {"error": "report not available"},
        "targets": targets,
        "contention": {
            "load_processes": 4,
            "cores": 2,
            "torch default": {"error": "timed out"},
            "blueberry": {
                **{"idle_s": 0.2, "loaded_s": 0.9, "ratio": 4.5, "later_s": 1.1, "later_ratio": 5.5},
                **{"threads_idle": 2, "threads_loaded": 1, "threads_later": 2, "floor": 4.25},
            },
        },
    }
    table = format_table(outcome)
    assert "| 512d | x | bf16 | 2000 |" in table and "failed: RuntimeError: no" in table
    assert "| step time at load 4 on 2 cores ÷ idle, torch default | failed: timed out |" in table
    assert "| 4.50 (0.200 s → 0.900 s; threads 2 idle, 1 loaded; a fair scheduler's floor 4.25) |" in table
    assert "load arriving after the start, ÷ idle, blueberry | 5.50 (1.100 s; threads 2) |" in table
    assert "| 30.0% | no |" in table and "report not available" in table


def test_a_cpu_without_native_bf16_measures_512d_in_fp32_and_bf16_once_at_the_quickstart():
    cases = {case.key: case for case in build_cases(quick=False, fast="fp32")}
    assert {"s/mlp/fp32", "s/moe/fp32/dense_equal", "s/mlp/fp32/compiled", "v/mlp/fp32/full_logits"} <= set(cases)
    assert not [key for key in cases if key.startswith(("s/", "v/")) and "bf16" in key]
    assert [key for key in cases if "bf16" in key] == ["q/mlp/bf16"] and cases["q/mlp/bf16"].rounds == 1
    assert all("--train.precision=fp32" in case.overrides for key, case in cases.items() if key[0] in "sv")
    dense = {"tflops": 0.03, "step_s": 1.0}
    targets = check_targets({"s/mlp/fp32": dense}, {}, {"bf16": 0.002e12, "fp32": 0.1e12}, {}, {}, fast="fp32")
    assert targets["mfu_512d_dense"]["value"] == pytest.approx(0.3)  # against the fp32 ceiling


def test_mfu_against_the_ceiling_of_the_cases_precision_and_none_where_bf16_is_emulated(monkeypatch):
    from blueberry.bench.suite import add_mfu, mfu_peaks

    def results():
        return {
            "fp32": {"precision": "fp32", "tflops": 0.05},
            "bf16": {"precision": "bf16", "tflops": 0.003},
            "failed": {"error": "RuntimeError: no"},
        }

    ceilings = {"fp32": 0.1e12, "bf16": 0.002e12}
    for native, bf16_mfu in ((False, None), (True, 1.5)):
        monkeypatch.setattr("blueberry.hardware.cpu_supports_bf16", lambda flags=None, native=native: native)
        measured = results()
        add_mfu(measured, mfu_peaks(ceilings, torch.device("cpu")))
        assert measured["fp32"]["mfu"] == pytest.approx(0.5) and "mfu" not in measured["failed"]
        assert measured["bf16"]["mfu"] == (bf16_mfu and pytest.approx(bf16_mfu))
    measured["bf16"]["shape"], measured["bf16"]["label"] = "quickstart", "mlp"
    measured["bf16"].update(mfu=None, tokens_per_s=10.0, step_s=1.0, peak_rss_mb=None, first_step_s=1.0)
    outcome = bench_outcome(gemm_ceiling_flops=ceilings, cases={"q/mlp/bf16": measured["bf16"]})
    assert "| quickstart | mlp | bf16 | 10 | 1.000 | n/a | 0.003 |" in format_table(outcome)


def bench_outcome(**figures) -> dict:
    """What `run_bench` returns, nothing measured but `figures`."""
    return {
        "hardware": {"cpu": {"model": "cpu", "cores": 2}},
        "torch_threads": 2,
        "load_average": [0.0, 0.0],
        "cases": {},
        "ratios": {},
        "tracking": {"overhead": 0.0, "log_share": 0.0, "wandb_init_s": 1.0, "steps": 2, "log_every": 1},
        "first_step_latency": {},
        "report_build": {"error": "x"},
        "targets": {},
        "contention": {},
        **figures,
    }


def test_on_a_gpu_mfu_is_against_its_data_sheet_peak_not_the_cpus_gemm_ceiling(monkeypatch):
    """The GEMM ceilings are measured on CPU tensors: a GPU case divided by them reads thousands of per cent."""
    from blueberry.bench.suite import add_mfu, mfu_peaks

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peaks = mfu_peaks({"fp32": 0.1e12, "bf16": 0.2e12}, torch.device("cuda"))
    assert peaks == {"fp32": 494.7e12, "bf16": 989.4e12}  # as a run takes them: fp32 at the TF32 peak
    measured = {"s/mlp/bf16": {"precision": "bf16", "tflops": 98.94, "step_s": 1.0}}
    add_mfu(measured, peaks)
    assert measured["s/mlp/bf16"]["mfu"] == pytest.approx(0.1)
    targets = check_targets(measured, {}, peaks, {}, {})
    assert targets["mfu_512d_dense"]["value"] == pytest.approx(0.1) and targets["mfu_512d_dense"]["met"] is False
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert mfu_peaks({"fp32": 0.1e12}, torch.device("cuda")) == {"fp32": None}  # no peak known: no MFU
    outcome = bench_outcome(
        gemm_ceiling_flops={"fp32": 0.1e12, "bf16": 0.2e12},
        mfu_peak_flops={"fp32": 494.7e12, "bf16": None},
        hardware={"cpu": {"model": "cpu", "cores": 16}, "cuda_available": True},
    )
    assert "MFU against the GPU's data-sheet peak (TFLOP/s): fp32 494.7, bf16 unknown" in format_table(outcome)


def test_the_optimizer_step_is_measured_on_the_device_the_model_was_built_for(monkeypatch):
    """build() leaves the model on the CPU; on a GPU the random gradients are drawn there, so a model left behind
    fails the step (after every case ran) and its optimizers would be the CPU's."""
    import blueberry.bench.measure as measure
    import blueberry.train.optim as optim

    real_build, seen = measure.build, []

    def build_on_meta(*args, **kwargs):  # the one non-CPU device a CPU machine has
        built = real_build(*args, **kwargs)
        built.device = torch.device("meta")
        return built

    class Measured(Exception):
        pass

    def record_devices(model, train_spec):
        seen.extend({p.device.type for p in model.parameters()})
        raise Measured

    monkeypatch.setattr(measure, "build", build_on_meta)
    monkeypatch.setattr(optim, "build_optimizers", record_devices)
    with pytest.raises(Measured):
        measure.optimizer_step_s(load_spec(QUICKSTART, [*TINY, "--model.variant=moe"]))
    assert seen == ["meta"]


def test_chunked_loss_memory_cases_at_the_reports_vocabulary():
    full = {case.key: case for case in build_cases(quick=False)}
    assert "--data.vocab_size=49152" in full["v/mlp/bf16"].overrides
    assert "--train.chunked_loss=false" in full["v/mlp/bf16/full_logits"].overrides
    assert full["v/mlp/bf16"].group == full["v/mlp/bf16/full_logits"].group  # measured in alternating rounds
    results = {"v/mlp/bf16": {"peak_rss_mb": 1000.0}, "v/mlp/bf16/full_logits": {"peak_rss_mb": 2500.0}}
    assert compute_ratios(results) == {"peak memory full logits/chunked loss v/mlp/bf16": 2.5}


def test_optimizer_share_is_measured_for_each_shapes_plain_cases():
    from blueberry.bench.measure import optimizer_step_s
    from blueberry.bench.suite import optimizer_shares

    spec = load_spec(QUICKSTART, [*TINY, "--model.variant=moe"])
    assert optimizer_step_s(spec, repeats=2) > 0
    cases = [c for c in build_cases(quick=True) if c.key in ("q/moe/fp32", "q/moe/bf16", "q/moe/fp32/eager")]
    results = {c.key: {"step_s": 1.0} for c in cases}
    shares = optimizer_shares(cases, results, "bf16", log=lambda _: None)
    assert list(shares) == ["optimizer step/step q/moe/fp32"]  # the shape's precision only; no variants
    assert 0 < shares["optimizer step/step q/moe/fp32"] == results["q/moe/fp32"]["optimizer_step_s"]


def test_moe_dense_step_without_the_optimizer_steps_compares_the_models_alone():
    from blueberry.bench.suite import moe_dense_without_optimizer

    results = {
        "s/moe/fp32": {"step_s": 3.0, "optimizer_step_s": 1.2},
        "s/moe/fp32/dense_equal": {"step_s": 2.0, "optimizer_step_s": 0.4},
        "q/moe/fp32": {"step_s": 1.0},  # its optimizer step not measured (failed): no row
        "q/moe/fp32/dense_equal": {"step_s": 1.0, "optimizer_step_s": 0.1},
    }
    assert moe_dense_without_optimizer(results, study_accumulation=4) == {
        "MoE/dense step less the optimizer step s/moe/fp32": pytest.approx(1.8 / 1.6),
        # the study's step: 4 micro-batches' forward and backward, then one optimizer step
        "MoE/dense step at the study's 4 micro-batches s/moe/fp32": pytest.approx((4 * 1.8 + 1.2) / (4 * 1.6 + 0.4)),
    }


def test_fair_share_floor_scales_the_idle_step_of_the_threads_taken_by_the_cpu_share_left():
    from blueberry.bench.contention import fair_share_floor

    # two idle threads 0.2 s a step, one thread 0.34 s; four busy processes + one thread share 2 cores: 0.4 each
    assert fair_share_floor(0.2, 0.34, k=1, load=4, cores=2) == pytest.approx(0.34 / 0.4 / 0.2)
    assert fair_share_floor(0.2, 0.2, k=2, load=4, cores=2) == pytest.approx(3.0)  # 2 of 6 threads' shares
    assert fair_share_floor(0.2, 0.34, k=1, load=1, cores=2) == pytest.approx(1.7)  # a core each: no slowdown


def test_contention_worker_waits_for_the_load_arriving_later():
    from blueberry.bench.contention import _worker

    # warms up, says ready, measures after "go"; with the thread count given (the fair-share floor's measurement)
    later = _worker("blueberry", 1, QUICKSTART, TINY, load=0, later=True, threads=1)
    assert "error" not in later, later
    assert later["step_s"] > 0 and later["threads"] == 1


def _alive(pid: int) -> bool:
    """The process runs (a zombie, exited but not yet reaped by whoever adopted it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_the_contention_load_stops_when_the_bench_is_killed():
    """`kill -9` of the bench runs no cleanup: its busy-loop processes must not spin on alone (for 15 minutes)."""
    parent = "import sys, time\nfrom blueberry.bench.contention import _Load\n"
    parent += "load = _Load(1)\nload.__enter__()\nprint(*(p.pid for p in load.spinners), flush=True)\ntime.sleep(600)\n"
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    spinners = [int(pid) for pid in proc.stdout.readline().split()]
    try:
        assert spinners and all(_alive(pid) for pid in spinners)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30  # a generous bound for a loaded machine, not a speed claim
        while any(_alive(pid) for pid in spinners) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in spinners if _alive(pid)]
    finally:
        for pid in spinners:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_loads_busy_processes_start_without_torch():
    """Each busy-loop process is a spawned interpreter that imports `blueberry.bench.contention` (and so the
    package): with the suite's torch and transformers it spent its first seconds importing them, past the load's
    settling time, and held their memory."""
    code = "import sys, blueberry.bench.contention; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_tokens_per_step_count_the_batch_the_run_resolved():
    """batch_size "auto" is a string in the spec as written: multiplied, it was string repetition, then a TypeError
    after the training (`blueberry profile ... --train.batch_size=auto`)."""
    spec = load_spec(QUICKSTART, [*TINY, "--train.batch_size=auto", "--train.effective_batch=4"])
    result = measure_throughput(spec, warmup=1, repeats=1)
    assert result["tokens_per_step"] == 4 * 32 and result["tokens_per_s"] > 0


def test_every_preset_is_measured_at_the_quickstart_shape_and_those_with_a_512d_spec_at_512d():
    from blueberry.bench.suite import STUDY_512D
    from blueberry.models import registry

    for quick in (True, False):
        keys = {case.key for case in build_cases(quick=quick)}
        assert {f"q/{variant}/fp32" for variant in registry.PRESETS} <= keys
        assert {"q/deepseek_v3/fp32/grouped_mm", "q/deepseek_moe/fp32/dense_equal"} <= keys
    full = {case.key for case in build_cases(quick=False)}
    assert {key.split("/")[1] for key in full if key.startswith("s/")} == set(STUDY_512D)


def test_a_stage_after_the_cases_that_fails_is_an_error_entry_not_a_lost_bench(monkeypatch):
    """The cases take most of the bench and are saved only at the end: a later stage's failure is reported."""
    import blueberry.bench.suite as suite

    def broken(*args, **kwargs):
        raise RuntimeError("broken\nsecond line")

    for name in ("tracking_overhead", "first_step_latency", "measure_contention", "optimizer_step_s"):
        monkeypatch.setattr(suite, name, broken)
    monkeypatch.setattr(suite, "report_build_time", lambda quick: {"error": "not built here"})
    cases = [c for c in build_cases(quick=True) if c.key == "q/mlp/fp32"]
    results = {"q/mlp/fp32": {"step_s": 1.0}}
    logged = []
    after = suite.measure_after_cases(cases, results, quick=False, fast="bf16", log=logged.append)
    tracking, latency, contention, shares, report = after
    error = {"error": "RuntimeError: broken\nsecond line"}
    assert tracking == contention == latency["warm"] == latency["cold"] == error
    assert shares == {"optimizer step/step q/mlp/fp32": error} and "optimizer_step_s" not in results["q/mlp/fp32"]
    assert "tracking overhead failed: RuntimeError: broken\nsecond line" in logged
    targets = check_targets(results, shares, {"bf16": None, "fp32": None}, tracking, latency, report, contention)
    assert not [key for key, target in targets.items() if target["met"] is not None]
    figures = dict(tracking=tracking, first_step_latency=latency, contention=contention, ratios=shares)
    table = format_table(bench_outcome(gemm_ceiling_flops={"bf16": 1e12, "fp32": 2e11}, **figures, targets=targets))
    assert "| tracking on/off step time − 1 | failed: RuntimeError: broken second line |" in table
    assert "| first step after `blueberry run` (cold cache) | failed: RuntimeError: broken second line |" in table
    assert "| step time under a background load ÷ idle | failed: RuntimeError: broken second line |" in table
    assert "| optimizer step/step q/mlp/fp32 | failed: RuntimeError: broken second line |" in table


def test_a_first_step_not_reached_in_time_kills_the_run(monkeypatch):
    """It waited the timeout again for the run to end, then left it running."""
    from blueberry.bench import measure

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    try:
        with pytest.raises(RuntimeError, match=r"logged no first step \(still running after 0 s\)"):
            measure.first_step_latency(QUICKSTART, cold=False, timeout_s=0.1)
        assert started[0].returncode == -signal.SIGKILL
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
