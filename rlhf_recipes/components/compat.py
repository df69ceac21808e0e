"""The differences between transformers 4.57 and 5.x that touch rlhf_recipes, each with its
smallest fix, in one place."""
from __future__ import annotations

import contextlib

import transformers
from packaging.version import Version

TRANSFORMERS_5 = Version(transformers.__version__).major >= 5


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


def checkpointing_args(on: bool) -> dict:
    """TrainingArguments' gradient checkpointing, non-reentrant: 5.25 renamed it
    activation_checkpointing, and the old name warns (TRL 1.x's configs default it to on)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": on, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


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
    one per call and keeps none. model: the transformers model inside PEFT's and the value-head wrappers."""
    model.__dict__.pop("_cache", None)
