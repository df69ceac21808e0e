"""Every figure the README and the pages in docs/ quote, from one set of runs made by this script,
so that no two pages can disagree: the tables between `<!-- figures:NAME -->` and
`<!-- /figures:NAME -->` markers, and the pictures in docs/.

    python docs/figures.py                      # make every run in runs/figures, then write it all
    python docs/figures.py --runs DIR           # the same in DIR; finished runs there are reused
    python docs/figures.py --runs DIR --print   # format what DIR holds, write nothing

The runs go one after another (so each one's time is its own), each in an empty directory, so
every stage trains: the quickstart (timed, then analysed by `rlhf_recipes.interpret`), two more
seeds of it, two entropy coefficients on its stages, the DPO, GRPO, RLOO and seq2seq quickstarts,
and the reward-KL frontier of the four methods. About 25 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import figure_blocks as blocks

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!-- figures:([\w-]+) -->\n.*?<!-- /figures:\1 -->\n", re.S)

# name: (arguments of `python -m rlhf_recipes.run`, the run whose stages it reuses or None)
RUNS = {
    "quickstart": (["quickstart"], None),
    "seed1": (["quickstart", "run.seed=1"], None),
    "seed2": (["quickstart", "run.seed=2"], None),
    "entropy_0": (["quickstart", "ppo.entropy_coef=0"], "quickstart"),
    "entropy_0.05": (["quickstart", "ppo.entropy_coef=0.05"], "quickstart"),
    "dpo": (["quickstart_dpo"], None),
    "grpo": (["quickstart_grpo"], None),
    "rloo": (["quickstart_rloo"], None),
    "seq2seq": (["quickstart_seq2seq"], None),
}
FRONTIER = ["--sweep", "quickstart", "ppo.target=2,6,12", "--sweep", "quickstart_dpo", "dpo.beta=0.5,0.1,0.03",
            "--sweep", "quickstart_grpo", "grpo.beta=0.2,0.04,0.01",
            "--sweep", "quickstart_rloo", "rloo.beta=0.2,0.05,0.01", "--best-of", "1,2,4,8,16,32"]
# the pictures pages show: (made in the run directory, kept in docs/)
PICTURES = [("quickstart/training.png", "quickstart_training.png"), ("frontier/frontier.png", "frontier.png"),
            *((f"quickstart/interpret/{n}.png", f"interpret_{n}.png") for n in ("tokens", "logit_lens", "dla", "heads"))]


def timed(argv: list[str], log: Path) -> dict:
    """Run `argv` to the end with its output in `log`: its wall time and its own peak memory."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"figures: {' '.join(argv[2:])} failed; see {log}")
    return {"wall": time.perf_counter() - t0, "peak_gb": usage.ru_maxrss / 2 ** 20}  # kB on Linux


def make_runs(runs: Path, frontier: bool) -> None:
    """Every run this script formats that `runs` does not hold finished yet."""
    env_python = [sys.executable, "-m"]
    runs.mkdir(parents=True, exist_ok=True)
    for name, (args, stages_from) in RUNS.items():
        out = runs / name
        if (out / "eval.json").exists():
            continue
        shutil.rmtree(out, ignore_errors=True)
        if stages_from:  # the same stages, so only the PPO setting differs
            out.mkdir(parents=True)
            shutil.copytree(runs / stages_from / "stages", out / "stages")
        print(f"figures: {name} ...", flush=True)
        cost = timed([*env_python, "rlhf_recipes.run", *args, f"run.output_dir={out}", "run.overwrite=true"],
                     runs / f"{name}.log")
        (out / "cost.json").write_text(json.dumps(cost))
    if not (runs / "quickstart" / "interpret" / "interpret.json").exists():
        print("figures: interpret ...", flush=True)
        timed([*env_python, "rlhf_recipes.interpret", str(runs / "quickstart")], runs / "interpret.log")
    if frontier and not (runs / "frontier" / "frontier.json").exists():
        print("figures: frontier (12 points and best-of-N) ...", flush=True)
        timed([*env_python, "rlhf_recipes.frontier", str(runs / "frontier"), *FRONTIER], runs / "frontier.log")


def provenance(runs: Path) -> str:
    """The line every block ends with: when, where, with what, and how to make it again."""
    made = datetime.date.fromtimestamp((runs / "quickstart" / "eval.json").stat().st_mtime)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import rlhf_recipes
    import torch
    import transformers
    import trl
    return (f"*Made {made} by `python docs/figures.py` on {os.cpu_count()} cores of an {cpu}, no GPU; "
            f"rlhf_recipes {rlhf_recipes.__version__}, TRL {trl.__version__}, transformers "
            f"{transformers.__version__}, torch {torch.__version__}.*\n")


def load(runs: Path) -> dict:
    """What the blocks read, by run name: eval.json, recipe.json, metrics, stages and cost."""
    found = {}
    for name in [*RUNS, "frontier"]:
        out = runs / name
        if name == "frontier":
            if (out / "frontier.json").exists():
                found[name] = json.loads((out / "frontier.json").read_text())
            continue
        if not (out / "eval.json").exists():
            continue
        run = {"eval": json.loads((out / "eval.json").read_text()),
               "recipe": json.loads((out / "recipe.json").read_text()),
               "metrics": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
               "stages": {s.name: json.loads((s / "stage.json").read_text())
                          for s in sorted((out / "stages").glob("*")) if (s / "stage.json").exists()},
               "cost": json.loads((out / "cost.json").read_text()) if (out / "cost.json").exists() else None}
        run["step"] = statistics.median(m["time/step"] for m in run["metrics"])
        if (out / "interpret" / "interpret.json").exists():
            run["interpret"] = json.loads((out / "interpret" / "interpret.json").read_text())
        found[name] = run
    return found


def write(rendered: dict[str, str], runs: Path) -> None:
    """Each page's blocks replaced by their new text, and the pictures copied into docs/."""
    for page in PAGES:
        old = page.read_text()
        new = MARK.sub(lambda m: (f"<!-- figures:{m[1]} -->\n{rendered[m[1]]}<!-- /figures:{m[1]} -->\n"
                                  if m[1] in rendered else m[0]), old)
        if new != old:
            page.write_text(new)
            print(f"figures: wrote {page.relative_to(ROOT)}")
    for made, kept in PICTURES:
        if (runs / made).exists():
            shutil.copyfile(runs / made, ROOT / "docs" / kept)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "figures", help="where the runs are made or found")
    p.add_argument("--print", action="store_true", help="format what --runs holds and print it; run and write nothing")
    p.add_argument("--no-frontier", action="store_true", help="skip the frontier (its block is left as it is)")
    args = p.parse_args()
    if not args.print:
        make_runs(args.runs, frontier=not args.no_frontier)
    found = load(args.runs)
    if "quickstart" not in found:
        print(f"figures: {args.runs} holds no finished quickstart run", file=sys.stderr)
        return 2
    stamp = provenance(args.runs)
    rendered = {name: text + "\n" + stamp for name, render in blocks.RENDER.items()
                if (text := render(found)) is not None}
    missing = sorted({m for page in PAGES for m in MARK.findall(page.read_text())} - set(blocks.RENDER))
    if missing:
        print(f"figures: the pages name blocks this script does not make: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.print:
        for name, text in rendered.items():
            print(f"<!-- figures:{name} -->\n{text}")
        return 0
    write(rendered, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
