"""DPO's TRL side: TRL 0.11.4's DPOTrainer made to run on today's transformers, and what
rlhf_recipes.loops.dpo's own loop calls of it (tokenized pairs, a batch's loss, one update)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from trl import DPOConfig, DPOTrainer

from ..components import compat
from ..config.sections import DPO, RecipeError


class _DPOTrainer(DPOTrainer, compat.TokenizerArgument):
    """TRL 0.11.4's DPOTrainer on today's Trainer, which has methods of three of its names with
    newer signatures. rlhf_recipes.loops.dpo runs its own loop and calls only the loss; these keep
    `.train()` working for a project that imports the trainer from make_dpo_trainer."""

    def get_batch_samples(self, *args, **kwargs):
        if args and isinstance(args[0], torch.nn.Module):  # DPO's: (model, batch) -> generated texts
            return super().get_batch_samples(*args, **kwargs)
        return super(DPOTrainer, self).get_batch_samples(*args, **kwargs)  # the Trainer's: the next batches

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs=return_outputs)

    @staticmethod
    def get_batch_logps(logits, *args, **kwargs):
        # TRL sums token log-probs in the logits' dtype: in bfloat16 a sequence's log-prob is
        # rounded to whole nats at real lengths, and small margins vanish
        return DPOTrainer.get_batch_logps(logits.float(), *args, **kwargs)

    def log(self, logs: dict, start_time=None) -> None:  # DPO's merges its stored metrics, then the Trainer's logs
        split = "train" if "loss" in logs else "eval"
        for key, values in self._stored_metrics.pop(split, {}).items():
            logs[key] = torch.tensor(values).mean().item()
        super(DPOTrainer, self).log(logs, start_time)


def make_dpo_trainer(cfg: DPO, model, tokenizer, train: list[tuple[str, str, str]], heldout: list[tuple[str, str, str]],
                     steps: int, seed: int, work_dir: Path) -> DPOTrainer:
    """TRL's DPOTrainer for a PEFT `model` (the reference is `model` with its adapters off), the
    section passed through, its triples (prompt, chosen, rejected) tokenized by TRL, and an
    optimizer and schedule for `steps` updates.

    Each row then starts as the evaluation's prompts do (see _bos_as_sampled), and TRL's own
    errors about a row become one line naming dpo.dataset.
    """
    from datasets import Dataset

    from ..components.data import no_progress_bars

    def dataset(rows):
        # a prompt's trailing whitespace goes to the answers: TRL splits prompt from answer at the
        # prompt's own token count, and a space that merges into the answer's first token
        # ("the " + "movie") would take a token out of both
        prompts = [r[0].rstrip() for r in rows]
        lead = [r[0][len(p):] + cfg.separator for r, p in zip(rows, prompts)]
        return Dataset.from_dict({"prompt": prompts, "chosen": [w + r[1] for w, r in zip(lead, rows)],
                                  "rejected": [w + r[2] for w, r in zip(lead, rows)]})

    args = DPOConfig(output_dir=str(work_dir), beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                     rpo_alpha=cfg.rpo_alpha, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                     truncation_mode="keep_end", learning_rate=cfg.learning_rate, max_steps=steps,
                     per_device_train_batch_size=cfg.batch_size // cfg.gradient_accumulation_steps,
                     gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm or 0.0,
                     lr_scheduler_type=cfg.lr_scheduler, **compat.warmup(cfg.warmup_ratio), weight_decay=0.0,
                     seed=seed, save_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
                     dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), precompute_ref_log_probs=False,
                     disable_dropout=True, generate_during_eval=False)
    with no_progress_bars():
        try:
            trainer = _DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset(train),
                                  eval_dataset=dataset(heldout) if heldout else None, tokenizer=tokenizer)
        except ValueError as err:  # TRL's tokenization refusing a row
            raise RecipeError(f"dpo.dataset {cfg.dataset!r}: {str(err).splitlines()[0]}") from None
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        if bos is not None:
            fix = {"bos": bos, "adds_bos": adds_bos}
            trainer.train_dataset = trainer.train_dataset.map(_bos_as_sampled, fn_kwargs=fix)
            if trainer.eval_dataset is not None:
                trainer.eval_dataset = trainer.eval_dataset.map(_bos_as_sampled, fn_kwargs=fix)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    return trainer


def _bos_as_sampled(row: dict, bos: int, adds_bos: bool) -> dict:
    """A tokenized DPO row that starts as the tokenizer starts a prompt: without the BOS TRL puts
    before a GPT-2 prompt (its tokenizer adds none), or with the BOS a Llama prompt cut to
    max_prompt_length from the left lost. Each column on its own: TRL may cut only one of them."""
    row = dict(row)
    for side in ("prompt", "chosen", "rejected"):
        ids = f"{side}_input_ids"
        starts = bool(row[ids]) and row[ids][0] == bos
        if starts and not adds_bos:
            for key in (ids, f"{side}_attention_mask", f"{side}_labels"):
                if key in row:
                    row[key] = row[key][1:]
        elif adds_bos and not starts and row[ids]:
            row[ids] = [bos, *row[ids][1:]]  # labels are -100 there: a prompt token
    return row


def dpo_batch_loss(trainer: DPOTrainer, rows: list[dict], train: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of tokenized rows (of trainer.train_dataset or eval_dataset), policy against the
    adapters-off reference, and TRL's metrics under its own keys (rewards/chosen, rewards/margins,
    rewards/accuracies, logps/chosen, ...); with train=False, without a graph."""
    batch = trainer.data_collator(rows)
    with contextlib.nullcontext() if train else torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="train")
    return loss, {k: float(v) for k, v in metrics.items()}


def dpo_update(trainer: DPOTrainer, rows: list[dict]) -> dict[str, float] | None:
    """One optimizer step of DPO on `rows`, in dpo.gradient_accumulation_steps passes; returns the
    loss and TRL's metrics (averaged over the passes), or None, with nothing changed, when a
    loss or the gradient norm is not finite."""
    passes = trainer.args.gradient_accumulation_steps
    size = -(-len(rows) // passes)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    totals: dict[str, float] = {}
    moments = running_moments(trainer)  # bco_pair's, which each loss call moves
    for start in range(0, len(rows), size):
        loss, metrics = dpo_batch_loss(trainer, rows[start:start + size])
        if not torch.isfinite(loss):
            trainer.optimizer.zero_grad(set_to_none=True)
            running_moments(trainer, moments)
            return None
        (loss / passes).backward()
        for k, v in {"loss": float(loss.detach()), **metrics}.items():
            totals[k] = totals.get(k, 0.0) + v / passes
    clip = trainer.args.max_grad_norm or float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not np.isfinite(norm):
        trainer.optimizer.zero_grad(set_to_none=True)
        running_moments(trainer, moments)
        return None
    rate = trainer.lr_scheduler.get_last_lr()[0]  # this step's
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return {**totals, "grad_norm": norm, "learning_rate": rate}


def running_moments(trainer, restore: dict | None = None) -> dict | None:
    """The running reward moments of TRL's bco_pair loss (None for the other losses), or, given
    `restore`, put them back: held-out scoring and a skipped batch must not move them."""
    running = getattr(trainer, "running", None)
    if running is None:
        return None
    if restore is not None:
        for key, value in restore.items():
            setattr(running, key, value)
    return {k: getattr(running, k) for k in ("mean", "std", "var", "count")}
