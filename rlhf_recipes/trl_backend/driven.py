"""What our own loops (DPO's, GRPO's and RLOO's) need of a TRL trainer that they drive step by
step instead of calling its train(): the trainer made ready for it, and one optimizer step with
the gradients averaged over processes, as DDP would average them."""
from __future__ import annotations

import torch

from ..components import compat
from ..runtime import distributed


def ready(trainer, checkpointing: bool, updates: int) -> None:
    """`trainer` made ready for `updates` optimizer steps of our loop: TRL's frozen "ref" copy of a
    PeftModel's adapter removed (the adapters-off model is the same reference while the adapter
    starts at zero, without a second adapter to save), checkpointing switched on as asked (TRL's
    Trainer would do it in train(), which our loop does not call), the optimizer and schedule made."""
    if "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")
    if checkpointing:
        compat.enable_checkpointing(trainer.model)
        trainer.model.config.use_cache = False
    trainer.create_optimizer_and_scheduler(num_training_steps=updates)


def optimizer_step(trainer, params: list[torch.nn.Parameter]) -> tuple[float, float] | None:
    """One optimizer and schedule step on `params`' accumulated gradients, averaged over the
    processes and clipped to trainer.args.max_grad_norm: (gradient norm, the learning rate it
    stepped with), or None, with the gradients dropped and nothing stepped, when the norm is not
    finite (the same on every process: they hold the same averaged gradients)."""
    for p in params:
        if p.grad is None:  # the same tensors on every process, whatever this share's loss touched
            p.grad = torch.zeros_like(p)
    distributed.average([p.grad for p in params])  # as DDP would: every process steps alike
    norm = float(torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm or float("inf")))
    if not torch.isfinite(torch.tensor(norm)):
        trainer.optimizer.zero_grad(set_to_none=True)
        return None
    rate = trainer.lr_scheduler.get_last_lr()[0]  # this step's
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return norm, rate
