"""Side by side: what the reference and the trained policy write for the same prompts, with the
same seed, each with its reward (and the policy's KL), using the run's recipe and reward.

    python -m rlhf_recipes.sample RUN_DIR "a prompt" ["another" ...] [--file PROMPTS.txt] [--heldout N] [--json]
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

from .components.data import encode_prompt
from .components.reward import build_reward
from .config.sections import RecipeError
from .evaluation import evaluate, load_run
from .reporting.console import console
from .reporting.report import num
from .cli import OneLineParser
from .runtime.rundir import read_heldout


def side_by_side(run_dir: str | Path, prompts: list[str], heldout: int = 0, seed: int | None = None) -> list[dict]:
    """One record per prompt: prompt, reference, policy, their rewards and the policy's KL."""
    run = load_run(run_dir)
    queries = [torch.tensor(encode_prompt(run.recipe.prompts, run.tokenizer, p), dtype=torch.long) for p in prompts]
    queries += read_heldout(run.out)[:heldout]
    if not queries or any(len(q) == 0 for q in queries) or any(not p.strip() for p in prompts):
        raise RecipeError("sample: give prompts (non-empty), --file with one prompt a line, or --heldout N")
    recipe = run.recipe
    recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, sample_rows=len(queries)),
                                 eval=dataclasses.replace(recipe.eval, seed=recipe.eval.seed if seed is None else seed))
    record = evaluate(run.policy, run.tokenizer, build_reward(recipe.reward, run.device, recipe.policy), queries, recipe,
                      run.device, step=0, label="sampling")
    return record["samples"][:len(queries)]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m rlhf_recipes.sample", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("prompts", nargs="*")
    parser.add_argument("--file", type=Path, help="a text file, one prompt a line")
    parser.add_argument("--heldout", type=int, default=0, help="also the first N held-out prompts of the run")
    parser.add_argument("--seed", type=int, help="sampling seed (default: the recipe's eval.seed)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    quiet, console.quiet = console.quiet, console.quiet or args.json  # stdout holds the JSON alone
    try:
        prompts = list(args.prompts)
        if args.file is not None:
            if not args.file.is_file():
                raise RecipeError(f"sample: --file {str(args.file)!r} does not exist")
            prompts += [line for line in args.file.read_text().splitlines() if line.strip()]
        rows = side_by_side(args.run_dir, prompts, args.heldout, args.seed)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        console.quiet = quiet
    if args.json:
        print("".join(json.dumps(r) + "\n" for r in rows), end="")
        return 0
    table = Table(title=f"reference and policy, same seed ({args.run_dir})", show_lines=True)
    for column in ("prompt", "reference", "reward", "policy", "reward", "KL"):
        table.add_column(column, overflow="fold", justify="right" if column in ("reward", "KL") else "left")
    for r in rows:
        table.add_row(escape(r["prompt"]), escape(r["reference"]), num(r["reference_reward"]), escape(r["policy"]),
                      num(r["policy_reward"]), num(r["kl"]))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
