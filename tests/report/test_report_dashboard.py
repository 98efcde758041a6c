"""The dashboard: one self-contained file that renders its runs in a real (headless) browser."""

import json
import re

from PIL import Image

from blueberry.report.dashboard import render
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
