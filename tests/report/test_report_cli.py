"""`blueberry report` end to end on synthetic run records: files, exit codes, cache, README, publish offline."""

import json

from click.testing import CliRunner
from PIL import Image
from report_reference import REFERENCE_T2, write_reference_t1

from blueberry.cli import main
from blueberry.report.integrity import cost
from blueberry.report.records import load_local, read_local_run
from blueberry.report.studies import study_for
from blueberry.report.synthetic import write_run
from blueberry.report.timeline import END, START


def study(root):
    write_reference_t1(root)
    for lr, loss, acc in REFERENCE_T2:
        write_run(root, "exp3-lr-attention-moe-cpu", variant="attention_moe", lr=lr, val_loss=loss, val_accuracy=acc)
    write_run(root, "exp3-extended-cpu", variant="attention_moe", lr=3e-3, steps=400, eval_every=20, val_loss=0.0614)
    write_run(  # "running", and no process holds it: crashed
        root, "exp3-extended-cpu", variant="attention_moe", lr=3e-3, steps=400, eval_every=20, seed=7, state="running"
    )
    write_run(root, "notes-on-dropout", spec={"model": {"dropout": 0.0}}, val_loss=3.0)
    broken = write_run(root, "notes-on-dropout", seed=5)
    (broken / "spec.json").write_text("{")


def test_report_builds_every_section_from_runs(tmp_path):
    study(tmp_path / "runs")
    out = tmp_path / "reports"
    result = CliRunner().invoke(main, ["report", "--runs-root", str(tmp_path / "runs"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "13 runs" in result.output and "cache: 0 reused, 13 parsed" in result.output
    report = (out / "REPORT.md").read_text()
    for heading in (
        "## Experiment 1: ablation of the variants: `exp1-ablation`",
        "## Experiment 3: learning rate for DeepSeek attention + GLM4 MoE: `exp3-lr-attention-moe-cpu`",
        "### Phases: LR search and extended run (`exp3-extended-cpu`)",
        "## Experiment 3: extended run: `exp3-extended-cpu`",
        "## Experiment: `notes-on-dropout`",  # unknown experiment: generic table
        "## Timeline",
        "## Integrity",
    ):
        assert heading in report
    assert "| 1 | attention_moe | 0.0172 | 99.67% | 1.02 | 1.62 | 231.42 | 231.42 | DeepSeek Attn+MoE | 1 |" in report
    assert "**Warning:** the best LR is the largest one tried" in report
    assert "| crashed |" in report and "spec.json unreadable" in report  # listed, never dropped
    assert "best `attention_moe` vs baseline `baseline`" in report  # timeline: exp1 against its named baseline
    assert (out / "TIMELINE.md").read_text().startswith("# Timeline")
    assert "exp1-ablation-mlp-lr0.01-s42" in (out / "dashboard.html").read_text()
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert "exp1-ablation/val_loss_vs_time.png" in pngs and "exp3-lr-attention-moe-cpu/lr_sweep.png" in pngs
    assert "exp3-extended-cpu/training_curves.png" in pngs and "notes-on-dropout/final_val_loss.png" in pngs
    for png in pngs:
        assert Image.open(out / png).size[0] > 400
    assert not [p for p in out.iterdir() if p.name.startswith(".build-")]  # staging cleaned up


def test_a_rebuild_removes_what_the_last_build_wrote_and_this_one_did_not(tmp_path):
    import shutil

    runs, out = tmp_path / "runs", tmp_path / "reports"
    write_run(runs, "exp1-ablation", variant="mlp", val_loss=1.0)
    write_run(runs, "notes-on-dropout", spec={"model": {"dropout": 0.0}}, val_loss=3.0)
    (out / "gpu-check").mkdir(parents=True)
    (out / "gpu-check" / "results.md").write_text("another tool's file")  # not ours: left alone
    build = ["report", "--runs-root", str(runs), "--out", str(out)]
    assert CliRunner().invoke(main, build).exit_code == 0
    assert (out / "notes-on-dropout" / "final_val_loss.png").exists()
    shutil.rmtree(runs / "notes-on-dropout")
    assert CliRunner().invoke(main, build).exit_code == 0
    assert not (out / "notes-on-dropout").exists() and "notes-on-dropout" not in (out / "REPORT.md").read_text()
    assert (out / "exp1-ablation" / "val_loss_vs_time.png").exists() and (out / "gpu-check" / "results.md").exists()
    assert (out / "cache").is_dir()


def test_a_filter_matching_no_run_exits_2_and_leaves_the_last_report(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "reports"
    write_run(runs, "exp1-ablation", variant="mlp", val_loss=1.0)
    assert CliRunner().invoke(main, ["report", "--runs-root", str(runs), "--out", str(out)]).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "cache" not in p.parts}
    result = CliRunner().invoke(main, ["report", "--runs-root", str(runs), "--out", str(out), "--group", "nosuch"])
    assert result.exit_code == 2 and "no runs match --group nosuch" in result.output, result.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "cache" not in p.parts} == before
    assert f"local run records under {runs}; a local run's record is" in (out / "REPORT.md").read_text()


def test_a_runs_root_holding_no_runs_leaves_the_last_report(tmp_path):
    # `--runs-root runs/exp1-ablation` (one folder too deep) finds no run: it must not wipe the last report.
    runs, out = tmp_path / "runs", tmp_path / "reports"
    write_run(runs, "exp1-ablation", variant="mlp", val_loss=1.0)
    assert CliRunner().invoke(main, ["report", "--runs-root", str(runs), "--out", str(out)]).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    too_deep = ["report", "--runs-root", str(runs / "exp1-ablation"), "--out", str(out)]
    result = CliRunner().invoke(main, too_deep)
    assert result.exit_code == 2 and "no runs in local run records under" in result.output, result.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # A first build of an empty root still writes its (empty) report.
    (tmp_path / "empty").mkdir()
    first = ["report", "--runs-root", str(tmp_path / "empty"), "--out", str(tmp_path / "new")]
    assert CliRunner().invoke(main, first).exit_code == 0
    assert "No runs found" in (tmp_path / "new" / "REPORT.md").read_text()


def test_an_experiment_named_like_the_reports_own_files_gets_a_plot_folder_of_its_own(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "reports"
    for name in ("REPORT.md", "cache"):
        write_run(runs, name, variant="mlp", val_loss=1.0)
    result = CliRunner().invoke(main, ["report", "--runs-root", str(runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "REPORT.md").is_file() and (out / "REPORT.md-plots" / "final_val_loss.png").is_file()
    assert (out / "cache-plots" / "final_val_loss.png").is_file()
    assert "](REPORT.md-plots/" in (out / "REPORT.md").read_text()


def test_bad_input_exits_2_before_writing(tmp_path):
    cli = CliRunner()
    out = tmp_path / "reports"
    missing = cli.invoke(main, ["report", "--runs-root", str(tmp_path / "nope"), "--out", str(out)])
    assert missing.exit_code == 2 and "runs root" in missing.output and "does not exist" in missing.output
    write_run(tmp_path / "runs", "e")
    prices = cli.invoke(
        main, ["report", "--runs-root", str(tmp_path / "runs"), "--out", str(out), "--gpu-prices", "{bad"]
    )
    assert prices.exit_code == 2 and "--gpu-prices: not valid JSON" in prices.output
    no_file = cli.invoke(
        main, ["report", "--runs-root", str(tmp_path / "runs"), "--out", str(out), "--gpu-prices", "prices.json"]
    )
    assert no_file.exit_code == 2 and "--gpu-prices: 'prices.json' is neither a JSON object" in no_file.output
    wandb = cli.invoke(main, ["report", "--source", "wandb", "--project", "p", "--out", str(out)])
    assert wandb.exit_code == 2 and "needs --entity" in wandb.output
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    marker = cli.invoke(
        main, ["report", "--runs-root", str(tmp_path / "runs"), "--out", str(out), "--readme", str(readme)]
    )
    assert marker.exit_code == 2 and "markers" in marker.output
    assert not out.exists() and "Traceback" not in marker.output  # not even the run cache under --out
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    on_a_file = cli.invoke(main, ["report", "--runs-root", str(tmp_path / "runs"), "--out", str(a_file)])
    assert on_a_file.exit_code == 2 and "Traceback" not in on_a_file.output
    assert on_a_file.output.strip() == f"error: --out '{a_file}' is a file, not a directory"


def test_readme_timeline_and_offline_publish(tmp_path):
    root = tmp_path / "runs"
    write_run(
        root, "t4-experts", spec={"model": {"n_experts": 8}}, val_loss=6.7417, created_at="2025-09-25T08:00:00+0000"
    )
    write_run(
        root, "t4-experts", spec={"model": {"n_experts": 16}}, val_loss=6.6185, created_at="2025-09-25T09:00:00+0000"
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\n## Timeline\n{START}\nold\n{END}\n")
    out = tmp_path / "reports"
    args = [
        "report",
        "--runs-root",
        str(root),
        "--out",
        str(out),
        "--readme",
        str(readme),
        "--publish",
        "--entity",
        "me",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "W&B Report definition built: 3 blocks, 6 panels (me/blueberry)" in result.output
    assert "cannot publish: WANDB_MODE=offline" in result.output and (out / "REPORT.md").exists()
    text = readme.read_text()
    assert "old" not in text and "### Sep 25 2025" in text
    assert "**1.8% validation loss improvement** (6.7417 → 6.6185)" in text  # the T4 README's MoE entry
    assert "**Key change**: model.n_experts: 8 → 16" in text


def test_cost_per_run_uses_the_gpu_table_and_is_na_on_cpu(tmp_path, monkeypatch):
    gpu = read_local_run(
        write_run(
            tmp_path, "e", seed=1, minutes=30, hardware={"device": "cuda:0", "gpu_name": "NVIDIA GeForce RTX 4090"}
        )
    )
    cpu = read_local_run(write_run(tmp_path, "e", seed=2))
    unnamed = read_local_run(write_run(tmp_path, "e", seed=3, hardware={"device": "cuda"}))
    assert cost(gpu, {"RTX 4090": 0.18}) == "$0.0900"  # 0.5 h × $0.18/h, the study's quoted price
    assert cost(cpu, {"RTX 4090": 0.18}) == "n/a (CPU)"
    assert cost(unnamed, {"RTX 4090": 0.18}) == "n/a (GPU model not recorded)"
    assert cost(gpu, {"T4": 0.35}) == "n/a (no price for NVIDIA GeForce RTX 4090)"
    # As a run prices itself: its device-hours (8 ranks), a MIG slice its share of the board; a recorded cost stays
    # where the table has no price for the GPU, and for a CPU run given a price.
    mig = read_local_run(
        write_run(
            tmp_path, "e", seed=4, minutes=60,
            hardware={"device": "cuda:0", "gpu_name": "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "world_size": 1},
        )
    )  # fmt: skip
    assert cost(mig, {"A100": 1.4}) == "$0.2000"  # 1 of 7 compute slices
    ranks = read_local_run(
        write_run(tmp_path, "e", seed=5, minutes=30, hardware={"device": "cuda:0", "gpu_name": "NVIDIA H100 80GB HBM3",
                                                              "world_size": 8})
    )  # fmt: skip
    assert cost(ranks, {"H100": 2.0}) == "$8.0000"
    priced_cpu = read_local_run(write_run(tmp_path, "e", seed=6))
    priced_cpu.summary["cost/usd"] = 0.01
    assert cost(priced_cpu, {"RTX 4090": 0.18}, overridden=True) == "$0.0100 (recorded)"
    gpu.summary["cost/usd"] = 0.5
    assert cost(gpu, {"T4": 0.35}, overridden=True) == "$0.5000 (recorded)"
    assert cost(gpu, {"RTX 4090": 0.0}, overridden=True) == "$0.0000"  # a free GPU is a price too
    monkeypatch.setenv("BLUEBERRY_GPU_PRICES", json.dumps({"4090": 1.0}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["report", "--runs-root", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "REPORT.md").read_text()
    assert "| $0.5000 |" in report and "BLUEBERRY_GPU_PRICES" in report
    # the summed cost at the top is the Integrity table's, so the two never disagree
    assert "min of training (summed over runs), $0.50 over 1 runs with a price" in report


def test_lr_experiment_with_two_models_gets_one_lr_table_each(tmp_path, monkeypatch):
    from blueberry.report import build, plots

    for name in ("lr_sweep", "val_loss_curves", "curves_2x2"):  # markdown only: plots are tested above
        monkeypatch.setattr(plots, name, lambda *args, **kwargs: None)
    for variant in ("attention_mlp", "attention_moe"):
        for lr, loss in ((1e-3, 4.0), (3e-3, 3.9), (1e-2, 4.1)):
            write_run(tmp_path, "t4-lr", variant=variant, lr=lr, val_loss=loss)
    runs = load_local(tmp_path)
    text = build.experiment_section("t4-lr", study_for("t4-lr"), runs, {}, tmp_path / "stage", jobs=[])
    assert "### model.variant=attention_mlp" in text and "### model.variant=attention_moe" in text
    assert text.count("| Learning Rate |") == 2 and text.count("Best LR: **3e-3 (0.003)**") == 2
    assert "Warning" not in text  # 3e-3 sits inside the grid
    for lr, steps in ((1e-3, 100), (3e-3, 100), (1e-2, 60)):  # one sweep's LRs with unequal steps: two tables
        write_run(tmp_path / "steps", "t4-lr", variant="mlp", lr=lr, steps=steps)
    runs = load_local(tmp_path / "steps")
    text = build.experiment_section("t4-lr", study_for("t4-lr"), runs, {}, tmp_path / "stage", jobs=[])
    headings = sorted(line for line in text.splitlines() if line.startswith("### "))
    assert headings == ["### train.steps=100", "### train.steps=60"]  # the LR differs within a table, not between


def test_two_builds_into_one_out_take_turns(tmp_path, monkeypatch):
    """Each build deletes what it did not use (cached PNGs, the last build's files): at once, one deleted what the
    other was about to copy (FileNotFoundError, 3 of 10 tries)."""
    import threading
    import time

    import blueberry.report.build as build

    write_run(tmp_path / "runs", "exp1-ablation", variant="mlp", val_loss=1.0)
    spans, real = [], build.build_report

    def slowly(*args, **kwargs):
        started = time.monotonic()
        time.sleep(0.3)  # the other build starts meanwhile
        built = real(*args, **kwargs)
        spans.append((started, time.monotonic()))
        return built

    monkeypatch.setattr(build, "build_report", slowly)
    kwargs = dict(runs_root=tmp_path / "runs", out=tmp_path / "reports", log=lambda message: None)
    builds = [threading.Thread(target=build.run_report, kwargs=kwargs) for _ in range(2)]
    for thread in builds:
        thread.start()
    for thread in builds:
        thread.join()
    first, second = sorted(spans)
    assert first[1] <= second[0] and (tmp_path / "reports" / "REPORT.md").is_file()


def test_a_file_system_without_locks_still_builds_the_report_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # NFS without a lock manager

    monkeypatch.setattr(fcntl, "flock", no_locks)
    write_run(tmp_path / "runs", "exp1-ablation", variant="mlp", val_loss=1.0)
    result = CliRunner().invoke(main, ["report", "--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "build.lock cannot be locked here" in result.output, result.output
    assert (tmp_path / "out" / "REPORT.md").is_file()
