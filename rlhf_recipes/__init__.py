"""rlhf_recipes: PPO recipes that steer a language model on one GPU, over TRL and PEFT.

A recipe is a short Python file that builds one `Recipe`; `train(recipe)` runs it.
Importing this package is cheap: torch and TRL load only when training starts.
"""
from . import quiet
from .config import DPO, PPO, SFT, Eval, Generation, Policy, Prompts, Recipe, RecipeError, Reward, RewardModel, Run
from .recipe import apply_overrides, load_recipe, shipped_recipes

quiet.install()

__all__ = ["DPO", "PPO", "SFT", "Eval", "Generation", "Policy", "Prompts", "Recipe", "RecipeError", "Reward", "RewardModel", "Run",
           "apply_overrides", "load_recipe", "shipped_recipes", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: pulls in torch, transformers and TRL. The loop lives in `training`, not in a
    # submodule named `train`, whose import would rebind this package's `train` to the module
    if name == "train":
        from .training import train

        globals()["train"] = train
        return train
    raise AttributeError(f"module 'rlhf_recipes' has no attribute {name!r}")
