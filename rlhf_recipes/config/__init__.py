"""The recipe: its typed, frozen, self-validating sections (sections.py, and stages.py for SFT,
the reward model and DPO), the machinery they share (section.py), and finding recipe files
and changing them from the command line (recipe.py)."""
from .section import RecipeError
from .sections import PPO, Eval, Generation, Policy, Prompts, Recipe, Reward, Run
from .stages import DPO, SFT, RewardModel

__all__ = ["DPO", "PPO", "SFT", "Eval", "Generation", "Policy", "Prompts", "Recipe", "RecipeError", "Reward",
           "RewardModel", "Run"]
