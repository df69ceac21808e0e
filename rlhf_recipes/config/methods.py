"""The critic-free methods' sections: GRPO and RLOO, run by TRL 1.x's trainers on the recipe's policy.

Both sample `num_generations` responses to each prompt and take a baseline from the group
instead of a value function: GRPO the group's mean (and standard deviation, with
scale_rewards), RLOO the mean of the other responses to the same prompt. Their KL terms
differ: GRPO adds beta times a per-token KL estimate to its loss, RLOO takes beta times the
sequence's log-ratio off its reward, as PPO does. The fields without a default must be set by
every recipe: TRL's defaults moved between versions (GRPO's beta is 0 since 0.19, which drops
the reference and the KL that the evaluation measures).
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal, Optional

from .section import Section, _positive

GRPO_LOSSES = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


@dataclass(frozen=True, kw_only=True)
class GroupSampled(Section):
    """What GRPO and RLOO share: a step samples num_generations responses to each of batch_size
    prompts (prompts as PPO's: prompts.*, responses up to generation.response_max_tokens, with
    generation.top_k and top_p), scores them with the recipe's reward, and makes num_iterations
    updates on them, each in gradient_accumulation_steps passes."""

    learning_rate: float
    batch_size: int
    """Prompts a step, each answered num_generations times: batch_size * num_generations samples
    (all processes' together under accelerate launch)."""
    num_generations: int
    """Responses to each prompt: the group whose other members give the baseline (at least 2)."""
    beta: float
    """KL coefficient against the reference (the adapters-off model). 0 drops the reference pass
    and every KL term, so nothing holds the policy near it."""
    epsilon: float
    """Clip range of the probability ratio: [1 - epsilon, 1 + epsilon_high]."""
    temperature: float
    """Sampling temperature of the training responses; the log-probs are taken at it too. The
    evaluation samples at generation.temperature."""
    epsilon_high: Optional[float] = None
    """Upper clip range (DAPO's clip-higher); none means epsilon."""
    num_iterations: int = 1
    """Updates on each step's samples (mu in the GRPO paper); more than 1 scores them once more
    first, for the ratio's denominator."""
    gradient_accumulation_steps: int = 1
    """Passes each update is split into, for memory: the samples of a step are divided among them."""
    max_grad_norm: Optional[float] = 1.0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = 0.0
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more time."""
    use_vllm: bool = False
    """Sample with vLLM in the training process (TRL's colocate mode): needs a CUDA GPU and the
    `vllm` extra."""

    def check(self) -> None:
        _positive(self, "learning_rate", "batch_size", "epsilon", "epsilon_high", "temperature", "num_iterations",
                  "gradient_accumulation_steps", "max_grad_norm")
        self.require(self.num_generations >= 2, "num_generations",
                     "must be >= 2: the baseline is taken from the other responses to the same prompt")
        self.require(0 <= self.beta < math.inf, "beta", "must be finite and >= 0")
        self.require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        samples = self.batch_size * self.num_generations
        self.require(samples % self.gradient_accumulation_steps == 0, "gradient_accumulation_steps",
                     f"must divide the {samples} samples a step ({self.section}.batch_size x num_generations)")


@dataclass(frozen=True, kw_only=True)
class GRPO(GroupSampled):
    """Group Relative Policy Optimization (Shao et al. 2024) with TRL 1.x's GRPOTrainer."""

    section: typing.ClassVar[str] = "grpo"
    loss_type: GRPO_LOSSES
    """How token losses are averaged (TRL's list): grpo (per sequence, then over sequences),
    dr_grpo (over a fixed length), dapo (over the step's tokens, TRL 1.x's default), bnpo, and
    TRL's other variants (cispo, sapo, luspo, vespo), with their own defaults."""
    scale_rewards: Literal["group", "batch", "none"]
    """Divide each advantage by the standard deviation of its group's rewards, the batch's, or
    not at all (Dr. GRPO: dividing favours prompts whose answers all score alike)."""
    mask_truncated_completions: bool = False
    """Leave responses that reach generation.response_max_tokens without an end token out of the loss."""


@dataclass(frozen=True, kw_only=True)
class RLOO(GroupSampled):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024) with TRL 1.x's RLOOTrainer."""

    section: typing.ClassVar[str] = "rloo"
    normalize_advantages: bool
    """Standardize the advantages over the batch (TRL's default is off)."""
    reward_clip_range: Optional[tuple[float, ...]] = None
    """(low, high): clip each reward into it before the KL penalty; none leaves rewards as they are."""

    def check(self) -> None:
        super().check()
        clip = self.reward_clip_range
        self.require(clip is None or (len(clip) == 2 and clip[0] < clip[1]), "reward_clip_range",
                     "must be two numbers, low then high, e.g. -5,5 (or none)")
