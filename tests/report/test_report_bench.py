"""The report's build time at scale (what `make bench` measures), run small: it builds, and its phases do what
they say (the warm build reuses every run's cache, the one-new-run build parses one)."""

from blueberry.report import bench


def test_build_time_measures_a_cold_a_warm_and_a_one_new_run_build(monkeypatch):
    said, real = [], bench.run_report
    monkeypatch.setattr(bench, "run_report", lambda **kwargs: real(**{**kwargs, "log": said.append}))
    figures = bench.build_time(n_runs=8, n_steps=16)
    assert figures["n_runs"] == 8 and all(figures[f"{phase}_s"] > 0 for phase in ("cold", "warm", "one_new_run"))
    caches = [line.split("cache: ")[1] for line in said if "cache: " in line]
    assert caches == ["0 reused, 8 parsed", "8 reused, 0 parsed", "8 reused, 1 parsed"]
