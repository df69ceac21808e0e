"""DPO's TRL side: TRL 1.x's DPOTrainer set up from the recipe's dpo section, and what
rlhf_recipes.loops.dpo's own loop calls of it (tokenized pairs, a batch's loss, one update)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import trl.trainer.dpo_trainer
from trl import DPOConfig, DPOTrainer
from trl.data_utils import common_prefix_length

from ..components import compat
from ..components.data import encode_prompt, render_prompt, turn_end_id
from ..components.rollout import end_ids
from ..config.sections import DPO, Prompts, RecipeError
from ..runtime import distributed
from . import driven
from .stages import trainable_dtypes_kept

RENAMED = {"aot_pair": "aot_unpaired"}  # TRL 0.11.4's name -> TRL 1.x's, the same loss
_TOGGLE = trl.trainer.dpo_trainer.disable_gradient_checkpointing


def _checkpointing_kept_for_the_reference(model, gradient_checkpointing_kwargs=None):
    """TRL's DPO turns checkpointing off for each reference pass and on again after, to spare the
    reentrant kind a warning under no_grad. Each time, transformers registers its input-gradient
    hook anew without removing the last: one more hook on the embeddings per loss call, run by
    every later forward pass, sampling included. The non-reentrant kind (ours) under no_grad just
    runs the forward: there is nothing to turn off."""
    if (gradient_checkpointing_kwargs or {}).get("use_reentrant") is False:
        return contextlib.nullcontext()
    return _TOGGLE(model, gradient_checkpointing_kwargs)


trl.trainer.dpo_trainer.disable_gradient_checkpointing = _checkpointing_kept_for_the_reference


def losses(cfg: DPO) -> tuple[list[str], list[float]]:
    """The section's loss_type and rpo_alpha as TRL 1.x's loss_type list and loss_weights: RPO's
    negative log-likelihood of the chosen answer is TRL's "sft" term, weighted rpo_alpha."""
    types, weights = [RENAMED.get(cfg.loss_type, cfg.loss_type)], [1.0]
    if cfg.rpo_alpha is not None:
        types, weights = types + ["sft"], weights + [cfg.rpo_alpha]
    return types, weights


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int, max_prompt_length: int,
                  bos: int | None, adds_bos: bool, end: int | None = None, specials: bool = True) -> dict[str, list[int]]:
    """One DPO row: the prompt's tokens as the tokenizer starts a prompt (no BOS for GPT-2, one
    for Llama), split from each answer where tokenizing prompt + answer departs from the prompt's
    own tokens, and each answer ending in EOS. A row longer than max_length keeps the prompt's last
    max_prompt_length tokens (with Llama's BOS put back first) and each answer's first
    max_length - max_prompt_length: TRL 1.x has no prompt cut of its own, and drops a row whose
    prompt alone is too long, which would leave the loop's batches short.

    end: the token that ends an answer (an instruct model's end of turn); none means EOS.
    specials=False tokenizes a chat-templated prompt, which holds its own specials, as it is."""
    eos = tokenizer.eos_token_id if end is None else end
    p = tokenizer(prompt, add_special_tokens=specials)["input_ids"]
    c, r = (tokenizer(prompt + answer, add_special_tokens=specials)["input_ids"] for answer in (chosen, rejected))
    n = min(common_prefix_length(p, c), common_prefix_length(p, r))
    p, c, r = p[:n], c[n:] + [eos], r[n:] + [eos]
    if len(p) + max(len(c), len(r)) > max_length:
        p = p[-max_prompt_length:]
        if adds_bos and p[:1] != [bos]:
            p = [bos, *p[1:]]
        c, r = c[:max_length - max_prompt_length], r[:max_length - max_prompt_length]
    return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}


def make_dpo_trainer(cfg: DPO, model, tokenizer, train: list[tuple[str, str, str]], heldout: list[tuple[str, str, str]],
                     steps: int, seed: int, work_dir: Path, checkpointing: bool = False,
                     chat: Prompts | None = None, deepspeed=None) -> DPOTrainer:
    """TRL's DPOTrainer for a PEFT `model` (the reference is `model` with its adapters off), the
    section passed through, its triples (prompt, chosen, rejected) tokenized by tokenize_pair,
    and an optimizer and schedule for `steps` updates.

    checkpointing: non-reentrant gradient checkpointing (the policy's dpo.gradient_checkpointing).
    chat: the recipe's prompts section when prompts.chat_template is on: each prompt becomes the
    user's turn in the chat template, and each answer ends with the template's end of turn.
    deepspeed: a DeepSpeed launch's plugin (driven.ready).
    """
    from datasets import Dataset

    from ..components.data import no_progress_bars

    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    end = None
    if chat is not None:
        end = turn_end_id(tokenizer, end_ids(model, tokenizer))
        adds_bos = bos is not None and encode_prompt(chat, tokenizer, "a")[:1] == [bos]

    def dataset(rows):
        out = []
        for prompt, good, bad in rows:
            if chat is not None:  # the templated prompt ends where the reply starts: nothing moves to the answers
                out.append(tokenize_pair(tokenizer, render_prompt(chat, tokenizer, prompt), good, bad, cfg.max_length, cfg.max_prompt_length, bos,
                                         adds_bos, end, specials=False))
                continue
            # a prompt's trailing whitespace goes to the answers: a space that merges into the
            # answer's first token ("the " + "movie") would otherwise take a token out of both
            kept = prompt.rstrip()
            lead = prompt[len(kept):] + cfg.separator
            out.append(tokenize_pair(tokenizer, kept, lead + good, lead + bad, cfg.max_length, cfg.max_prompt_length,
                                     bos, adds_bos, end))
        return Dataset.from_list(out)

    types, weights = losses(cfg)
    smoothing = cfg.label_smoothing or (1e-3 if types[0] == "exo_pair" else 0.0)  # TRL 0.11.4's exo_pair default
    micro = cfg.batch_size // cfg.gradient_accumulation_steps
    args = DPOConfig(output_dir=str(work_dir), beta=cfg.beta, loss_type=types, loss_weights=weights,
                     label_smoothing=smoothing, max_length=cfg.max_length, truncation_mode="keep_start",
                     learning_rate=cfg.learning_rate, max_steps=steps, per_device_train_batch_size=micro,
                     per_device_eval_batch_size=micro, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                     max_grad_norm=cfg.max_grad_norm or 0.0, lr_scheduler_type=cfg.lr_scheduler,
                     **compat.warmup(cfg.warmup_ratio), weight_decay=0.0, seed=seed, save_strategy="no",
                     report_to="none", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
                     **driven.device_args(), precompute_ref_log_probs=False, disable_dropout=True,
                     # TRL 1.x's defaults turned these on; the policy's own dtype, and checkpointing as asked
                     bf16=False, fp16=False, **compat.checkpointing_args(checkpointing), padding_free=False)
    with no_progress_bars(), trainable_dtypes_kept(model):
        try:
            train_rows, held_rows = dataset(train), dataset(heldout) if heldout else None
        except ValueError as err:  # a tokenizer refusing a row
            raise RecipeError(f"dpo.dataset {cfg.dataset!r}: {str(err).splitlines()[0]}") from None
        # TRL 1.x tokenizes text rows only: it gets one, then our tokenized rows, which its collator takes as they are
        stub = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=stub, processing_class=tokenizer)
        trainer.train_dataset, trainer.eval_dataset = train_rows, held_rows
    driven.ready(trainer, checkpointing, steps, deepspeed)
    return trainer


def dpo_batch_loss(trainer: DPOTrainer, rows: list[dict], train: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of tokenized rows (of trainer.train_dataset or eval_dataset), policy against the
    adapters-off reference, and TRL's metrics under its own keys (rewards/chosen, rewards/margins,
    rewards/accuracies, logps/chosen, entropy, ...); with train=False, without a graph."""
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    store = trainer._metrics["train" if trainer.model.training else "eval"]  # where compute_loss appends them
    store.clear()
    with contextlib.nullcontext() if train else torch.no_grad():
        loss = trainer.compute_loss(trainer.model_wrapped, inputs)  # DeepSpeed's engine, or the model
    metrics = {k: float(v[-1]) for k, v in store.items() if k != "num_tokens"}  # num_tokens: a running count
    store.clear()
    return loss, metrics


def dpo_update(trainer: DPOTrainer, rows: list[dict]) -> dict[str, float] | None:
    """One optimizer step of DPO on `rows` (this process's share of the batch), in
    dpo.gradient_accumulation_steps passes, the gradients averaged over the processes; returns
    the loss and TRL's metrics (averaged over passes and processes), or None, with nothing
    changed, when a loss or the gradient norm is not finite on any process."""
    passes = trainer.args.gradient_accumulation_steps
    size = -(-len(rows) // passes)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    totals: dict[str, float] = {}
    trainer.model.train()  # dropout is off (TRL's disable_dropout); transformers checkpoints only in train mode
    for start in range(0, len(rows), size):
        loss, metrics = dpo_batch_loss(trainer, rows[start:start + size])
        if distributed.any_process(not bool(torch.isfinite(loss))):
            driven.drop_gradients(trainer)
            return None
        driven.backward(trainer, loss / passes, last=start + size >= len(rows))
        for k, v in {"loss": float(loss.detach()), **metrics}.items():
            totals[k] = totals.get(k, 0.0) + v / passes
    keys = sorted(totals)
    means = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
    distributed.average([means])
    stepped = driven.optimizer_step(trainer, params)  # every process with the mean gradient: identical copies
    if stepped is None:
        return None
    return {**dict(zip(keys, means.tolist())), "grad_norm": stepped[0], "learning_rate": stepped[1]}
