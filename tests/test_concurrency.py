"""Several `blueberry run` processes writing into one runs root at once lose no record."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_resume import comparable
from test_runner import TINY

from blueberry.tracking import read_metrics

REPO = Path(__file__).resolve().parent.parent
BLUEBERRY = Path(sys.executable).parent / "blueberry"
STEPS = ["--train.steps=12", "--train.log_every=3", "--train.eval_every=6", "--train.checkpoint_every=4"]


def test_parallel_runs_into_one_runs_root(tmp_path):
    """Two seeds, and the same spec and seed twice: three processes, three complete records in distinct dirs."""
    root = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    processes = [
        subprocess.Popen(
            [str(BLUEBERRY), "run", "experiments/quickstart.json", *TINY, *STEPS, "--experiment=par"]
            + ["--train.threads=1", f"--seed={seed}", f"--tracking.runs_root={root}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2, 2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]

    run_dirs = sorted((root / "par").iterdir())
    assert len(run_dirs) == 3
    same_seed = [d for d in run_dirs if "-s2-" in d.name]
    assert [d.name for d in same_seed] == [same_seed[0].name, same_seed[0].name + "-2"]
    expected_steps = [3, 6, 6, 9, 12, 12]  # train rows every 3 steps, eval rows at 6 and 12
    for run_dir in run_dirs:
        assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
        header = json.loads((run_dir / "spec.json").read_text())
        assert header["run_id"] == run_dir.name and "resumes" not in header  # nobody took over a live run
        assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == expected_steps
        assert json.loads((run_dir / "summary.json").read_text())["trainer/step"] == 12
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] != []
    assert comparable(same_seed[0]) == comparable(same_seed[1])  # and they did not disturb each other
