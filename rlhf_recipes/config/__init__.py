"""The recipe: its typed, frozen, self-validating sections (sections.py, and stages.py for SFT,
the reward model and DPO; methods.py for GRPO and RLOO), the machinery they share (section.py), and finding recipe files
and changing them from the command line (recipe.py). Importing this package gives what the
module rlhf_recipes.config gave up to 0.1.0."""
from .section import RecipeError, Section, conforms, template_fields, type_name
from .sections import METHODS, PATH_FIELDS, PPO, SECTIONS, STAGES, Eval, Generation, Policy, Prompts, Recipe, Reward, Run
from .methods import GRPO, RLOO
from .stages import DPO, SFT, RewardModel

__all__ = ["DPO", "GRPO", "RLOO", "METHODS", "PATH_FIELDS", "PPO", "SECTIONS", "SFT", "STAGES", "Eval", "Generation", "Policy",
           "Prompts", "Recipe", "RecipeError", "Reward", "RewardModel", "Run", "Section", "conforms",
           "template_fields", "type_name"]
