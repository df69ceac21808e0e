"""The models the stages before PPO train, loaded as the policy is: in its dtype, on its 8-bit or
4-bit base with LoRA on top (QLoRA-style), with trainable weights in fp32.

A stage's full fine-tune loads fp32 master weights and computes under mixed precision in the
policy's dtype (a pure-bf16 AdamW step at 1e-5 rounds away: in a review's check, 85% of bf16
weights did not move in 10 steps; tests/test_stages.py sees over 90% move with fp32 masters). LoRA keeps the base frozen in its dtype (or quantized) and trains fp32
adapters under the same autocast; fp16 gets the Trainer's loss scaler on a GPU. The output is
saved in the policy's dtype, LoRA merged into the base at full precision (loaded again, on the
CPU, for a quantized base), and PPO quantizes it again as it loads.
"""
from __future__ import annotations

import dataclasses

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from ..components import compat
from ..components.loading import load_pretrained
from ..components.policy import DTYPES, no_cpu_repacking, quantization_config


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a stage's model loads and trains."""

    dtype: str
    """The policy's dtype: of the frozen base (LoRA), of the autocast, and of the saved output."""
    quantization: str
    method: str
    """lora or full."""
    checkpointing: bool = False

    @property
    def quantized(self) -> str:
        """The quantization the stage trains on: a full fine-tune trains full-precision weights."""
        return self.quantization if self.method == "lora" else "none"

    def trainer_args(self) -> dict:
        """TrainingArguments' mixed precision: autocast in the dtype over fp32 trainable weights, with
        the loss scaler for fp16 (on a GPU: the CPU's autocast has no fp16 scaler)."""
        return {"bf16": self.dtype == "bfloat16",
                "fp16": self.dtype == "float16" and torch.cuda.is_available(),
                **compat.checkpointing_args(self.checkpointing)}


def load_trainable(key: str, auto, name: str, precision: Precision, device: torch.device, lora: LoraConfig | None,
                   **kwargs):
    """`auto.from_pretrained(name)` ready to train as `precision` says, with `lora` on top for the
    LoRA method (None: full). kwargs go to from_pretrained (config, trust_remote_code)."""
    quant = quantization_config(precision.quantized, precision.dtype)
    # a full fine-tune keeps fp32 master weights; LoRA freezes the base in the policy's dtype
    dtype = torch.float32 if precision.method == "full" else DTYPES[precision.dtype]
    model = load_pretrained(key, auto.from_pretrained, name, dtype=dtype, quantization_config=quant,
                            device_map={"": "cpu" if device.type == "cpu" else device} if quant else None, **kwargs)
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=precision.checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        no_cpu_repacking(model)  # the held-out measure runs before training
    else:
        model = model.to(device)
    return model if lora is None else get_peft_model(model, lora)


def for_saving(model, precision: Precision, key: str, auto, name: str, **kwargs):
    """The trained model as the stage saves it, in the policy's dtype: LoRA merged into the base.
    A quantized base is merged into a full-precision copy loaded again on the CPU (int8 or nf4
    weights cannot take the merge, and the GPU holds the quantized one)."""
    if precision.method == "full":
        return model.to(DTYPES[precision.dtype])
    if precision.quantized == "none":
        return model.merge_and_unload().to(DTYPES[precision.dtype])
    adapters = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()
                if "lora_" in k or "modules_to_save" in k}
    config = model.peft_config["default"]
    del model
    base = load_pretrained(key, auto.from_pretrained, name, dtype=torch.float32, **kwargs)
    fresh = get_peft_model(base, config)
    unfitted = fresh.load_state_dict(adapters, strict=False).unexpected_keys
    if unfitted:
        raise RuntimeError(f"{key}: adapters that do not fit the full-precision base: {unfitted[:3]}")
    return fresh.merge_and_unload().to(DTYPES[precision.dtype])
