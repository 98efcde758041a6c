"""A stand-in for `blueberry run` in the tests of the sweep's queue (which trial runs, once, by which controller).

It reads the agent's `${args_json_file}` and writes the run record the controller reads, through the runner's own
record writer (runs/<experiment>/<WANDB_RUN_ID>/, held under the run directory's lock, state "running" until it
ends), in well under a second of start-up instead of a training run's torch + transformers + W&B import.
It "trains" for SECONDS, so a test can kill its controller while it runs; val/loss is 1 + lr.
The real `blueberry run` as a trial is tested in test_sweep_run.py and test_agent_contract.py.
"""

import json
import os
import sys
import time

from blueberry.tracking.record import RunRecord, claim_run_dir

SECONDS = 3.0


def main(args_json_file: str) -> None:
    params = json.loads(open(args_json_file, encoding="utf-8").read())
    run_id = os.environ["WANDB_RUN_ID"]
    claimed = claim_run_dir(os.environ["BLUEBERRY_RUNS_ROOT"], params["experiment"], run_id)
    record = RunRecord(claimed.path, {"run_id": run_id, "params": params})
    time.sleep(SECONDS)
    val_loss = 1.0 + params["train"]["lr"]
    record.log({"val/loss": val_loss}, 3)
    record.summary({"val/loss": val_loss})
    record.finish("finished")
    claimed.release()


if __name__ == "__main__":
    main(sys.argv[sys.argv.index("--overrides") + 1])
