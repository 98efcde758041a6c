"""W&B's precedence: the spec, then W&B's environment variables and settings files, then our defaults."""

import subprocess
import sys
from pathlib import Path

import pytest
from wandb.sdk.lib.settings_file import SettingsFiles

from blueberry.spec import RunSpec
from blueberry.tracking.wandb_settings import global_settings_path, resolve_mode, run_settings

KEY = "x" * 40


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory of its own (W&B reads `wandb/settings` there); no WANDB_MODE, an API key."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    return tmp_path


def wandb_cli_setting(key, value, *, globally=False):
    """What `wandb offline` / `wandb disabled` / `wandb init` write: W&B's own settings-file writer."""
    files = SettingsFiles(global_settings=global_settings_path(), local_settings=Path("wandb/settings"))
    files.set(key, value, globally=globally)
    files.save()


def wandb_command(*args):
    subprocess.run([str(Path(sys.executable).parent / "wandb"), *args], check=True, capture_output=True, timeout=120)


def test_auto_follows_wandb_offline_disabled_online_in_the_working_directory(workdir):
    assert resolve_mode("auto") == ("online", "default: API key found")
    wandb_command("offline")
    mode, why = resolve_mode("auto")
    assert mode == "offline" and why == f"set by settings file {workdir / 'wandb' / 'settings'}"
    wandb_command("disabled")
    assert resolve_mode("auto")[0] == "disabled"
    wandb_command("online")  # clears the setting: W&B's default, online (we have a key)
    assert resolve_mode("auto") == ("online", "default: API key found")


def test_global_settings_file_then_env_then_spec(workdir, monkeypatch):
    wandb_cli_setting("mode", "disabled", globally=True)
    assert resolve_mode("auto") == ("disabled", f"set by settings file {global_settings_path()}")
    wandb_cli_setting("mode", "offline")  # the working directory's file wins over the global one
    assert resolve_mode("auto")[0] == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # the environment wins over both; W&B's alias for offline
    assert resolve_mode("auto") == ("offline", "set by WANDB_MODE=dryrun")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_mode("auto") == ("online", "set by WANDB_MODE")
    assert resolve_mode("disabled") == ("disabled", "set by spec")  # an explicit spec value wins over all


def test_online_without_a_key_runs_offline_and_says_why(workdir, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY")
    assert resolve_mode("auto") == ("offline", "default: no API key")
    wandb_cli_setting("mode", "online")
    mode, why = resolve_mode("auto")
    assert mode == "offline" and "settings file" in why and "no API key" in why


def test_run_values_follow_precedence_and_say_where_they_came_from(workdir, monkeypatch):
    spec = RunSpec(experiment="exp1", tags=["mine"])
    chosen = run_settings(spec, tags=["moe"])
    assert (chosen["project"].value, chosen["project"].source) == ("blueberry", "default")
    assert (chosen["group"].value, chosen["job_type"].value, chosen["entity"].value) == ("exp1", "train", None)
    assert (chosen["tags"].value, chosen["tags"].source) == (["moe", "mine"], "spec")
    assert chosen["name"].value == spec.run_name
    assert (chosen["dir"].value, chosen["dir"].source) == (None, "default")  # None: the run's own directory

    wandb_cli_setting("project", "from-file")  # as `wandb init` writes it
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-group")
    monkeypatch.setenv("WANDB_JOB_TYPE", "eval")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    chosen = run_settings(RunSpec(experiment="exp1"), tags=["moe"])
    assert chosen["project"].value == "from-file" and chosen["project"].source.startswith("settings file ")
    assert (chosen["group"].value, chosen["group"].source) == ("env-group", "WANDB_RUN_GROUP")
    assert (chosen["job_type"].value, chosen["entity"].value) == ("eval", "team")

    monkeypatch.setenv("WANDB_PROJECT", "from-env")  # the environment beats the settings file
    monkeypatch.setenv("WANDB_TAGS", "a,b")
    chosen = run_settings(RunSpec(experiment="exp1"), tags=["moe"])
    assert (chosen["project"].value, chosen["project"].source) == ("from-env", "WANDB_PROJECT")
    assert (chosen["tags"].value, chosen["tags"].source) == (["moe", "a", "b"], "WANDB_TAGS")

    explicit = RunSpec.model_validate(
        {"experiment": "exp1", "tracking": {"project": "p", "group": "g", "job_type": "train", "wandb": "offline"}}
    )
    chosen = run_settings(explicit, tags=[])
    spec_dir = RunSpec.model_validate({"tracking": {"wandb_dir": "w"}})
    assert (run_settings(spec_dir, tags=[])["dir"].value, run_settings(spec_dir, tags=[])["dir"].source) == (
        "w",
        "spec",
    )
    assert {k: chosen[k].value for k in ("project", "group", "job_type", "mode")} == {
        "project": "p",
        "group": "g",
        "job_type": "train",
        "mode": "offline",
    }
    assert {chosen[k].source for k in ("project", "group", "job_type")} == {"spec"}
    assert chosen["mode"].source == "set by spec"

    monkeypatch.setenv("WANDB_DIR", str(workdir / "elsewhere"))
    chosen = run_settings(RunSpec(experiment="exp1"), tags=[])
    assert (chosen["dir"].value, chosen["dir"].source) == (str(workdir / "elsewhere"), "WANDB_DIR")
    chosen = run_settings(RunSpec.model_validate({"tracking": {"wandb_dir": "w"}}), tags=[])
    assert (chosen["dir"].value, chosen["dir"].source) == ("w", "spec")


def wandb_reads(*settings):
    """What W&B's own loader (the one `wandb.init` uses) makes of the settings files and the environment."""
    import wandb
    from wandb.sdk import wandb_setup

    wandb.teardown()  # a fresh singleton loads the settings again
    loaded = wandb_setup.singleton().settings
    return tuple(getattr(loaded, setting) for setting in settings)


def test_with_wandb_dir_set_the_working_directorys_settings_file_still_holds(workdir, monkeypatch):
    """W&B reads `wandb/settings` in the working directory before it applies WANDB_DIR (wandb_setup's
    `_load_settings`): WANDB_DIR moves its run files, not that file, and a settings file under it is never read."""
    monkeypatch.setenv("WANDB_DIR", str(workdir / "elsewhere"))
    for key, value in (("mode", "offline"), ("project", "fromfile"), ("entity", "fileteam")):
        wandb_cli_setting(key, value)  # as `wandb offline` / `wandb init` write it, run with no WANDB_DIR
    in_cwd = f"settings file {workdir / 'wandb' / 'settings'}"
    chosen = run_settings(RunSpec(experiment="exp1"), tags=[])
    assert (chosen["mode"].value, chosen["mode"].source) == ("offline", f"set by {in_cwd}")
    assert (chosen["project"].value, chosen["project"].source) == ("fromfile", in_cwd)
    assert (chosen["entity"].value, chosen["entity"].source) == ("fileteam", in_cwd)
    assert wandb_reads("mode", "project", "entity") == ("offline", "fromfile", "fileteam")

    (workdir / "elsewhere").mkdir()
    (workdir / "wandb").rename(workdir / "elsewhere" / "wandb")  # the file only under $WANDB_DIR: not read
    chosen = run_settings(RunSpec(experiment="exp1"), tags=[])
    assert (chosen["mode"].value, chosen["mode"].source) == ("online", "default: API key found")
    assert (chosen["project"].value, chosen["project"].source) == ("blueberry", "default")
    assert (chosen["entity"].value, chosen["entity"].source) == (None, "default")
    assert wandb_reads("mode", "project", "entity") == ("online", None, None)


def test_an_invalid_wandb_environment_variable_is_named(workdir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(ValueError, match="W&B environment variable WANDB_MODE='ofline': Input should be"):
        resolve_mode("auto")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "me/proj")  # W&B's own validator: a UsageError, not a ValidationError
    with pytest.raises(ValueError, match="W&B environment variable WANDB_PROJECT: Invalid project name 'me/proj'"):
        resolve_mode("auto")


def test_a_key_saved_by_wandb_login_is_found_for_the_server_wandb_uses(workdir, monkeypatch):
    from wandb.sdk.lib.wbauth.wbnetrc import write_netrc_auth
    from wandb.sdk.wandb_settings import Settings

    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(workdir / "netrc"))
    assert resolve_mode("auto") == ("offline", "default: no API key")
    write_netrc_auth(host=Settings().base_url, api_key=KEY)  # what `wandb login` does: W&B's default server
    assert resolve_mode("auto") == ("online", "default: API key found")
    assert resolve_mode("online") == ("online", "set by spec")
    # `wandb login --host` saves the key under that host and the host in W&B's global settings file.
    wandb_cli_setting("base_url", "https://wandb.example.org", globally=True)
    assert resolve_mode("auto") == ("offline", "default: no API key")
    write_netrc_auth(host="https://wandb.example.org", api_key=KEY)
    assert resolve_mode("auto") == ("online", "default: API key found")


def test_an_identity_token_file_is_credentials_as_wandb_takes_it(workdir, monkeypatch):
    """W&B's OIDC login (WANDB_IDENTITY_TOKEN_FILE, no API key): an online run stays online."""
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("NETRC", str(workdir / "netrc"))  # no key there either
    assert resolve_mode("online")[0] == "offline"
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(workdir / "token"))
    assert resolve_mode("online") == ("online", "set by spec")


def test_the_doctor_shows_the_tags_a_run_of_the_spec_gets(workdir):
    """A model no preset names is tagged attention-ffn, as the runner tags it (spec.model.label)."""
    from blueberry.tracking.wandb_settings import wandb_status

    spec = RunSpec.model_validate({"model": {"attention": "mla", "ffn": "topk_moe"}})
    assert wandb_status(spec)["run"]["tags"]["value"] == [spec.model.label] == ["mla-topk_moe"]


def test_under_wandb_agent_the_run_goes_where_wandb_puts_it_and_the_record_says_so(workdir, monkeypatch):
    """With WANDB_SWEEP_ID set (`wandb agent` sets it), wandb.init ignores the project and entity it is given:
    the record must name W&B's (the agent's WANDB_PROJECT), not the spec's, which the run never went to."""
    spec = RunSpec.model_validate({"tracking": {"wandb": "offline", "project": "specp", "entity": "spece"}})
    assert run_settings(spec, tags=[])["project"].value == "specp"
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp1")
    monkeypatch.setenv("WANDB_PROJECT", "sweepproj")
    chosen = run_settings(spec, tags=[])
    assert chosen["project"].value == "sweepproj" and chosen["project"].source.startswith("WANDB_PROJECT (WANDB_SWEEP")
    assert chosen["entity"].value is None  # W&B's default entity, as wandb.init then uses
    import wandb  # W&B's own rule, which the record follows

    run = wandb.init(mode="offline", project="specp", entity="spece", dir=str(workdir), config={})
    try:
        assert run.project == "sweepproj"
    finally:
        run.finish()


def test_a_bad_wandb_variable_is_named_as_the_user_set_it(workdir, monkeypatch):
    from blueberry.tracking.wandb_settings import load_wandb_settings

    cases = [("WANDB_RESUME", "bogus"), ("WANDB__DISABLE_STATS", "maybe"), ("WANDB_SILENT", "maybe")]
    cases.append(("WANDB_HTTP_TIMEOUT", "abc"))  # W&B's own special name: x_graphql_timeout_seconds
    for var, value in cases:
        with monkeypatch.context() as env:
            env.setenv(var, value)
            with pytest.raises(ValueError, match=f"^W&B environment variable {var}='{value}': "):
                load_wandb_settings()


def test_a_wandb_setting_refused_with_another_is_an_error_naming_w_and_bs_reason(workdir, monkeypatch):
    """W&B checks some settings together (its error names no single one): still a clear error, not a traceback."""
    from blueberry.tracking.wandb_settings import load_wandb_settings

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB__SKIP_TRANSACTION_LOG", "true")
    with pytest.raises(ValueError, match="^W&B environment: Cannot skip transaction log in offline mode"):
        load_wandb_settings()
