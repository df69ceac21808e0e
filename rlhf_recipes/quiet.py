"""Silence third-party noise that tells a user of this package nothing, and nothing else.

Applied once, when rlhf_recipes is imported. Each filter names the message (and, for
warnings, the module that raises it), so other warnings from the same libraries, and
everything from the user's own code, still show.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

_WARNINGS = [  # (message regex, category, module regex)
    (r"fan_in_fan_out is set to False but the target module is `Conv1D`", UserWarning, r"peft\."),
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning, r"torch\."),
    # PEFT 0.22 on transformers 4.57, a stack this package supports on purpose
    (r"Support for Transformers < 5\.6 is deprecated in PEFT", FutureWarning, r"peft\."),
    # TRL's reward collator pads to the longest pair with a max_length it does not need
    (r"`max_length` is ignored when `padding`=`True`", UserWarning, r"transformers\."),
    # transformers 5.x: PEFT still asks for the old name
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\."),
    # DeepSpeed 0.19's ZeRO-3 gathers with the call torch 2.13 renamed
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning, r"torch\."),
]
_LOG_MESSAGES = {  # logger name -> substrings of records to drop
    "transformers.tokenization_utils_base": ["Please note that with a fast tokenizer"],
    # the SFT and reward-model stages: a default the config leaves unset, and a FLOPs estimate we never read
    "transformers.modeling_utils": ["was set in the config but it is unrecognized",
                                    "Could not estimate the number of tokens of the input"],
    # transformers 5.25 brings the `kernels` package, through which importing bitsandbytes on a CPU
    # with AVX512-BF16 looks for a Hub kernel; offline, it says at every start that it skips a check
    "kernels._internals.hf_hub": ["Skipping publisher trust check"],
    # a non-finite reward, which TRL takes for a missing one: the GRPO/RLOO loop skips the batch and says so
    "trl.trainer.grpo_trainer": ["All reward functions returned None"],
    "trl.trainer.rloo_trainer": ["All reward functions returned None"],
}


class _DropMessages(logging.Filter):
    def __init__(self, substrings: list[str]):
        super().__init__()
        self.substrings = substrings

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(s in text for s in self.substrings)


@contextlib.contextmanager
def without_log(logger: str, substring: str):
    """Within the block, drop `logger`'s records that contain `substring`: for advice that does
    not apply to one call we make on purpose, and should still reach every other."""
    dropped = _DropMessages([substring])
    logging.getLogger(logger).addFilter(dropped)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(dropped)


def install() -> None:
    for message, category, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, substrings in _LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessages(substrings))
    # one "inputs will be cast to float16" line per 8-bit layer per forward pass: hundreds a step
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
