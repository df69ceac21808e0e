"""The README's quickstart figures, from a fresh run: so that what a run prints and what the README
says come from the same place.

    python docs/readme_figures.py            # run the quickstart in a fresh directory, print the block
    python docs/readme_figures.py --write    # and replace it in README.md (between its markers)
    python docs/readme_figures.py --run-dir runs/quickstart   # format an existing run (no time or memory)

Run it before each release of figures. The block sits between <!-- quickstart-figures --> and
<!-- /quickstart-figures --> in README.md.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "quickstart-figures"


def cell(stat: dict) -> str:
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.2f} ± {(hi - lo) / 2:.2f}"


def block(run: Path, wall: float | None, peak_gb: float | None) -> str:
    ev = json.loads((run / "eval.json").read_text())
    sft = json.loads((run / "stages" / "sft" / "stage.json").read_text())
    rm = json.loads((run / "stages" / "reward_model" / "stage.json").read_text())
    recipe = json.loads((run / "recipe.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    b, a = ev["before"], ev["after"]
    ref_std = a["reference"]["reward"]["std"]
    gain = (a["policy"]["reward"]["mean"] - b["policy"]["reward"]["mean"]) / ref_std
    target, kl = recipe["ppo"]["target"], a["policy"]["kl"]
    step = statistics.median(m["time/step"] for m in metrics)
    evals = 2 + len(ev["during"])
    how = (f"{int(wall // 60)} min {wall % 60:02.0f} s wall, {peak_gb:.2f} GB peak memory. " if wall else "")
    return f"""Measured here (2-core CPU, no GPU; `python docs/readme_figures.py`, which runs
`python -m rlhf_recipes.run quickstart` in an empty directory, so every stage trained): {how}SFT
took {sft['seconds']:.0f} s (held-out loss {sft['heldout_loss_before']:.2f} → {sft['heldout_loss_after']:.2f} nats a token),
the reward model {rm['seconds']:.0f} s (held-out pairs ranked right: {rm['heldout_accuracy_before']:.0%} →
{rm['heldout_accuracy_after']:.0%}), and PPO {len(metrics)} steps of {recipe['ppo']['batch_size']} at a median {step:.2f} s a step,
with {evals} evaluations. On {a['num_prompts']} held-out openings (never trained on):

| | before PPO (the SFT model) | after {len(metrics)} PPO steps |
|---|---|---|
| mean reward (the reward model's logit) | {cell(b['policy']['reward'])} | {cell(a['policy']['reward'])} |
| change, in reference standard deviations ({ref_std:.2f}) | | **{gain:+.1f}** |
| share judged positive by the word list | {b['policy']['judged']['mean']:.1%} | **{a['policy']['judged']['mean']:.1%}** |
| KL(policy ‖ reference), nats (target {target:g}) | 0 | **{cell(kl)}** ({kl['mean'] / target:.2f} × target) |
| mean token entropy, nats | {cell(b['policy']['entropy'])} | {cell(a['policy']['entropy'])} |
| win rate over the reference | 0.50 | {a['win_rate']['mean']:.2f} |
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, help="format this finished quickstart run instead of running one")
    p.add_argument("--write", action="store_true", help="replace the block in README.md")
    args = p.parse_args()
    wall = peak = None
    run = args.run_dir
    if run is None:
        run = Path(tempfile.mkdtemp(prefix="quickstart-")) / "run"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rlhf_recipes.run", "quickstart", f"run.output_dir={run}"], check=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # kB on Linux -> GB
    text = block(run, wall, peak)
    print(text)
    if args.write:
        readme = ROOT / "README.md"
        pattern = re.compile(rf"<!-- {MARK} -->\n.*?<!-- /{MARK} -->\n", re.S)
        old = readme.read_text()
        if not pattern.search(old):
            print(f"README.md has no <!-- {MARK} --> block", file=sys.stderr)
            return 2
        readme.write_text(pattern.sub(lambda _: f"<!-- {MARK} -->\n{text}<!-- /{MARK} -->\n", old))
        print(f"wrote the block into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
