"""What PPO and DPO change as they train, copied out and put back: for checkpoints
(trainer_state, load_trainer_state) and for undoing a non-finite PPO step (Rollback).

A trainer here is anything with an accelerator, a model, an optimizer and an lr_scheduler
(rlhf_recipes.ppo's PPOTrainer, TRL's DPO trainer); PPO's also has a KL controller (kl_ctl) and
running reward moments (running)."""
from __future__ import annotations

import contextlib
import copy

import torch
from accelerate.utils import DistributedType
from ..config.sections import RecipeError
from . import distributed


def trainer_state(trainer, all_processes: bool = False) -> dict:
    """A detached copy of everything PPO (or DPO) changes as it trains, to checkpoint or roll back to.

    The trainable parameters (LoRA adapters, value head), the optimizer and any LR scheduler,
    and for PPO the KL controller's coefficient and the running reward moments (used by
    use_score_scaling). The frozen base is not included: it never changes.
    DeepSpeed's optimizer holds only this process's share of the state: all_processes
    gathers every process's share (a list in rank order), for a checkpoint. Every process calls
    it: under ZeRO-3 the trainable parameters are gathered whole from all of them.
    """
    running = getattr(trainer, "running", None)  # PPO's reward moments (DPO has none)
    gather = all_processes and _sharded(trainer)  # on the CPU: unpickled, a tensor returns to the device it left
    optimizer = _plain(trainer.optimizer.state_dict(), torch.device("cpu") if gather else None)
    if gather:
        optimizer = distributed.gather([optimizer])
    trainable = [(n, p) for n, p in _policy(trainer).named_parameters() if p.requires_grad]
    with gathered([p for _, p in trainable], modify=False):
        params = {n: p.detach().clone() for n, p in trainable}
    return {
        "params": params,
        "optimizer": optimizer,
        "lr_scheduler": copy.deepcopy(trainer.lr_scheduler.state_dict()) if trainer.lr_scheduler else None,
        "kl_coef": float(trainer.kl_ctl.value) if hasattr(trainer, "kl_ctl") else None,  # PPO's; DPO has none
        "running": {k: float(getattr(running, k)) for k in ("mean", "std", "var", "count")} if running else None,
    }


def load_trainer_state(trainer, state: dict) -> None:
    """Put `trainer` back into `state` (from trainer_state, or a checkpoint read from disk)."""
    params = dict(_policy(trainer).named_parameters())
    missing = sorted(set(n for n, p in params.items() if p.requires_grad) ^ set(state["params"]))
    if missing:
        raise RecipeError(f"the checkpoint's trainable parameters do not match the policy (e.g. {missing[0]}); "
                          "resume with the recipe the run was trained with")
    with torch.no_grad(), gathered([params[name] for name in state["params"]], modify=True):
        for name, value in state["params"].items():
            params[name].copy_(value)
    optimizer = _plain(state["optimizer"])  # a copy: loading may alias the tensors
    if _sharded(trainer):  # DeepSpeed takes every process's share and reads its own; after the
        # parameters, from which it rebuilds its fp32 copy of them
        optimizer = optimizer if isinstance(optimizer, list) else [optimizer] * distributed.world()[1]
        # the one thing a checkpoint cannot hold, ZeRO-3's loss scaler object: kept as it is
        scaler = trainer.optimizer.state_dict().get("loss_scaler")
        optimizer = [{"loss_scaler": scaler, **share} if scaler is not None else share for share in optimizer]
    trainer.optimizer.load_state_dict(optimizer)
    if trainer.lr_scheduler is not None and state["lr_scheduler"] is not None:
        trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state["kl_coef"] is not None:
        trainer.kl_ctl.value = state["kl_coef"]
    for key, value in (state["running"] or {}).items():
        setattr(trainer.running, key, value)


def gathered(params: list[torch.nn.Parameter], modify: bool):
    """Every process enters it: under ZeRO-3, which partitions each parameter between the processes,
    `params` are whole inside it (and, with `modify`, what the main process writes into them is
    partitioned again on leaving); otherwise it does nothing."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def _sharded(trainer) -> bool:
    return trainer.accelerator.distributed_type == DistributedType.DEEPSPEED


def _plain(obj, device: torch.device | None = None):
    """A copy of `obj` (tensors cloned, to `device` if given) without the leaves a checkpoint cannot
    hold as JSON or tensors (DeepSpeed's loss scaler object, say), which the optimizer keeps as
    they are when loading."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device or obj.device, copy=True)
    if isinstance(obj, dict):
        return {k: _plain(v, device) for k, v in obj.items() if _keeps(v)}
    if isinstance(obj, (list, tuple)):  # a named tuple becomes a plain one
        items = [_plain(v, device) for v in obj if _keeps(v)]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj


def _keeps(value) -> bool:
    return isinstance(value, (dict, list, tuple, torch.Tensor, str, int, float, bool, type(None)))


def _policy(trainer):
    """The policy without accelerate's wrapper (DDP's adds 'module.' to every parameter name)."""
    return trainer.accelerator.unwrap_model(trainer.model)


class Rollback:
    """What a PPO step changes, copied before it, to put back if the step goes non-finite.

    `take()` before the step, `restore()` to undo it. The trainable parameters and the
    optimizer's state are copied into buffers allocated once and refilled in place (a foreach
    copy, not an allocation per tensor); the rest (learning rates, KL coefficient, LR
    schedule, reward moments) is a few numbers. Before the optimizer has state (the first
    step), for state that is not all tensors (an optimizer keeping an int step count), and
    under DeepSpeed, whose optimizer keeps its own, it falls back to a full trainer_state copy.
    """

    def __init__(self, trainer):
        self.trainer, self.buffers, self.full, self.small = trainer, None, None, None

    def _tensors(self) -> list[torch.Tensor] | None:
        params = [p for p in _policy(self.trainer).parameters() if p.requires_grad]
        state = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer).state  # under accelerate's wrapper
        if _sharded(self.trainer) or any(p not in state for p in params):
            return None
        if not all(isinstance(v, torch.Tensor) for p in params for v in state[p].values()):
            return None
        return [p.data for p in params] + [v for p in params for v in state[p].values()]

    def take(self) -> None:
        tensors = self._tensors()
        self.full = trainer_state(self.trainer) if tensors is None else None
        if tensors is None:
            return
        if self.buffers is None or [b.shape for b in self.buffers] != [t.shape for t in tensors]:
            self.buffers = [t.detach().clone() for t in tensors]
        else:
            torch._foreach_copy_(self.buffers, tensors)
        trainer = self.trainer
        self.small = {"lr": [group["lr"] for group in trainer.optimizer.param_groups],
                      "lr_scheduler": copy.deepcopy(trainer.lr_scheduler.state_dict()) if trainer.lr_scheduler else None,
                      "kl_coef": float(trainer.kl_ctl.value),
                      "running": {k: float(getattr(trainer.running, k)) for k in ("mean", "std", "var", "count")}}

    def restore(self) -> None:
        if self.full is not None:
            load_trainer_state(self.trainer, self.full)
            return
        torch._foreach_copy_(self._tensors(), self.buffers)
        trainer = self.trainer
        for group, lr in zip(trainer.optimizer.param_groups, self.small["lr"]):
            group["lr"] = lr
        if trainer.lr_scheduler is not None:
            trainer.lr_scheduler.load_state_dict(self.small["lr_scheduler"])
        trainer.kl_ctl.value = self.small["kl_coef"]
        for key, value in self.small["running"].items():
            setattr(trainer.running, key, value)
