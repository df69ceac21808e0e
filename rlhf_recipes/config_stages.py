"""Recipe sections for the optional stages that run before PPO: SFT and a reward model."""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Optional

from .section import Section, _positive, template_fields


@dataclass(frozen=True)
class SFT(Section):
    """Supervised fine-tuning of policy.model before PPO, with TRL's SFTTrainer.

    Its output (LoRA merged into the base, or the fully trained model) becomes the PPO
    policy and, adapters off, the reference. It is cached in OUTPUT_DIR/stages/sft and
    reused while its inputs (this section, policy.model, the data, run.seed) are unchanged.
    """

    section: typing.ClassVar[str] = "sft"
    dataset: str
    """Texts to imitate: a Hub id or local csv/json/jsonl/parquet file(s)."""
    learning_rate: float
    epochs: float
    batch_size: int
    method: Literal["lora", "full"] = "lora"
    """lora trains policy.lora_* adapters and merges them; full trains every weight."""
    init: Literal["pretrained", "random"] = "pretrained"
    """random: start from policy.model's config and tokenizer with fresh weights (needs method='full')."""
    split: str = "train"
    text_column: str = "text"
    max_length: int = 128
    heldout: int = 200
    """Texts kept out of training to measure the loss before and after."""
    template: Optional[str] = None
    """A format string over dataset columns that makes each text (causal) or source (encoder-
    decoder), e.g. the prompt template of the PPO stage; none means text_column."""
    target_column: Optional[str] = None
    """Encoder-decoder policies: the column the model learns to write from the source (e.g. summary)."""

    def check(self) -> None:
        template_fields(self, "template")
        self.require(self.target_column is None or bool(self.target_column.strip()), "target_column",
                     "must name a column")
        self.require(bool(self.dataset.strip()), "dataset", "must name a Hub dataset or local file(s)")
        _positive(self, "learning_rate", "epochs", "batch_size", "max_length", "heldout")
        self.require(self.init == "pretrained" or self.method == "full", "init",
                     "random weights need sft.method='full' (LoRA trains only adapters on a frozen base)")


@dataclass(frozen=True)
class RewardModel(Section):
    """A reward model trained before PPO on preference pairs, with TRL's RewardTrainer.

    A sequence classifier with one output, trained so that the chosen text scores above the
    rejected one; its logit becomes the PPO reward (leave reward.model and reward.function
    unset). Cached in OUTPUT_DIR/stages/reward_model like the SFT stage.
    """

    section: typing.ClassVar[str] = "reward_model"
    dataset: str
    """Preference pairs: a Hub id or local file(s) with a chosen and a rejected text per row."""
    learning_rate: float
    epochs: float
    batch_size: int
    model: Optional[str] = None
    """The classifier's starting point; none means the policy (after SFT, if there is one)."""
    init: Literal["pretrained", "random"] = "pretrained"
    split: str = "train"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_length: int = 128
    center_rewards: Optional[float] = 0.01
    """Weight of a penalty on the squared reward, which keeps rewards near 0 for PPO; none turns it off."""
    heldout: int = 200
    """Pairs kept out of training to measure the accuracy (chosen scored above rejected)."""

    def check(self) -> None:
        self.require(bool(self.dataset.strip()), "dataset", "must name a Hub dataset or local file(s)")
        _positive(self, "learning_rate", "epochs", "batch_size", "max_length", "heldout")
