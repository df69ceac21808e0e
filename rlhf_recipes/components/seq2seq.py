"""Encoder-decoder policies (T5, FLAN-T5, BART): what differs from a causal LM, in one place.

The prompt is the encoder's input, ending in EOS as the model's tokenizer adds it. The response
is the decoder's output as `generate` returns it: the decoder-start token at position 0 (pad,
id 0, for T5), then the generated tokens. It is never cut from the left: TRL 0.11.4 feeds it
as given as decoder_input_ids. TRL itself would not score the first generated token (its mask
starts at decoder position 1); rlhf_recipes.ppo scores every generated token.
"""
from __future__ import annotations

from ..config.sections import Policy, RecipeError

T5_FAMILY = frozenset({"t5", "mt5", "umt5", "longt5", "switch_transformers"})


def is_encoder_decoder(obj) -> bool:
    """Whether `obj` (a config, a transformers model, PEFT's or TRL's wrapper of one) is an encoder-decoder."""
    return bool(getattr(obj, "is_encoder_decoder", False)
                or getattr(getattr(obj, "config", None), "is_encoder_decoder", False))


def check_policy(cfg: Policy, config) -> None:
    """Refuse what an encoder-decoder policy cannot do."""
    if config.model_type in T5_FAMILY and cfg.dtype == "float16":
        raise RecipeError(f"policy.dtype=float16: {config.model_type} models overflow in float16 (their "
                          "activations reach inf); use policy.dtype=bfloat16 or float32")
    if getattr(config, "decoder_start_token_id", None) is None:
        raise RecipeError(f"policy.model {cfg.model!r} is an encoder-decoder model whose config has no "
                          "decoder_start_token_id; set it in its config.json")


def batch(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> dict:
    """A supervised batch of (source, target) pairs: the encoder's ids and mask, and the target's ids
    as labels, padding masked with -100 (the model builds its decoder inputs from them, start first)."""
    sources = tokenizer([p[0] for p in pairs], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
    targets = tokenizer([p[1] for p in pairs], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
    labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, -100)
    return {"input_ids": sources["input_ids"], "attention_mask": sources["attention_mask"], "labels": labels}
