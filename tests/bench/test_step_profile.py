"""`blueberry profile`: one settled step's time per aten op, over exactly one training step (no timing asserted)."""

import json

from click.testing import CliRunner

from blueberry.bench.step_profile import format_profile, profile_step
from blueberry.bench.suite import QUICKSTART, TINY
from blueberry.cli import main
from blueberry.overrides import load_spec


def test_profile_covers_one_training_step_and_its_matmuls():
    spec = load_spec(QUICKSTART, [*TINY, "--model.variant=moe", "--train.grad_accum=3"])
    result = profile_step(spec, settle=2)
    calls = {row["op"]: row["calls"] for row in result["ops"]}
    assert calls["embedding"] == 3  # one forward per micro-step of one optimizer step, nothing of the others
    assert 0 < result["matmul_s"] <= result["ops_s"] <= result["window_s"]
    assert [row["s"] for row in result["ops"]] == sorted((row["s"] for row in result["ops"]), reverse=True)
    assert calls.get("mm", 0) + calls.get("addmm", 0) > 0  # the linear layers' matmuls are seen
    table = format_profile(result, top=3)
    assert all(f"| {row['op']} | " in table for row in result["ops"][:3])
    assert f"| {len(result['ops']) - 3} other ops |" in table


def test_profile_command_prints_json_and_rejects_a_missing_spec():
    runner = CliRunner()
    result = runner.invoke(main, ["profile", QUICKSTART, *TINY, "--settle", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["settle_steps"] == 1
    missing = runner.invoke(main, ["profile", "--settle", "1"])
    assert missing.exit_code == 2 and "needs a run spec" in missing.output
    sweep_file = runner.invoke(main, ["profile", "sweeps/cpu/ablation.yaml"])
    assert sweep_file.exit_code == 2 and "W&B sweep file, not a run spec" in sweep_file.output
    bad = runner.invoke(main, ["profile", QUICKSTART, "--train.stepz=3"])
    assert bad.exit_code == 2 and "unknown field" in bad.output


def test_profile_and_doctor_refuse_what_a_run_refuses_without_a_traceback(monkeypatch):
    """A spec this machine cannot run and a price variable that does not parse: exit 2, named, as `run` does."""
    import torch

    runner = CliRunner()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["profile", QUICKSTART], ["doctor", QUICKSTART]):
        result = runner.invoke(main, [*command, *TINY, "--train.device=cuda"])
        assert result.exit_code == 2 and "train.device is 'cuda' but no CUDA GPU" in result.output, result.output
        monkeypatch.setenv("BLUEBERRY_PRICE_PER_HOUR", "abc")
        result = runner.invoke(main, [*command, *TINY])
        assert result.exit_code == 2 and "BLUEBERRY_PRICE_PER_HOUR='abc' is not a number" in result.output
        monkeypatch.delenv("BLUEBERRY_PRICE_PER_HOUR")
