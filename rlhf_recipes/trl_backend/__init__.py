"""The one package that imports TRL: a thin adapter over its trainers for the stages before PPO
(SFT and the reward model: stages) and for DPO (dpo). Classic PPO is rlhf_recipes' own
(rlhf_recipes.ppo), since TRL deleted it. The rest of rlhf_recipes calls the names below, as
trl_backend.NAME.
"""
from ..runtime.trainer_state import load_trainer_state, trainer_state
from .dpo import dpo_batch_loss, dpo_update, make_dpo_trainer
from .stages import train_reward_model, train_seq2seq_sft, train_sft

__all__ = ["dpo_batch_loss", "dpo_update", "load_trainer_state", "make_dpo_trainer",
           "train_reward_model", "train_seq2seq_sft", "train_sft", "trainer_state"]
