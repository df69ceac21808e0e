"""The differences between transformers 4.57 and 5.x that touch rlhf_recipes, each with its
smallest fix, in one place. Imported by the TRL-facing module before TRL's trainers load.

TRL 0.11.4 itself is unchanged on both: what differs is how transformers answers it.
"""
from __future__ import annotations

import contextlib

import transformers
from packaging.version import Version

TRANSFORMERS_5 = Version(transformers.__version__).major >= 5


def patch_trl_flags() -> None:
    """TRL 0.11.4 reads optional packages with transformers' _is_package_available, which 5.x
    makes return a (found, version) tuple: always truthy, so `import trl`'s SFT trainer would
    import liger-kernel. Its flags become the booleans they were meant to be."""
    import trl.import_utils as flags

    for name, value in vars(flags).items():
        if name.startswith("_") and name.endswith("_available") and isinstance(value, tuple):
            setattr(flags, name, bool(value[0]))
    # and TRL's DPO trainer imports a mapping that 5.x renamed; it only reads it for vision models
    from transformers.models.auto import modeling_auto

    if not hasattr(modeling_auto, "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES"):
        modeling_auto.MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES = {}


def warmup(fraction: float) -> dict:
    """A warm-up over `fraction` of training: 4.57's warmup_ratio; 5.x dropped it, and its
    warmup_steps takes a fraction below 1."""
    return {"warmup_steps": fraction} if TRANSFORMERS_5 else {"warmup_ratio": fraction}


def trainer_logging(report: dict) -> dict:
    """TrainingArguments' tracker settings: 5.x dropped logging_dir (its TensorBoard callback reads
    TENSORBOARD_LOGGING_DIR instead, see tensorboard_dir)."""
    return {k: v for k, v in report.items() if k != "logging_dir"} if TRANSFORMERS_5 else report


@contextlib.contextmanager
def tensorboard_dir(path: str | None):
    """Where a Trainer built inside this block writes TensorBoard logs, on 5.x (its callback reads
    the variable when the Trainer is built); 4.57 takes logging_dir in TrainingArguments."""
    import os

    if not (TRANSFORMERS_5 and path):
        yield
        return
    saved = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = path
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TENSORBOARD_LOGGING_DIR"]
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = saved


class TokenizerArgument(transformers.Trainer):
    """Between one of TRL 0.11.4's trainers and transformers' Trainer: TRL passes `tokenizer=`,
    which 5.x rejects; it becomes `processing_class`, the name both versions take."""

    def __init__(self, *args, tokenizer=None, **kwargs):
        if tokenizer is not None:
            kwargs["processing_class"] = tokenizer
        super().__init__(*args, **kwargs)

    @property
    def tokenizer(self):  # TRL's trainers read it; 5.x's Trainer has only processing_class
        return self.processing_class

    @tokenizer.setter
    def tokenizer(self, value):
        self.processing_class = value


def enable_checkpointing(model) -> None:
    """Non-reentrant gradient checkpointing on `model` (a PEFT model passes the call on to its
    base): 5.25 renamed the switch to activation_checkpointing_enable, and the old name warns."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def no_progress_bars():
    """Hide transformers' and the hub's loading and saving bars (5.x draws one per model load),
    which would break the one-line error contract; the user's own setting is restored after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    shown, hub_shown = logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()
        if hub_shown:
            enable_progress_bars()


def drop_static_cache(model) -> None:
    """transformers 4.57 keeps the static KV cache of a compiled generate on the model (`_cache`,
    reused by the next call), holding its memory through the PPO update that follows; 5.x makes
    one per call and keeps none. model: the transformers model inside PEFT's and TRL's wrappers."""
    model.__dict__.pop("_cache", None)
