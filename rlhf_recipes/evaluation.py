"""Re-evaluate a saved run: reward and KL against the frozen reference on its held-out prompts.

    python -m rlhf_recipes.evaluation RUN_DIR [section.field=value ...]

Before: a fresh adapter, i.e. the reference; after: the saved one. The evaluation itself
(evaluate, score_responses, ...) is rlhf_recipes.reporting.heldout, which every run uses.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from .cli import OneLineParser
from .components.policy import build_policy, load_tokenizer
from .components.reward import build_reward
from .config.recipe import apply_overrides
from .config.sections import SECTIONS, Recipe, RecipeError
from .loops import stages
# the evaluation itself, here too under its 0.2 names (imported as rlhf_recipes.evaluation.NAME)
from .reporting.heldout import KL_AT_START_TOLERANCE, SanityCheckError, evaluate, score_responses, scoring_inputs
from .reporting.report import summary_line, write_report
from .runtime import distributed
from .runtime.checkpoint import latest
from .runtime.rundir import EVAL, HELDOUT, MODEL, RECIPE, load_policy_weights, read_heldout, read_metrics

__all__ = ["KL_AT_START_TOLERANCE", "SanityCheckError", "SavedRun", "evaluate", "evaluate_run", "load_run", "main",
           "recipe_from_dict", "saved_recipe", "score_responses", "scoring_inputs"]

def recipe_from_dict(data: dict) -> Recipe:
    """Rebuild a Recipe from a run's recipe.json. Callables saved as 'module:name' are kept as
    strings; the prompt filter is dropped (a saved run keeps its held-out prompts)."""
    sections = {}
    for name, cls in SECTIONS.items():
        if data.get(name) is None:  # a stage the recipe does not have
            continue
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data[name].items()}
        if name == "prompts":
            fields["filter"] = None
        sections[name] = cls(**fields)
    return Recipe(name=data["name"], **sections)


@dataclasses.dataclass
class SavedRun:
    """A finished run, loaded back: the recipe PPO ran (stage outputs in place), its policy (the
    adapter loaded, or fresh when weights=False, i.e. the reference) and what scored it."""

    out: Path
    recipe: Recipe
    tokenizer: object
    policy: object
    device: torch.device


def saved_recipe(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, torch.device]:
    """The recipe a finished run's PPO ran, its stages' outputs in place, and this process's device."""
    out = Path(run_dir)
    for needed in (RECIPE, HELDOUT, f"{MODEL}/adapter_model.safetensors"):
        if not (out / needed).exists():
            raise RecipeError(f"{str(out)!r} is not a finished run: {needed} is missing; give a run's output_dir")
    recipe = apply_overrides(recipe_from_dict(json.loads((out / RECIPE).read_text())), overrides or [])
    device = distributed.init().device
    saved = latest(out)  # how many processes trained it (and its stages): a stage's fingerprint counts them
    processes = saved.state.get("processes", 1) if saved is not None else 1
    return stages.prepare(recipe, out, device, train=False, processes=processes), device  # the models it used


def load_run(run_dir: str | Path, overrides: list[str] | None = None, weights: bool = True) -> SavedRun:
    """Rebuild a saved run from its recipe.json, stages/ and model/."""
    out = Path(run_dir)
    recipe, device = saved_recipe(out, overrides)
    tokenizer = load_tokenizer("policy.model", str(out / MODEL))
    policy = build_policy(recipe.policy, device)
    if weights:
        load_policy_weights(policy, out / MODEL)
    return SavedRun(out, recipe, tokenizer, policy, device)


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """Re-evaluate a saved run from its recipe.json, heldout.jsonl and model/; rewrites eval.json and the report."""
    run = load_run(run_dir, overrides, weights=False)
    out, recipe, device = run.out, run.recipe, run.device
    queries = read_heldout(out)
    reward_fn = build_reward(recipe.reward, device, recipe.policy)
    before = evaluate(run.policy, run.tokenizer, reward_fn, queries, recipe, device, step=0, check_reference=True)
    load_policy_weights(run.policy, out / MODEL)
    metrics = read_metrics(out)
    after = evaluate(run.policy, run.tokenizer, reward_fn, queries, recipe, device,
                     step=metrics[-1]["step"] if metrics else 0)
    previous = json.loads((out / EVAL).read_text()) if (out / EVAL).exists() else {}
    result = {"recipe": recipe.name, "before": before, "during": previous.get("during", []), "after": after}
    write_report(out, result, metrics)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m rlhf_recipes.evaluation",
                                     description="Re-evaluate a saved run against its reference.")
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(args.run_dir, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
