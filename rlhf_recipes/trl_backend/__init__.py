"""The one package that imports TRL (0.11.4, the last with the classic PPOTrainer).

Everything TRL-shaped stays here, so that moving to another PPO implementation touches only
this package: ppo (the value head, the trainer and its step), state (checkpoint and rollback
copies of what training changes), stages (SFT and the reward model) and dpo. The rest of
rlhf_recipes calls the names below, as trl_backend.NAME.
"""
from ..components import compat

compat.patch_trl_flags()  # before TRL's trainers import (transformers 5.x)
from .dpo import dpo_batch_loss, dpo_update, make_dpo_trainer, running_moments  # noqa: E402
from .ppo import make_trainer, ppo_step, step_is_finite, with_value_head  # noqa: E402
from .stages import train_reward_model, train_seq2seq_sft, train_sft  # noqa: E402
from .state import Rollback, load_trainer_state, trainer_state  # noqa: E402

__all__ = ["Rollback", "dpo_batch_loss", "dpo_update", "load_trainer_state", "make_dpo_trainer", "make_trainer",
           "ppo_step", "running_moments", "step_is_finite", "train_reward_model", "train_seq2seq_sft", "train_sft",
           "trainer_state", "with_value_head"]
