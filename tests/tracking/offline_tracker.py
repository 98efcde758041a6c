"""For the tracking tests: a fresh run directory, and one offline W&B tracker (the usual run, any argument
overridden)."""

from blueberry.tracking import WandbTracker, new_run_id
from blueberry.tracking.record import claim_run_dir


def fresh_run_dir(runs_root, experiment, run_id):
    """A new run directory, not locked (a taken id gets a numeric suffix)."""
    claimed = claim_run_dir(runs_root, experiment, run_id)
    claimed.release()
    return claimed.path


def offline_tracker(run_dir, **overrides) -> WandbTracker:
    kwargs = dict(
        mode="offline",
        project="blueberry",
        entity=None,
        group="exp",
        job_type="train",
        name="exp-moe-s1",
        run_id=new_run_id("exp-moe-s1"),
        tags=["moe"],
        notes=None,
        config={"seed": 1},
    )
    return WandbTracker(run_dir, **{**kwargs, **overrides})
