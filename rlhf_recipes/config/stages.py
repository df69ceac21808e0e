"""Recipe sections beside PPO's: the optional stages before it (SFT, a reward model), and DPO,
which a recipe gives instead of PPO."""
from __future__ import annotations

import math
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
    """lora trains policy.lora_* adapters on the base as the policy loads it (in policy.dtype, or
    8-bit or 4-bit: QLoRA) and merges them into it at full precision; full trains every weight,
    at full precision whatever policy.quantization (fp32 master weights under mixed precision in
    policy.dtype), and PPO quantizes the result as it loads it."""
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
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (non-reentrant): less
    memory, about a third more time. The model loads as the policy does: in policy.dtype, on its
    8-bit or 4-bit base with LoRA on top; a full fine-tune keeps fp32 master weights under
    mixed precision in policy.dtype."""

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
    ranking_column: Optional[str] = None
    """Instead of chosen and rejected: a column holding K texts, best first, expanded into its
    K(K-1)/2 pairs (the held-out rows then count rankings, not pairs)."""
    max_length: int = 128
    center_rewards: Optional[float] = 0.01
    """Weight of a penalty on the squared reward, which keeps rewards near 0 for PPO; none turns it off."""
    heldout: int = 200
    """Pairs kept out of training to measure the accuracy (chosen scored above rejected)."""
    method: Literal["full", "lora"] = "full"
    """full trains every weight (fp32 master weights, under mixed precision in the dtype); lora
    trains policy.lora_r / lora_alpha adapters and the new score head on a frozen base, which may
    be quantized, and merges them."""
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """The classifier's dtype; none means policy.dtype."""
    quantization: Optional[Literal["none", "8bit", "4bit"]] = None
    """Load the base in 8-bit or 4-bit (needs method=lora); none means policy.quantization with
    method=lora, and a full-precision base with method=full."""
    gradient_checkpointing: bool = False

    def check(self) -> None:
        self.require(self.method == "lora" or self.quantization in (None, "none"), "quantization",
                     "needs reward_model.method=lora: a full fine-tune cannot train frozen integer weights (QLoRA "
                     "trains adapters on them)")
        self.require(self.init == "pretrained" or self.method == "full", "init",
                     "random weights need reward_model.method='full' (LoRA trains only adapters on a frozen base)")
        self.require(bool(self.dataset.strip()), "dataset", "must name a Hub dataset or local file(s)")
        _positive(self, "learning_rate", "epochs", "batch_size", "max_length", "heldout")
        self.require(self.ranking_column is None or bool(self.ranking_column.strip()), "ranking_column",
                     "must name a column")


LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_pair", "apo_zero", "apo_down")
"""DPO losses, by TRL 0.11.4's names (aot_pair is TRL 1.x's aot_unpaired; the others keep their
names). bco_pair in TRL 1.x keeps no running reward mean: after the first step its loss is not
0.11.4's."""
_SMOOTHED = ("robust", "exo_pair", "aot", "aot_pair")
"""The losses that read label_smoothing in TRL 1.x (0.11.4's sigmoid did too; 1.x's ignores it)."""


@dataclass(frozen=True)
class DPO(Section):
    """Direct Preference Optimization with TRL 1.x's DPO loss, instead of a reward model and PPO.

    Trains the recipe's LoRA policy on (prompt, chosen, rejected) triples; the reference is
    the same model with its adapters off (after SFT, if the recipe has that stage), so there
    is no second copy. The run is evaluated as a PPO run is: the recipe's reward and
    KL(policy || reference) of the policy's own samples on the held-out prompts. Under
    `accelerate launch`, the processes share each batch and average their gradients.
    """

    section: typing.ClassVar[str] = "dpo"
    dataset: str
    """Preference data: a Hub id or local csv/json/jsonl/parquet file(s)."""
    learning_rate: float
    epochs: float
    """Passes over the training pairs; the run takes ceil(epochs * pairs / batch_size) steps
    (run.steps, if set, stops it sooner)."""
    batch_size: int
    beta: float
    """How far from the reference the loss lets the policy move: lower allows more KL."""
    loss_type: Literal[LOSS_TYPES] = "sigmoid"
    max_length: int = 128
    """Prompt plus answer, in tokens (TRL 1.x falls back to 1024 when unset: set it here)."""
    max_prompt_length: int = 64
    """Prompt tokens kept (its end) when prompt and answer are too long together."""
    label_smoothing: float = 0.0
    """The assumed share of flipped labels (conservative DPO); for robust, exo_pair, aot, aot_pair."""
    rpo_alpha: Optional[float] = None
    """Weight of an SFT term on the chosen answers (RPO; TRL 1.x's "sft" loss term beside
    loss_type); none leaves it out."""
    gradient_accumulation_steps: int = 1
    """Split each batch into this many passes, for memory (each process's share of it, under
    accelerate launch). The update is the same for the losses that treat pairs one by one; aot
    and aot_pair sort, and rpo_alpha's SFT term takes a token mean, within each pass."""
    max_grad_norm: Optional[float] = 1.0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = 0.1
    split: str = "train"
    subset: Optional[str] = None
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    ranking_column: Optional[str] = None
    """Instead of chosen and rejected: a column holding K answers to the prompt, best first,
    expanded into its K(K-1)/2 pairs."""
    separator: str = ""
    """Put between the prompt and each answer: TRL joins them as they are, so a prompt and an
    answer with no space of their own run together ("greatmovie"). Yours to decide."""
    heldout: int = 200
    """Rows kept out of training, to measure DPO's own metrics (margins, accuracy) on before and after."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory, about a
    third more time (non-reentrant checkpointing)."""

    def check(self) -> None:
        self.require(bool(self.dataset.strip()), "dataset", "must name a Hub dataset or local file(s)")
        _positive(self, "learning_rate", "epochs", "batch_size", "beta", "max_length", "max_prompt_length",
                  "gradient_accumulation_steps", "max_grad_norm", "heldout")
        self.require(self.max_prompt_length < self.max_length, "max_prompt_length",
                     f"must be < dpo.max_length ({self.max_length}), to leave room for the answer")
        self.require(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        self.require(self.label_smoothing == 0 or self.loss_type in _SMOOTHED, "label_smoothing",
                     f"is ignored by loss_type={self.loss_type!r}; it applies to {', '.join(_SMOOTHED)}")
        self.require(self.rpo_alpha is None or (self.rpo_alpha >= 0 and math.isfinite(self.rpo_alpha)),
                     "rpo_alpha", "must be finite and >= 0, or none")
        self.require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        self.require(self.batch_size % self.gradient_accumulation_steps == 0, "batch_size",
                     f"must be a multiple of dpo.gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        for name in ("prompt_column", "chosen_column", "rejected_column", "ranking_column"):
            value = getattr(self, name)
            self.require(value is None or bool(value.strip()), name, "must name a column")
