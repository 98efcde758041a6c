"""The dashboard: one self-contained file that renders its runs in a real (headless) browser."""

import json
import math
import re

import numpy as np
from PIL import Image

from blueberry.report.dashboard import dashboard_data, render
from blueberry.report.records import History, Run, load_local
from blueberry.report.synthetic import write_run


def test_page_is_self_contained_and_data_survives_escaping():
    hostile = Run(id="r1", name="a</script><script>alert(1)</script>", experiment="e<!--", state="failed")
    page = render([hostile, Run(id="r2", name="ok", experiment="e", state="running", history=History())], "t")
    assert page.count("</script>") == 2  # the data block's and the code block's own, nothing injected
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "@import" not in page  # nothing fetched
    payload = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1)
    data = json.loads(payload)
    assert data["runs"][0]["name"] == hostile.name and data["runs"][0]["experiment"] == "e<!--"


def test_curves_keep_six_significant_digits_exact_steps_and_null_for_non_finite():
    rng = np.random.default_rng(0)
    n = 5_000
    loss = rng.lognormal(0, 4, n) * rng.choice([-1, 1], n)  # 1e-7 … 1e7, both signs
    loss[:5] = [0.0, 999_999.5, 0.1, 1_234_567.0, 2.5e-5]
    other = rng.uniform(0, 1, n)
    other[::1000] = [math.nan, math.inf, -math.inf, math.nan, math.inf]  # rows thinning keeps: the first is row 0
    steps = np.arange(1, n + 1) * 1_000_003.0  # 10 digits: the step column keeps 9
    values = np.column_stack([steps, rng.uniform(0, 1e4, n), loss, other])
    history = History(["step", "time", "train/loss", "train/lr"], values)
    run = Run(id="r", name="r", experiment="e", state="finished", history=history)
    part = dashboard_data([run], "t")["curves"][0]["t"]  # the train rows' curves
    rows = values[np.unique(np.append(np.linspace(0, n - 1, 200).astype(int), n - 1))]  # thinned as the page is

    def six(column):
        return [float(f"{v:.6g}") if math.isfinite(v) else None for v in column]

    assert part["m"]["train/loss"] == six(rows[:, 2]) and part["m"]["train/lr"] == six(rows[:, 3])
    assert part["m"]["train/lr"][0] is None  # NaN/inf → null, which json.dumps(allow_nan=False) accepts
    assert part["step"] == [float(f"{v:.9g}") for v in rows[:, 0]] and part["time"] == six(rows[:, 1])
    assert all(type(v) is float for v in part["time"])  # json-ready, not numpy scalars


def test_sizes_times_and_speeds_keep_the_digits_the_page_shows(tmp_path):
    # the page prints params and minutes with 2 decimals and tokens/s whole: a study-shape GPU run's
    # 231,423,680 params and 513,234 tokens/s must not reach it as 231.4 and 513230
    run_dir = write_run(tmp_path, "e", minutes=123.456, tokens_per_s=513_234.0, params=(231_423_680, 77_140_000))
    (row,) = dashboard_data([load_local(tmp_path)[0]], "t")["runs"]
    assert f"{row['params_m']:.2f}" == "231.42" and f"{row['active_m']:.2f}" == "77.14"
    assert f"{row['minutes']:.2f}" == "123.46" and f"{row['tokens_per_s']:.0f}" == "513234"
    assert run_dir.name == row["id"]


def test_dashboard_renders_runs_in_headless_chromium(tmp_path, browse):
    root = tmp_path / "runs"
    for seed in (1, 2):
        for variant, loss in (("baseline", 4.2), ("mlp", 4.0), ("attention_mlp", 3.8)):
            write_run(root, "exp1-ablation", variant=variant, seed=seed, val_loss=loss + seed / 100)
    write_run(root, "exp1-ablation", variant="moe", seed=1, state="failed", reason="diverged")
    runs = load_local(root)
    page = tmp_path / "dashboard.html"
    page.write_text(render(runs, "test runs"), encoding="utf-8")

    dom = browse(page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    rows = re.findall(r'<tr class="run state-(\w+)" data-run="([^"]+)"', dom.stdout)
    assert sorted(run_id for _, run_id in rows) == sorted(r.id for r in runs)  # every run, failed one included
    assert ("failed", next(r.id for r in runs if r.state == "failed")) in rows
    assert len(re.findall(r'<path[^>]*class="curve"', dom.stdout)) == 5  # best 5 runs overlaid by default
    assert "7 of 7 runs" in dom.stdout

    # The filter, typed as a user would: "—" finds only the runs with a missing value (the failed one), not
    # every row through the empty checkbox column.
    typed = tmp_path / "typed.html"
    typing = '<script>$("filter").value = "—"; $("filter").dispatchEvent(new Event("input"));</script>'
    typed.write_text(page.read_text(encoding="utf-8").replace("</body>", typing + "</body>"), encoding="utf-8")
    dom = browse(typed, "--dump-dom")
    assert "1 of 7 runs" in dom.stdout, re.findall(r'<span id="count">[^<]*', dom.stdout)

    shot = tmp_path / "shot.png"
    result = browse(page, f"--screenshot={shot}", "--window-size=1280,1100")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1100)
    pixels = list(image.getdata())
    ink = sum(1 for p in pixels if sum(p) < 600) / len(pixels)
    assert ink > 0.01 and len(set(pixels)) > 50  # text, table rules and coloured curves: not a blank page
    # The curve colours really are drawn (tab10 blue of the first curve).
    assert any(abs(r - 0x1F) < 30 and abs(g - 0x77) < 30 and abs(b - 0xB4) < 30 for r, g, b in pixels)
