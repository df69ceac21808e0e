"""Classic PPO, owned by rlhf_recipes: a value head on the policy's shared LoRA backbone, the
adapters-off model as the reference, a per-token KL penalty under an adaptive or fixed
coefficient, GAE, and clipped policy and value losses over epochs of minibatches.

TRL deleted this trainer in 1.13 (huggingface/trl #7020); the maths and the statistics' names
are TRL 0.11.4's, proven equal to its step by tests/test_parity.py. The package imports no TRL.
Modules: maths (pure functions), value_head, scoring (the forward passes), probes (what the
faster passes assume, checked at start-up), trainer (make_trainer, the step).
"""
from ..runtime.trainer_state import Rollback, load_trainer_state, trainer_state
from .trainer import PPOTrainer, build_trainer, make_trainer, ppo_step, step_is_finite
from .value_head import ValueHeadModel, with_value_head

__all__ = ["PPOTrainer", "Rollback", "ValueHeadModel", "build_trainer", "load_trainer_state", "make_trainer", "ppo_step",
           "step_is_finite", "trainer_state", "with_value_head"]
