"""Reports rebuilt from recorded runs: tables, plots, timeline, dashboard, W&B Report (`blueberry report`)."""
