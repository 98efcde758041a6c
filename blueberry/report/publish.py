"""`blueberry report --publish`: the same comparisons as a W&B Report (wandb-workspaces).

The definition is built offline (entity passed explicitly: its default asks the API); only `save()`
needs the server. Per experiment (= W&B group): line plots per metric grouped by variant (LR for LR
sweeps), a bar chart of final val loss, parallel coordinates over LR / variant → val loss.
"""

from __future__ import annotations

import os

from blueberry.report.records import ReportError, Run, need_wandb_credentials
from blueberry.report.studies import study_for

LINE_METRICS = ("train/loss", "val/loss", "val/accuracy", "val/perplexity")


def report_definition(runs: list[Run], entity: str, project: str, title: str = "Blueberry study"):
    try:
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces import expr
    except ImportError:
        raise ReportError(
            # not `pip install 'blueberry[publish]'`: `blueberry` on PyPI is another project, which `-U` would install
            "--publish needs wandb-workspaces: pip install 'wandb-workspaces>=0.4.13,<0.5' (or, in the checkout, "
            "`pip install '.[publish]'` or `make install`)",
            code=2,
        ) from None

    experiments = sorted({r.experiment for r in runs})
    finished = sum(r.ok for r in runs)
    blocks = [
        wr.P(
            text=f"Built by `blueberry report --publish` from {len(runs)} runs ({finished} finished) in "
            f"{len(experiments)} experiments. Lines: mean over seeds, band: sd."
        )
    ]
    for experiment in experiments:
        study = study_for(experiment)
        by = "train.lr" if study.kind == "lr" else "variant"  # the runner logs `variant` as a top-level config key
        # its runs' W&B groups: the experiment, unless tracking.group or WANDB_RUN_GROUP said otherwise
        groups = sorted({r.group or r.experiment for r in runs if r.experiment == experiment})
        runset = wr.Runset(
            entity=entity,
            project=project,
            name=experiment,
            # finished runs only, as the local tables aggregate (a crashed run's curve would skew the mean)
            filters=[expr.Metric("Group").isin(groups), expr.Metric("State") == "finished"],
            groupby=[f"config.{by}"],
        )
        panels = [
            wr.LinePlot(
                title=f"{metric} by {by}",
                x="trainer/step",
                y=[metric],
                groupby=wr.Config(by),
                groupby_aggfunc="mean",
                groupby_rangefunc="stddev",
            )
            for metric in LINE_METRICS
        ]
        panels.append(
            wr.BarPlot(
                title="final val loss",
                metrics=["final/val_loss"],  # a number: val/loss's summary is W&B's {"min", "last"}
                groupby=wr.Config(by),
                groupby_aggfunc="mean",
                groupby_rangefunc="stddev",
                orientation="v",
            )
        )
        panels.append(
            wr.ParallelCoordinatesPlot(
                title="LR / variant → val loss",
                columns=[
                    wr.ParallelCoordinatesPlotColumn(metric=wr.Config("train.lr"), display_name="lr", log=True),
                    wr.ParallelCoordinatesPlotColumn(metric=wr.Config("variant"), display_name="variant"),
                    wr.ParallelCoordinatesPlotColumn(
                        metric=wr.SummaryMetric("final/val_loss"), display_name="val loss"
                    ),
                ],
            )
        )
        blocks += [wr.H2(text=f"{study.title}: {experiment}"), wr.PanelGrid(runsets=[runset], panels=panels)]
    return wr.Report(
        entity=entity,
        project=project,
        title=title,
        description="Tables, plots and timeline rebuilt from recorded runs.",
        blocks=blocks,
    )


def publish(report) -> str:
    """Save the report to W&B and return its URL; a clear ReportError when offline or refused."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise ReportError(
            f"cannot publish: WANDB_MODE={mode} (the W&B Report needs the server; "
            "rerun with WANDB_MODE=online and an API key)",
            code=1,
        )
    need_wandb_credentials("--publish", code=1)
    try:
        report.save()
    except Exception as exc:  # no key, no network, no such project: surfaced by several libraries
        raise ReportError(f"could not save the W&B Report: {type(exc).__name__}: {exc}", code=1) from exc
    return report.url
