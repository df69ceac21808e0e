"""The policy: a causal LM (or an encoder-decoder, see seq2seq) with LoRA adapters and a value
head on the shared backbone.

The frozen reference is this same model with its adapters switched off, so it costs no second copy of the weights. The base may load in
8-bit or 4-bit through bitsandbytes; the adapters and the value head stay fp32.
"""
from __future__ import annotations

import re

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, BitsAndBytesConfig

from . import seq2seq
from ..config.sections import Policy, RecipeError
from ..ppo.value_head import with_value_head
from .loading import load_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DROPOUT = re.compile(r"(dropout|pdrop)", re.IGNORECASE)


def load_tokenizer(key: str, name: str, trust_remote_code: bool = False):
    """A tokenizer that has a pad token (GPT-2 has none: eos stands in) and pads on the right."""
    tok = load_pretrained(key, AutoTokenizer.from_pretrained, name, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise RecipeError(f"{key}: tokenizer of {name!r} has neither a pad nor an eos token; add one")
        tok.pad_token = tok.eos_token  # masked out by the attention mask, so its identity does not matter
    # PPO's scoring pads query+response on this side and passes no position ids: right
    # padding keeps every token at the position it was sampled at. (Generation pads prompts
    # on the left itself, in rollout.pad_batch.)
    tok.padding_side = "right"
    # a generic tokenizer also returns token_type_ids, which GPT-2 would add to every position
    # (as token 0's embedding) in a user's model(**tokenizer(text)); no model here is trained with them
    tok.model_input_names = [n for n in tok.model_input_names if n != "token_type_ids"]
    tok.init_kwargs["model_input_names"] = tok.model_input_names  # and so does the tokenizer we save
    return tok


def quantization_config(quantization: str, dtype: str) -> BitsAndBytesConfig | None:
    """bitsandbytes' settings for a base loaded in 8-bit or 4-bit (nf4, computing in `dtype`); None for none.
    transformers keeps a model's output layer (LM head, classifier head) unquantized."""
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=DTYPES[dtype], bnb_4bit_use_double_quant=True)
    return None


def no_cpu_repacking(model) -> None:
    """bitsandbytes repacks 4-bit weights for inference on AVX512-BF16 CPUs on a first no-grad
    forward: after that, backward through them fails, and the repacking itself fails for small
    widths (a classifier's). Off: the weights stay as loaded."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_config(cfg: Policy):
    """policy.model's config (what the architecture is, before any weights load)."""
    return load_pretrained("policy.model", AutoConfig.from_pretrained, cfg.model, trust_remote_code=cfg.trust_remote_code)


def build_policy(cfg: Policy, device: torch.device):
    """Base LM (dropout off) + LoRA adapters + a value head (rlhf_recipes.ppo.value_head), on `device`."""
    config = load_config(cfg)
    for name, value in config.to_dict().items():
        if _DROPOUT.search(name) and isinstance(value, float):
            setattr(config, name, 0.0)  # the policy that samples must be the policy that is scored
    encoder_decoder = seq2seq.is_encoder_decoder(config)
    if encoder_decoder:
        seq2seq.check_policy(cfg, config)
    quant = quantization_config(cfg.quantization, cfg.dtype)
    auto = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    base = load_pretrained(
        "policy.model", auto.from_pretrained, cfg.model, config=config,
        dtype=DTYPES[cfg.dtype], quantization_config=quant, trust_remote_code=cfg.trust_remote_code,
        # each process places its own copy: device_map="auto" spreads a model over GPUs and breaks DDP.
        # A CPU process's device is cpu:RANK, which transformers would read as GPU number RANK
        device_map={"": "cpu" if device.type == "cpu" else device} if quant else None)
    if quant:
        # gradient checkpointing is the PPO section's choice; the PPO trainer switches it on
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        no_cpu_repacking(base)
    adapted = add_lora(base, cfg)
    model = with_value_head(adapted)
    return model if quant else model.to(device)


def lora_config(cfg: Policy, task: str, target_modules=None) -> LoraConfig:
    """The recipe's LoRA settings (policy.lora_*) for a model of `task` (CAUSAL_LM, SEQ_2_SEQ_LM, or
    SEQ_CLS: a classifier's new head then trains whole); target_modules none means PEFT's default."""
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(target_modules) if target_modules else None, task_type=task)


def add_lora(base, cfg: Policy):
    """`base` wrapped by PEFT with the recipe's LoRA adapters (which start at zero)."""
    lora = lora_config(cfg, "SEQ_2_SEQ_LM" if seq2seq.is_encoder_decoder(base.config) else "CAUSAL_LM",
                       cfg.lora_target_modules)
    try:
        return get_peft_model(base, lora)
    except ValueError as err:
        if "target_modules" not in str(err) and "Target modules" not in str(err):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if _is_linear(m)})
        wanted = ",".join(cfg.lora_target_modules) if cfg.lora_target_modules else "PEFT's default"
        raise RecipeError(f"policy.lora_target_modules ({wanted}) matches no module of {cfg.model!r}; "
                          f"its linear modules are: {', '.join(names)}") from None


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear8bitLt", "Linear4bit")
