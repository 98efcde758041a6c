"""Settings outside the spec are checked before a run starts: exit 2 naming the setting, nothing written."""

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import blueberry.runner
from blueberry.cli import main
from blueberry.tracking.preflight import PreflightError, check_wandb_run_id, check_writable_dir, preflight
from blueberry.tracking.record import claim_run_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def never_run(monkeypatch):
    def execute(spec, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(blueberry.runner, "execute", execute)


def run_cli(*args):
    result = CliRunner().invoke(main, ["run", str(REPO / "experiments/quickstart.json"), *args])
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    return result


def test_a_runs_root_that_is_a_file_is_refused_before_the_run(tmp_path, never_run):
    (tmp_path / "file").write_text("")
    for root, message in [("file", "is a file, not a directory"), ("file/sub", "cannot be created")]:
        result = run_cli(f"--tracking.runs_root={tmp_path / root}")
        assert result.exit_code == 2 and "tracking.runs_root" in result.output and message in result.output


def test_a_read_only_runs_root_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as on a read-only disk (root ignores chmod)
    with pytest.raises(PreflightError, match="not writable"):
        check_writable_dir(tmp_path / "runs", "tracking.runs_root")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_directory_where_nothing_can_be_made_is_refused_even_for_root(tmp_path, never_run):
    """os.access answers yes to root for /proc; only making something there tells (and leaves nothing)."""
    with pytest.raises(PreflightError, match=r"--out '/proc/x': nothing can be made in /proc \(No such file"):
        check_writable_dir("/proc/x", "--out")
    result = run_cli("--tracking.runs_root=/proc/runs")
    assert result.exit_code == 2 and "tracking.runs_root '/proc/runs': nothing can be made in /proc" in result.output
    (tmp_path / "empty").mkdir()
    check_writable_dir(tmp_path / "empty" / "new" / "out", "--out")
    assert list((tmp_path / "empty").iterdir()) == []  # the probe directory is gone


def test_the_os_refusing_the_run_directory_is_a_preflight_error(tmp_path):
    with pytest.raises(PreflightError, match="runs root '/proc/no/such'"):
        claim_run_dir("/proc/no/such", "exp", "run")


def test_the_sweep_runs_root_is_checked_too(tmp_path):
    (tmp_path / "file").write_text("")
    sweep = REPO / "sweeps/cpu/ablation.yaml"
    result = CliRunner().invoke(main, ["sweep", str(sweep), "--runs-root", str(tmp_path / "file")])
    assert result.exit_code == 2 and "--runs-root" in result.output and "is a file" in result.output


@pytest.mark.parametrize("run_id", ["a/b", "a:b", "what?", "it's", " padded", "x" * 201])
def test_a_wandb_run_id_that_wandb_rejects_is_refused(run_id, monkeypatch, tmp_path, never_run):
    monkeypatch.setenv("WANDB_RUN_ID", run_id)
    with pytest.raises(PreflightError, match="WANDB_RUN_ID"):
        check_wandb_run_id()
    result = run_cli(f"--tracking.runs_root={tmp_path / 'runs'}")
    assert result.exit_code == 2 and "WANDB_RUN_ID" in result.output
    assert len(result.output) < 500 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("run_id", ["", "sweep-abc-t001", "x" * 200])
def test_an_accepted_or_empty_run_id_passes(run_id, monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", run_id)
    check_wandb_run_id()


@pytest.mark.parametrize(("variable", "value"), [("WANDB_PROJECT", "me/proj"), ("WANDB_MODE", "ofline")])
def test_a_wandb_variable_wandb_rejects_is_refused_before_the_run(variable, value, monkeypatch, tmp_path, never_run):
    monkeypatch.setenv(variable, value)
    result = run_cli(f"--tracking.runs_root={tmp_path / 'runs'}")
    assert result.exit_code == 2 and value in result.output, result.output
    assert len(result.output) < 500 and not (tmp_path / "runs").exists()
    args = ["run", str(REPO / "experiments/quickstart.json"), "--tracking.wandb=disabled"]
    result = CliRunner().invoke(main, args)  # no W&B, so its settings do not matter: the run starts
    assert "the run started" in str(result.exception)


def test_a_run_with_wandb_disabled_reads_no_wandb_setting(monkeypatch):
    """The runner chooses W&B's values from W&B's settings; with W&B disabled it reads none, so a variable W&B
    would reject is no traceback half-way through the run's set-up."""
    from blueberry.overrides import load_spec
    from blueberry.tracking.wandb_settings import run_settings

    monkeypatch.setenv("WANDB_MODE", "bogus")
    spec = load_spec(REPO / "experiments/quickstart.json", ["--tracking.wandb=disabled"])
    assert run_settings(spec, tags=[])["mode"].value == "disabled"


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("BLUEBERRY_GPU_PRICES", "{bad", "BLUEBERRY_GPU_PRICES"),
        ("BLUEBERRY_PRICE_PER_HOUR", "-1", "BLUEBERRY_PRICE_PER_HOUR"),
    ],
)
def test_a_bad_price_variable_is_refused_on_any_device(variable, value, said, monkeypatch, tmp_path, never_run):
    # On a CPU a run reads neither (no GPU to price): a typo must not wait for the first GPU run to show.
    monkeypatch.setenv(variable, value)
    result = run_cli(f"--tracking.runs_root={tmp_path / 'runs'}")
    assert result.exit_code == 2 and said in result.output and not (tmp_path / "runs").exists(), result.output


@pytest.mark.parametrize(("variable", "value"), [("WORLD_SIZE", "abc"), ("RANK", ""), ("LOCAL_RANK", "1.0")])
def test_a_torchrun_variable_that_is_no_number_is_refused(variable, value, monkeypatch, tmp_path, never_run):
    monkeypatch.setenv(variable, value)
    result = run_cli(f"--tracking.runs_root={tmp_path / 'runs'}")
    said = f"error: {variable}={value!r} is not an integer (torchrun sets it; else unset it)"
    assert result.exit_code == 2 and said in result.output and not (tmp_path / "runs").exists(), result.output
    doctor = CliRunner().invoke(main, ["doctor"])
    assert doctor.exit_code == 2 and said in doctor.output, doctor.output


@pytest.mark.parametrize("rank", ["-1", "4"])
def test_a_rank_outside_its_world_is_refused(rank, monkeypatch, tmp_path, never_run):
    """RANK=-1 ("not distributed" to some launchers) with WORLD_SIZE=4 made a follower of a rank 0 no process was."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", rank)
    result = run_cli(f"--tracking.runs_root={tmp_path / 'runs'}")
    said = f"error: RANK={rank} with WORLD_SIZE=4: no rank of that world (0 to 3; torchrun sets both, else unset them)"
    assert result.exit_code == 2 and said in result.output and not (tmp_path / "runs").exists(), result.output


def test_local_rank_minus_one_is_no_torchrun_job_and_no_error(monkeypatch, tmp_path, never_run):
    monkeypatch.setenv("LOCAL_RANK", "-1")  # what some launchers set for "not distributed"
    args = ["run", str(REPO / "experiments/quickstart.json"), f"--tracking.runs_root={tmp_path / 'runs'}"]
    result = CliRunner().invoke(main, args)
    assert str(result.exception) == "the run started", result.output  # past every check


def test_a_spec_error_is_said_whatever_torchrun_variables_hold(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    result = run_cli("--seed=-1")
    assert result.exit_code == 2 and "seed" in result.output, result.output


def test_a_directory_name_longer_than_the_file_system_allows_is_refused(monkeypatch, tmp_path, never_run):
    """Path.exists() raises ENAMETOOLONG rather than saying no (found by test_fuzz_spec: a traceback, exit 1)."""
    name = "x" * 300
    result = run_cli(f"--tracking.runs_root={tmp_path / 'runs'}", f"--tracking.wandb_dir={tmp_path / name}")
    said = f"error: tracking.wandb_dir '{str(tmp_path / name)[:80]}…': File name too long"
    assert result.exit_code == 2 and said in result.output and not (tmp_path / "runs").exists(), result.output


def test_a_wandb_dir_that_cannot_be_written_is_refused(monkeypatch, tmp_path, never_run):
    # W&B would fall back to a temp folder while the record names this one.
    result = run_cli(f"--tracking.runs_root={tmp_path / 'runs'}", "--tracking.wandb_dir=/proc/x")
    assert result.exit_code == 2 and "tracking.wandb_dir '/proc/x'" in result.output, result.output
    monkeypatch.setenv("WANDB_DIR", "/proc/y")
    result = run_cli(f"--tracking.runs_root={tmp_path / 'runs'}")
    assert result.exit_code == 2 and "WANDB_DIR '/proc/y'" in result.output, result.output


@pytest.mark.parametrize(
    "text, said",
    [
        (
            "wandb_version: 1\ntrain:\n  value:\n    lr: 0.005\n",
            "does not get them (train.lr is 0.005 there, 0.01 here)",
        ),
        ("- a\n- b\n", "W&B cannot read it as a sweep's parameters file"),
        (None, "W&B cannot read it as a sweep's parameters file (`name: {value: …}` entries): ConfigError"),
    ],
)
def test_sweep_parameters_wandb_would_record_but_the_run_does_not_get_are_refused(
    text, said, monkeypatch, tmp_path, never_run
):
    """`wandb agent` names a parameters file that wandb.init merges into the run's config and locks: a command
    line that does not pass them on would train with the spec's values under the sweep's in W&B."""
    params = tmp_path / "config-t1.yaml"
    if text is not None:
        params.write_text(text)
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    result = run_cli("--tracking.wandb=offline", f"--tracking.runs_root={tmp_path / 'runs'}")
    assert result.exit_code == 2 and f"WANDB_SWEEP_PARAM_PATH={params}: " in result.output, result.output
    assert said in result.output and not (tmp_path / "runs").exists()


def test_sweep_parameters_the_run_gets_pass(monkeypatch, tmp_path):
    from blueberry.overrides import load_spec
    from blueberry.tracking.preflight import check_sweep_parameters

    params = tmp_path / "config-t1.yaml"
    params.write_text("wandb_version: 1\ntrain:\n  value:\n    lr: 0.005\nmodel.n_experts:\n  value: 8\n")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    spec = REPO / "experiments/quickstart.json"
    check_sweep_parameters(load_spec(spec, ["--train.lr=5e-3", "--model.n_experts=8"]))  # given on its command line
    with pytest.raises(PreflightError, match="model.n_experts is 8 there, 4 here"):
        check_sweep_parameters(load_spec(spec, ["--train.lr=5e-3"]))


def test_a_trial_of_blueberry_sweep_is_not_checked_again(monkeypatch, tmp_path):
    """`blueberry sweep` checked every trial's parameters before the first started (sweep.validate): its trials
    skip the check, and the import of W&B's reader it costs (half a second before the run's own imports)."""
    from blueberry.overrides import load_spec
    from blueberry.tracking.preflight import check_sweep_parameters

    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(tmp_path / "not-read.yaml"))
    monkeypatch.setenv("BLUEBERRY_SWEEP_ID", "s-1234")
    check_sweep_parameters(load_spec(REPO / "experiments/quickstart.json"))  # the missing file is not read


def test_a_user_with_no_home_directory_is_told_what_to_set(tmp_path, monkeypatch):
    """HOME unset for a user with no passwd entry (some containers): wandb.init raised pathlib's "Could not
    determine home directory" (even with W&B disabled) and the data cache had no place; now the cache goes to
    the temp directory and W&B, which needs one unless WANDB_CONFIG_DIR says where, is refused in a line."""
    import pwd

    from blueberry.data.cache import cache_root
    from blueberry.spec import RunSpec

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("WANDB_CONFIG_DIR", raising=False)
    monkeypatch.delenv("BLUEBERRY_CACHE", raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert cache_root() == tmp_path / "tmp" / f"blueberry-cache-{os.getuid()}"
    (tmp_path / "tmp" / f"blueberry-cache-{os.getuid()}").chmod(0o777)  # as if another user had made it open
    assert cache_root().name.startswith("blueberry-cache-") and cache_root().name != f"blueberry-cache-{os.getuid()}"
    spec = RunSpec.model_validate({"tracking": {"runs_root": str(tmp_path), "wandb": "disabled"}})
    with pytest.raises(PreflightError, match="this user has none: set HOME or WANDB_CONFIG_DIR"):
        preflight(spec)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    preflight(spec)
