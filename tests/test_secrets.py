"""No secret is ever written: not in the run record, the checkpoints, W&B's files, config or logs."""

import tempfile

from test_runner import tiny_spec

from blueberry.runner import execute
from blueberry.tracking.wandb_log import read_wandb_log

FAKE_WANDB_KEY = "b1ueberry" + "0123456789abcdef0123456789abcde"  # 40 characters, like a real key
FAKE_HF_TOKEN = "hf_" + "SecretSecretSecretSecretSecret1234"


def test_no_secret_in_any_written_file(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    # W&B's temp dirs (media, artifacts) too: into tmp_path, for this process and for wandb-core.
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    spec = tiny_spec(
        tmp_path,
        "--train.steps=4",
        "--train.eval_every=2",
        "--train.checkpoint_every=2",
        "--tracking.wandb_checkpoints=true",  # artifact staging files as well
    )
    logged = []
    result = execute(spec, log=logged.append)
    assert result.wandb_mode == "offline"  # the hermetic WANDB_MODE=offline wins over the key

    # Everything under tmp_path: the runs root and every W&B directory (WANDB_DIR, cache, data, config, artifacts).
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 15 and any(p.suffix == ".pt" for p in written) and any(p.suffix == ".wandb" for p in written)
    out, err = capfd.readouterr()
    for secret in (FAKE_WANDB_KEY, FAKE_HF_TOKEN):
        leaks = [p for p in written if secret.encode() in p.read_bytes()]
        assert leaks == [], leaks
        assert secret not in out + err + "\n".join(logged)
    config = read_wandb_log(result.wandb_dir).config
    assert not any(secret in str(config) for secret in (FAKE_WANDB_KEY, FAKE_HF_TOKEN))
