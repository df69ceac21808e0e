"""The one module that imports TRL (0.11.4, the last with the classic PPOTrainer).

Everything TRL-shaped stays here, so that moving to another PPO implementation
touches only this file.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

from .config import Recipe


def with_value_head(adapted_model) -> AutoModelForCausalLMWithValueHead:
    """Put TRL's value head on a PEFT-adapted causal LM, sharing its backbone.

    TRL's own `from_pretrained` refuses any model whose device map mentions the CPU
    (8-bit and 4-bit models on a CPU have one), so the wrapper is built directly and
    the value head placed next to the weights, which works the same on CPU and CUDA.
    """
    model = AutoModelForCausalLMWithValueHead(adapted_model, summary_dropout_prob=0.0)
    model.is_peft_model = True  # tells PPOTrainer to use the adapters-off model as reference
    model.v_head.to(next(adapted_model.parameters()).device, torch.float32)
    return model


def make_trainer(recipe: Recipe, model, tokenizer) -> PPOTrainer:
    """TRL's PPOTrainer with the recipe's PPO section passed through field for field.

    Gradient checkpointing is the one exception: TRL turns on the reentrant kind, which
    needs inputs that require grad and warns on every no-grad scoring pass; the
    non-reentrant kind needs neither, so it is switched on here instead.
    """
    fields = dataclasses.asdict(recipe.ppo)
    if fields.pop("gradient_checkpointing"):
        model.pretrained_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = PPOConfig(**fields, gradient_checkpointing=False, seed=recipe.run.seed, exp_name=recipe.name,
                       steps=recipe.run.steps * recipe.ppo.batch_size, log_with=None)
    trainer = PPOTrainer(config, model=model, ref_model=None, tokenizer=tokenizer)
    # TRL keeps the trainable parameters as a one-shot filter(): max_grad_norm would clip
    # the first minibatch of the run and nothing after it
    trainer.model_params = [p for p in trainer.model.parameters() if p.requires_grad]
    return trainer


def ppo_step(trainer: PPOTrainer, queries: list[torch.Tensor], responses: list[torch.Tensor],
             rewards: list[float]) -> dict[str, float]:
    """One PPO update; returns TRL's scalar statistics under their own keys (objective/kl, ppo/loss/total, ...)."""
    device = trainer.current_device
    stats = trainer.step([q.to(device) for q in queries], [r.to(device) for r in responses],
                         [torch.tensor(r, dtype=torch.float32, device=device) for r in rewards])
    return {k: float(v) for k, v in stats.items() if np.ndim(v) == 0}


def kl_coef(trainer: PPOTrainer) -> float:
    """The KL coefficient the next step will use (the adaptive controller's current value)."""
    return float(trainer.kl_ctl.value)


def trainer_state(trainer: PPOTrainer) -> dict:
    """A detached copy of everything PPO changes as it trains, to checkpoint or roll back to.

    The trainable parameters (LoRA adapters, value head), the optimizer and any LR scheduler,
    the KL controller's coefficient and TRL's running reward moments (used by
    use_score_scaling). The frozen base is not included: it never changes.
    """
    running = trainer.running
    return {
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad},
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "lr_scheduler": copy.deepcopy(trainer.lr_scheduler.state_dict()) if trainer.lr_scheduler else None,
        "kl_coef": float(trainer.kl_ctl.value),
        "running": {k: float(getattr(running, k)) for k in ("mean", "std", "var", "count")},
    }


def load_trainer_state(trainer: PPOTrainer, state: dict) -> None:
    """Put `trainer` back into `state` (from trainer_state, or a checkpoint read from disk)."""
    params = dict(trainer.model.named_parameters())
    missing = sorted(set(n for n, p in params.items() if p.requires_grad) ^ set(state["params"]))
    if missing:
        raise ValueError(f"the saved trainable parameters do not match the policy (e.g. {missing[0]})")
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    trainer.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # loading may alias the tensors
    if trainer.lr_scheduler is not None and state["lr_scheduler"] is not None:
        trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.kl_ctl.value = state["kl_coef"]
    for key, value in state["running"].items():
        setattr(trainer.running, key, value)


def step_is_finite(trainer: PPOTrainer, stats: dict[str, float]) -> bool:
    """False if the step produced a non-finite loss or left a non-finite trainable parameter."""
    if not all(np.isfinite(v) for k, v in stats.items() if k.startswith("ppo/loss/")):
        return False
    return all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters() if p.requires_grad)
