"""What a run shows and writes: the display and metrics.jsonl (console.py), the evaluation's
maths (metrics.py), its report and plots (report.py), experiment trackers (trackers.py) and
the interpretability figures (interpret_plots.py)."""
