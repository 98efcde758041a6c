"""One offline W&B tracker for the tracking tests: the usual run, any argument overridden."""

from blueberry.tracking import WandbTracker, new_run_id


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
