"""Trial commands for the sweep tests: the `blueberry run` the repo's sweep YAMLs use, pointed at the CPU base
spec, and a stand-in for it that only writes a run record (tests of the sweep's queue)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN_WITH_ARGS_FILE = [
    "${env}",
    "blueberry",
    "run",
    str(REPO / "experiments/cpu_base.json"),
    "--overrides",
    "${args_json_file}",
]
STAND_IN_WITH_ARGS_FILE = [
    "${env}",
    sys.executable,
    str(Path(__file__).with_name("stand_in_trial.py")),
    "--overrides",
    "${args_json_file}",
]
