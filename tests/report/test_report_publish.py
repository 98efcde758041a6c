"""The W&B Report definition, built offline; only its shape is checked (wandb-workspaces internals are private)."""

import pytest
import wandb_workspaces.reports.v2 as wr

from blueberry.report.publish import publish, report_definition
from blueberry.report.records import ReportError, Run


def runs():
    spec = {"model": {"variant": "mlp"}, "train": {"lr": 0.003}}
    return [
        Run(id="a", name="a", experiment="exp1-ablation", state="finished", spec=spec),
        Run(id="b", name="b", experiment="exp2-lr-attention-mlp", state="failed", spec=spec),
    ]


def test_definition_has_the_comparisons_per_experiment():
    report = report_definition(runs(), "my-team", "blueberry")
    assert (report.entity, report.project) == ("my-team", "blueberry")
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 2
    for grid, (experiment, by) in zip(grids, [("exp1-ablation", "variant"), ("exp2-lr-attention-mlp", "train.lr")]):
        (runset,) = grid.runsets
        assert runset.entity == "my-team" and runset.name == experiment and runset.groupby == [f"config.{by}"]
        assert experiment in str(runset.filters) and "finished" in str(runset.filters)
        lines = [p for p in grid.panels if isinstance(p, wr.LinePlot)]
        assert [p.y for p in lines] == [["train/loss"], ["val/loss"], ["val/accuracy"], ["val/perplexity"]]
        assert all(p.x == "trainer/step" and p.groupby == wr.Config(by) for p in lines)
        (bar,) = [p for p in grid.panels if isinstance(p, wr.BarPlot)]
        assert bar.metrics == ["final/val_loss"] and bar.groupby_rangefunc == "stddev"  # a number, not min/last
        (pc,) = [p for p in grid.panels if isinstance(p, wr.ParallelCoordinatesPlot)]
        assert [c.metric for c in pc.columns] == [
            wr.Config("train.lr"),
            wr.Config("variant"),
            wr.SummaryMetric("final/val_loss"),
        ]


def test_a_runset_takes_the_wandb_groups_its_runs_were_given():
    """WANDB_RUN_GROUP or tracking.group: the experiment's runs sit in another W&B group, which its panels use."""
    grouped = [*runs(), Run(id="c", name="c", experiment="exp1-ablation", group="g1", state="finished")]
    grid = next(b for b in report_definition(grouped, "t", "p").blocks if isinstance(b, wr.PanelGrid))
    (runset,) = grid.runsets
    assert "'exp1-ablation', 'g1'" in str(runset.filters), runset.filters


def test_without_credentials_wandb_is_not_asked_for_a_key_on_the_terminal(tmp_path, monkeypatch):
    """wandb.Api() with no key prompts for one and waits: --source wandb and --publish say what is missing."""
    from click.testing import CliRunner

    from blueberry.cli import main

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no key there (conftest unsets WANDB_API_KEY)
    monkeypatch.setattr("wandb.Api", lambda *a, **k: pytest.fail("wandb.Api reached"))
    result = CliRunner().invoke(
        main, ["report", "--source", "wandb", "--entity", "e", "--project", "p", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "--source wandb needs W&B credentials: set WANDB_API_KEY" in result.output
    with pytest.raises(ReportError, match="--publish needs W&B credentials") as info:
        publish(report_definition(runs(), "my-team", "blueberry"))
    assert info.value.code == 1


def test_publish_offline_fails_clearly_without_touching_the_network():
    report = report_definition(runs(), "my-team", "blueberry")  # WANDB_MODE=offline in tests
    with pytest.raises(ReportError, match="cannot publish: WANDB_MODE=offline") as info:
        publish(report)
    assert info.value.code == 1


def test_without_wandb_workspaces_the_hint_installs_it_not_an_unrelated_pypi_project(monkeypatch):
    # `blueberry` on PyPI is another project: `pip install -U 'blueberry[publish]'` would replace this one with it.
    import sys

    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # an import of it fails, as where not installed
    with pytest.raises(ReportError, match=r"pip install 'wandb-workspaces>=0\.4\.13,<0\.5'") as error:
        report_definition([], "me", "blueberry")
    assert "blueberry[publish]" not in str(error.value) and error.value.code == 2
