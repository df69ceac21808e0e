"""The command line: `python -m rlhf_recipes.run RECIPE [section.field=value ...] [--dry-run]`.

A thin shell over `load_recipe`, `apply_overrides` and `train`. Input the user can fix
ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import RecipeError
from .recipe import apply_overrides, load_recipe, shipped_recipes, valid_keys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m rlhf_recipes.run",
        description="Train a recipe with PPO. RECIPE is a recipe file's path or a shipped recipe's name.",
        epilog=f"shipped recipes: {', '.join(shipped_recipes())}\n"
               "overrides: section.field=value, e.g. ppo.learning_rate=1e-5 policy.model=./tiny/gpt2\n"
               f"sections: {', '.join(sorted({k.split('.')[0] for k in valid_keys()}))}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="path to a recipe .py file, or a shipped recipe name")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="change any field of the recipe")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit, loading no model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
        if args.dry_run:
            print(json.dumps(recipe.to_dict(), indent=2))
            return 0
        from .train import train  # heavy imports only when training

        train(recipe)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
