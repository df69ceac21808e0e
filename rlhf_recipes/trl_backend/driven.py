"""What our own loops (DPO's, GRPO's and RLOO's) need of a TRL trainer that they drive step by
step instead of calling its train(): the trainer made ready for it, the backward passes and one
optimizer step with the gradients averaged over processes, as DDP would average them, or as
DeepSpeed reduces them (ZeRO-2 and ZeRO-3, under `accelerate launch --config_file
accelerate/zero3.yaml`), and the trainable weights gathered whole for the main process to save."""
from __future__ import annotations

import math
import warnings

import torch

from ..components import compat
from ..runtime import distributed
from ..runtime.trainer_state import gathered


def device_args() -> dict:
    """TrainingArguments' device fields for this launch: the CPU where there is no GPU, except
    under DeepSpeed, which accelerate switches off on the CPU; there it runs over gloo instead."""
    cpu = not torch.cuda.is_available()
    if distributed.engine() == "deepspeed":
        return {"use_cpu": False, **({"ddp_backend": "gloo"} if cpu else {})}
    return {"use_cpu": cpu}


def ready(trainer, checkpointing: bool, updates: int, deepspeed=None) -> None:
    """`trainer` made ready for `updates` optimizer steps of our loop: TRL's frozen "ref" copy of a
    PeftModel's adapter removed (the adapters-off model is the same reference while the adapter
    starts at zero, without a second adapter to save), checkpointing switched on as asked (TRL's
    Trainer would do it in train(), which our loop does not call), the optimizer and schedule made.
    deepspeed: the plugin of a DeepSpeed launch (runtime.distributed.deepspeed_plugin), whose engine
    then wraps the model and optimizer, partitioning them between processes."""
    if "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")
    if checkpointing:
        compat.enable_checkpointing(trainer.model)
        trainer.model.config.use_cache = False
    trainer.create_optimizer_and_scheduler(num_training_steps=updates)
    if deepspeed is not None:
        distributed.live_deepspeed(deepspeed)  # the recipe's micro batch, accumulation and clipping
        trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.deepspeed = trainer.model_wrapped
        # the schedule anew, on DeepSpeed's parameter groups (it drops empty ones); stepped by us,
        # once an update (accelerate would wrap it to step with every micro batch)
        trainer.lr_scheduler = None
        trainer.create_scheduler(num_training_steps=updates, optimizer=trainer.optimizer)


def _engine(trainer):
    """The DeepSpeed engine wrapping trainer.model, or None."""
    wrapped = getattr(trainer, "model_wrapped", None)
    return wrapped if wrapped is not None and hasattr(wrapped, "set_gradient_accumulation_boundary") else None


def backward(trainer, loss: torch.Tensor, last: bool) -> None:
    """One backward pass of an update's accumulation passes (`last`: the update's final one)."""
    engine = _engine(trainer)
    if engine is None:
        loss.backward()
        return
    engine.set_gradient_accumulation_boundary(last)  # DeepSpeed reduces the gradients at the last pass
    engine.backward(loss, scale_wrt_gas=False)  # the loss is already divided by the passes


def drop_gradients(trainer) -> None:
    """Drop the gradients accumulated so far: an update abandoned part way, for a non-finite loss.
    Under DeepSpeed accelerate's optimizer wrapper drops nothing: its ZeRO optimizer does, and
    ZeRO-2 keeps a partial accumulation of its own until the boundary."""
    engine = _engine(trainer)
    if engine is None:
        trainer.optimizer.zero_grad(set_to_none=True)
        return
    zero = engine.optimizer
    zero.zero_grad(set_to_none=True)  # ZeRO-3: its gradient partitions, and its micro-step count
    for store in (getattr(zero, "all_grad_tensors", None), getattr(zero, "averaged_gradients", None)):
        for key in store or {}:  # ZeRO-2's, by parameter group
            store[key] = None


def optimizer_step(trainer, params: list[torch.nn.Parameter]) -> tuple[float, float] | None:
    """One optimizer and schedule step on `params`' accumulated gradients, averaged over the
    processes and clipped to trainer.args.max_grad_norm: (gradient norm, the learning rate it
    stepped with), or None, with the gradients dropped and nothing stepped, when the norm is not
    finite (the same on every process: they hold the same averaged gradients).

    Under DeepSpeed the engine reduces, clips and steps, and skips a step whose gradient norm is
    not finite itself (0.19 does at every stage); one it applied anyway stops the run."""
    engine = _engine(trainer)
    if engine is not None:
        rate = trainer.lr_scheduler.get_last_lr()[0]
        engine.step()
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")  # None: DeepSpeed was told not to clip
        if not engine.was_step_applied():  # a norm that was not finite: DeepSpeed dropped the gradients
            return None
        if trainer.args.max_grad_norm and not math.isfinite(norm):
            from ..config.sections import RecipeError

            raise RecipeError("the gradient was not finite, and DeepSpeed applied it: "
                              "resume from the last checkpoint with a lower learning rate")
        with warnings.catch_warnings():  # torch sees no step of the wrapper: DeepSpeed's engine took it
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            trainer.lr_scheduler.step()
        return norm, rate
    for p in params:
        if p.grad is None:  # the same tensors on every process, whatever this share's loss touched
            p.grad = torch.zeros_like(p)
    distributed.average([p.grad for p in params])  # as DDP would: every process steps alike
    norm = float(torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm or float("inf")))
    if not torch.isfinite(torch.tensor(norm)):
        drop_gradients(trainer)
        return None
    rate = trainer.lr_scheduler.get_last_lr()[0]  # this step's
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return norm, rate


def partitioned(trainer) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the policy's weights between the processes."""
    return _engine(trainer) is not None and distributed.zero_stage(trainer.accelerator) == 3


def trainable_whole(trainer):
    """A context every process enters around the main one's saving of the adapter: under ZeRO-3
    the trainable weights are gathered whole for its duration (the frozen base stays partitioned)."""
    return gathered([p for p in trainer.model.parameters() if p.requires_grad], modify=False)
