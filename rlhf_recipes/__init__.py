"""rlhf_recipes: recipes that steer a language model on one GPU with PPO (our own), or DPO, GRPO and RLOO (TRL), over PEFT.

A recipe is a short Python file that builds one `Recipe`; `train(recipe)` runs it.
Importing this package is cheap: torch and TRL load only when training starts.

The top level holds what a user runs (`python -m rlhf_recipes.run`, .evaluation, .sample,
.export, .interpret, .frontier, .tiny, .corpus) and this API; the code sits in config/ (the
recipe), components/ (what a recipe builds), ppo/ (classic PPO: value head, maths, step), loops/
(PPO, DPO, GRPO and RLOO, the stages before them), runtime/ (the machinery of a run), reporting/ (what a run
shows and writes) and trl_backend/ (the one package that imports TRL).
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from . import quiet
from .config import DPO, GRPO, PPO, RLOO, SFT, Eval, Generation, Policy, Prompts, Recipe, RecipeError, Reward, RewardModel, Run
from .config.recipe import apply_overrides, load_recipe, shipped_recipes

quiet.install()

__all__ = ["DPO", "GRPO", "PPO", "RLOO", "SFT", "Eval", "Generation", "Policy", "Prompts", "Recipe", "RecipeError", "Reward", "RewardModel", "Run",
           "apply_overrides", "load_recipe", "shipped_recipes", "train"]
__version__ = "0.3.0"


# Where the modules of the flat layout (up to 0.1.0) went: their old names still import, with a
# DeprecationWarning, so that projects importing building blocks (rlhf_recipes.policy) keep working.
MOVED = {name: f"{package}.{name}" for package, names in {
    "components": ("compat", "data", "loading", "policy", "reward", "rollout", "seq2seq", "token_scores"),
    "loops": ("dpo", "session", "stages", "training"),
    "runtime": ("checkpoint", "distributed", "rundir", "startup", "stopping"),
    "reporting": ("console", "interpret_plots", "metrics", "report", "trackers"),
    "config": ("section", "recipe")}.items() for name in names}
MOVED["config_stages"] = "config.stages"


def _moved(name: str):
    warnings.warn(f"rlhf_recipes.{name} is now rlhf_recipes.{MOVED[name]}; the old name goes in a later release",
                  DeprecationWarning, stacklevel=3)
    return importlib.import_module(f"{__name__}.{MOVED[name]}")


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import rlhf_recipes.policy` gives the module at its new place (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        return importlib.util.spec_from_loader(fullname, self) if package == __name__ and name in MOVED else None

    def create_module(self, spec):
        module = _moved(spec.name.rpartition(".")[2])
        spec.loader_state = module.__spec__  # importlib sets __spec__ to the alias's: put the module's own back
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


if not any(type(finder).__qualname__ == "_MovedFinder" and type(finder).__module__ == __name__
           for finder in sys.meta_path):  # once, however often this package is reloaded
    sys.meta_path.append(_MovedFinder())


def __getattr__(name: str):
    # lazy: pulls in torch and transformers. The loop lives in `training`, not in a
    # submodule named `train`, whose import would rebind this package's `train` to the module
    if name == "train":
        from .loops.training import train

        globals()["train"] = train
        return train
    if name in MOVED:  # warned once: bound here after, as a submodule import would bind it
        globals()[name] = module = _moved(name)
        return module
    raise AttributeError(f"module 'rlhf_recipes' has no attribute {name!r}")
