"""Rewards: generated texts in, one float each out.

A classifier reward reads the score of one label chosen by name from the classifier's
config, so the order in which a pipeline would list labels cannot matter. Any Python
callable from a list of texts to a list of numbers works as a reward too.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from ..config.recipe import resolve_callable
from ..config.sections import Policy, RecipeError, Reward
from .loading import load_pretrained
from .policy import DTYPES, load_tokenizer, no_cpu_repacking, quantization_config

RewardFn = Callable[[list[str]], list[float]]


def label_index(id2label: dict[int, str], label: str | None, key: str = "reward.label") -> int:
    """The output index of `label`, found by name; none is allowed only for single-output models."""
    if label is None:
        if len(id2label) == 1:
            return next(iter(id2label))
        raise RecipeError(f"{key} is required for a classifier with several outputs; "
                          f"valid labels: {', '.join(id2label.values())}")
    for index, name in id2label.items():
        if name == label:
            return int(index)
    raise RecipeError(f"{key} {label!r} is not a label of the classifier; valid labels: {', '.join(id2label.values())}")


def select_score(logits: torch.Tensor, index: int, kind: str) -> torch.Tensor:
    """Score of output `index` from classifier logits.

    logits: (batch, num_labels) -> (batch,). A probability is the softmax over labels,
    or the sigmoid of the one logit of a single-output model.
    """
    logits = logits.float()
    if kind == "logit":
        return logits[:, index]
    if logits.shape[-1] == 1:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=-1)[:, index]


def check_rewards(values: object, count: int, source: str) -> list[float]:
    """`values` as a list of `count` floats (non-finite ones kept: the loop skips such batches)."""
    try:
        items = list(values.tolist() if hasattr(values, "tolist") else values)  # type: ignore[union-attr]
    except TypeError:
        raise RecipeError(f"{source} must return a list of numbers, one per text, got {type(values).__name__}") from None
    if len(items) != count:
        raise RecipeError(f"{source} returned {len(items)} rewards for {count} texts; return one number per text")
    bad = [v for v in items if not isinstance(v, numbers.Real) or isinstance(v, bool)]
    if bad:
        raise RecipeError(f"{source} must return numbers, got {repr(bad[0])[:60]} ({type(bad[0]).__name__}); "
                          "return one float per text")
    return [float(v) for v in items]


class ClassifierReward:
    """Scores texts with a sequence classifier: reward = scale * score(label).

    It loads in reward.dtype and reward.quantization, or the policy's (`policy`; float32 and
    none without one): stated, since transformers 4.57 loads a checkpoint in fp32 and 5.x in its
    own dtype, and the two would score differently."""

    def __init__(self, cfg: Reward, device: torch.device, policy: Policy | None = None):
        self.cfg, self.device = cfg, device
        self.tokenizer = load_tokenizer("reward.model", cfg.model)
        self.tokenizer.padding_side = "right"
        # too long a text loses its beginning, not the response at its end that is being judged
        self.tokenizer.truncation_side = "left" if cfg.input == "prompt+response" else "right"
        config = load_pretrained("reward.model", AutoConfig.from_pretrained, cfg.model)
        kinds = config.architectures or []
        if kinds and not any(k.endswith("ForSequenceClassification") for k in kinds):  # else a random head
            raise RecipeError(f"reward.model {cfg.model!r} is a {kinds[0]}, not a text classifier; give a "
                              "...ForSequenceClassification model, or a Python callable as reward.function")
        dtype = cfg.dtype or (policy.dtype if policy else "float32")
        quant = quantization_config(cfg.quantization or (policy.quantization if policy else "none"), dtype)
        self.model = load_pretrained("reward.model", AutoModelForSequenceClassification.from_pretrained, cfg.model,
                                     config=config, dtype=DTYPES[dtype], quantization_config=quant,
                                     device_map={"": "cpu" if device.type == "cpu" else device} if quant else None)
        (self.model if quant else self.model.to(device)).eval().requires_grad_(False)
        no_cpu_repacking(self.model)
        # GPT- and Llama-style classifiers read the last token that is not the config's pad id:
        # it must be the id the tokenizer pads with, or a text's score depends on its batch
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.index = label_index(self.model.config.id2label, cfg.label)
        limits = [n for n in (cfg.max_length, self.tokenizer.model_max_length, position_limit(self.model))
                  if n and n < 1_000_000]
        self.max_length = min(limits) if limits else 512

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[float]:
        scores = []
        for start in range(0, len(texts), self.cfg.batch_size):
            batch = self.tokenizer(texts[start:start + self.cfg.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            logits = self.model(**model_inputs(batch, self.device)).logits
            scores.append(select_score(logits, self.index, self.cfg.score))
        return (self.cfg.scale * torch.cat(scores)).tolist()


def model_inputs(batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The token ids and attention mask of a tokenizer's output, on `device`, and nothing else.

    Generic tokenizers also return token_type_ids (all 0), which GPT-2 adds to every position
    as the embedding of token 0; models are trained without them (TRL feeds ids and mask
    alone), and for BERT-style models all-zero types are what they assume when none are given.
    """
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


def position_limit(model) -> int | None:
    """How many tokens a classifier's position embeddings take. RoBERTa-family models number
    positions from padding_idx + 1, so they take two fewer than max_position_embeddings (512 of 514)."""
    embeddings = getattr(model.base_model, "embeddings", None)
    positions, pad = getattr(embeddings, "position_embeddings", None), getattr(embeddings, "padding_idx", None)
    if isinstance(positions, torch.nn.Embedding) and pad is not None:
        return positions.num_embeddings - pad - 1
    return getattr(model.config, "max_position_embeddings", None)


class FunctionReward:
    """A user's callable (texts -> numbers), checked on every call, times `scale`."""

    def __init__(self, cfg: Reward):
        self.fn = resolve_callable(cfg.function, "reward.function")
        self.scale = cfg.scale
        self.name = getattr(self.fn, "__qualname__", repr(self.fn))

    def __call__(self, texts: list[str]) -> list[float]:
        values = check_rewards(self.fn(texts), len(texts), f"reward.function {self.name}")
        return [self.scale * v for v in values]


def build_reward(cfg: Reward, device: torch.device, policy: Policy | None = None) -> RewardFn:
    """The recipe's reward; a classifier loads in the policy's dtype and quantization unless
    reward.dtype and reward.quantization say otherwise."""
    return ClassifierReward(cfg, device, policy) if cfg.model else FunctionReward(cfg)


def reward_inputs(cfg: Reward, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
    """The texts the reward sees: prompt + response, or the response alone."""
    if cfg.input == "response":
        return list(responses)
    return [p + r for p, r in zip(prompts, responses)]


def all_finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)
