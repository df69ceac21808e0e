"""What a run shows and writes: the display and metrics.jsonl (console.py), the evaluation's
maths (metrics.py), its report and plots (report.py), experiment trackers (trackers.py), and
rlhf_recipes.interpret's passes and figures (interpret_passes.py, interpret_plots.py)."""
