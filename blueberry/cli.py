"""`blueberry` command line: a thin layer over spec loading and the runner.

Exit codes: 0 ok, 1 the run failed, 2 bad input (spec, override, data source), 130 interrupted.
"""

from __future__ import annotations

import json
import sys

import click

from blueberry.overrides import SpecError, load_spec
from blueberry.spec import RunSpec

PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": ["-h", "--help"]}


def _fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load(spec_path, overrides, override_files) -> RunSpec:
    try:
        return load_spec(spec_path, overrides, override_files)
    except SpecError as exc:
        _fail(exc.render())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blueberry")
def main():
    """Blueberry: correct, tracked experiments for small Mixture-of-Experts LMs."""


@main.command(context_settings=PASS_THROUGH)
@click.argument("spec_path", metavar="SPEC.json")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--overrides",
    "override_files",
    multiple=True,
    metavar="FILE",
    help="JSON file of overrides (W&B's ${args_json_file}); may repeat.",
)
def run(spec_path, overrides, override_files):
    """Train one run from SPEC.json, with overrides such as --train.lr=0.003 or --model="{'n_experts': 8}"."""
    spec = _load(spec_path, overrides, override_files)
    from blueberry.data import DataError
    from blueberry.runner import execute

    try:
        result = execute(spec, log=lambda msg: click.echo(msg, err=True))
    except DataError as exc:
        _fail(f"{spec_path}: data: {exc}")
    except ValueError as exc:  # device/precision not available here: still an input problem
        _fail(f"{spec_path}: {exc}")
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    s = result.summary
    click.echo(
        f"val/loss {s['val/loss']:.4f} (unigram baseline {s['unigram_loss']:.4f}), "
        f"val/accuracy {s['val/accuracy']:.4f}, {s['perf/tokens_per_s']:.0f} tokens/s"
    )
    click.echo(f"run record: {result.run_dir}")
    if result.wandb_dir:
        click.echo(f"W&B {result.wandb_mode} run: {result.wandb_dir}")
        if result.wandb_mode == "offline":
            click.echo(f"  upload later with: wandb sync {result.wandb_dir}")


@main.command(context_settings=PASS_THROUGH)
@click.argument("spec_path", metavar="SPEC.json")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--overrides", "override_files", multiple=True, metavar="FILE")
@click.option("--print", "print_spec", is_flag=True, help="Print the full validated spec.")
def validate(spec_path, overrides, override_files, print_spec):
    """Validate SPEC.json (and overrides) without running."""
    spec = _load(spec_path, overrides, override_files)
    if print_spec:
        click.echo(json.dumps(spec.to_json_dict(), indent=2))
    click.echo(f"ok: {spec_path} -> run '{spec.run_name}' ({spec.model.variant}), spec hash {spec.spec_hash()[:12]}")


@main.command()
def schema():
    """Print the run spec's JSON Schema."""
    click.echo(json.dumps(RunSpec.model_json_schema(), indent=2))
