"""The one package that imports TRL: a thin adapter over its trainers for the stages before PPO
(SFT and the reward model: stages), for DPO (dpo) and for GRPO and RLOO (critic_free), these three
driven step by step by our own loops (driven: what such a loop needs of a trainer). Classic PPO
is rlhf_recipes' own (rlhf_recipes.ppo), since TRL deleted it. The rest of rlhf_recipes calls the
names below, as trl_backend.NAME.
"""
from ..runtime.trainer_state import load_trainer_state, trainer_state
from .critic_free import RecipeReward, check_vllm, sample_and_score
from .critic_free import make_trainer as make_critic_free_trainer
from .critic_free import metrics as critic_free_metrics
from .critic_free import update as critic_free_update
from .dpo import dpo_batch_loss, dpo_update, make_dpo_trainer
from .driven import partitioned, trainable_whole
from .stages import train_reward_model, train_seq2seq_sft, train_sft

__all__ = ["RecipeReward", "check_vllm", "partitioned", "critic_free_metrics", "critic_free_update", "dpo_batch_loss", "dpo_update",
           "load_trainer_state", "make_critic_free_trainer", "make_dpo_trainer", "sample_and_score",
           "train_reward_model", "train_seq2seq_sft", "train_sft", "trainable_whole", "trainer_state"]
