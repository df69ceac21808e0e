"""The command line: `python -m rlhf_recipes.run RECIPE [section.field=value ...] [--dry-run] [--resume]`.

A thin shell over `load_recipe`, `apply_overrides` and `train`. Input the user can fix
ends with one line on stderr and exit code 2, never a traceback. The same command runs on
several processes under `accelerate launch [--num_processes N] -m rlhf_recipes.run ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from .config.recipe import apply_overrides, load_recipe, shipped_recipes, valid_keys
from .config.sections import RecipeError
from .cli import OneLineParser
from .runtime.stopping import RunStopped


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m rlhf_recipes.run",
        description="Train a recipe with the method its recipe names (a ppo, dpo, grpo or rloo section). "
                    "RECIPE is a recipe file's path or a shipped recipe's name.",
        epilog=f"shipped recipes: {', '.join(shipped_recipes())}\n"
               "overrides: section.field=value, e.g. ppo.learning_rate=1e-5 policy.model=./tiny/gpt2\n"
               f"sections: {', '.join(sorted({k.split('.')[0] for k in valid_keys()}))}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="path to a recipe .py file, or a shipped recipe name")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="change any field of the recipe")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit, loading no model")
    p.add_argument("--stage", choices=["sft", "reward_model"],
                   help="run the recipe's stages up to this one (reusing cached outputs), then stop before PPO")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in run.output_dir from its newest checkpoint (same recipe and overrides)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)  # options anywhere, between overrides too
    try:
        recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
        if args.dry_run:
            try:
                print(json.dumps(recipe.to_dict(), indent=2), flush=True)
            except BrokenPipeError:  # `--dry-run | head` closed the pipe early: what it wanted was read
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 0
        from .runtime import distributed  # heavy imports only past the dry run

        distributed.init()  # before any model is loaded
        if args.stage:
            return _run_stages(recipe, args.stage)
        from .loops.training import train

        train(recipe, resume=args.resume)
        distributed.shutdown()
    except RecipeError as err:
        print(f"{_who()}error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stop:  # the processes stop together: the main one says so
        if not _who():
            print(f"error: {stop}; to continue: {resume_command(argv)}", file=sys.stderr)
        from .runtime import distributed

        distributed.barrier()  # before any process exits, which would end the others' launch
        distributed.shutdown()
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"error: interrupted; the newest checkpoint, if any, resumes with: {resume_command(argv)}",
              file=sys.stderr)
        return 130
    return 0


def _who() -> str:
    """'' on the main process; 'rank N: ' on the others, whose own errors would otherwise go unseen."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"rank {rank}: "


def _run_stages(recipe, until: str) -> int:
    from pathlib import Path

    from .runtime import distributed
    from .runtime.rundir import check_output_dir
    from .loops.stages import prepare

    if getattr(recipe, until) is None:
        raise RecipeError(f"--stage {until}: recipe {recipe.name!r} has no {until} stage")
    distributed.deepspeed_plugin(recipe)  # what cannot run is refused here too
    check_output_dir(Path(recipe.run.output_dir), overwrite=False, resume=True)  # a run's directory is fine
    distributed.check_shared(Path(recipe.run.output_dir))
    prepare(recipe, Path(recipe.run.output_dir), distributed.init().device, until=until)
    return 0


def resume_command(argv: list[str] | None) -> str:
    """The command line that continues this run (under accelerate launch with as many processes;
    on several machines, each machine's own launch command with --resume added)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv)
            if a != "--resume" and not a.startswith("run.overwrite=")]  # resuming never overwrites
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    command = shlex.join(["-m", "rlhf_recipes.run", *args, "--resume"])
    if processes > 1 and os.environ.get("LOCAL_WORLD_SIZE", str(processes)) != str(processes):  # several machines
        return f"on every machine, the accelerate launch command it was started with, ending {command}"
    launcher = ["python"] if processes == 1 else ["accelerate", "launch", "--num_processes", str(processes)]
    return shlex.join(launcher) + " " + command


if __name__ == "__main__":
    sys.exit(main())
