"""The `blueberry run` command the repo's sweep YAMLs use, pointed at the CPU base spec, for the sweep tests."""

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
