"""The stages before PPO or DPO, on TRL 1.x's trainers: supervised fine-tuning (causal; an
encoder-decoder on transformers' Trainer) and a pairwise reward model."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from ..components import compat
from ..config.sections import SFT, RewardModel
from ..reporting.console import StepDisplay


class _Progress(TrainerCallback):
    """A stage's progress bar (steps, the latest logged loss, time left), or a line every 5 s when piped."""

    def __init__(self, label: str):
        self.label, self.display, self.loss = label, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.display = StepDisplay(state.max_steps, label=self.label, every=5.0).__enter__()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.loss = (logs or {}).get("loss", self.loss)

    def on_step_end(self, args, state, control, **kwargs):
        self.display.update(state.global_step, f"loss {self.loss:.4g}" if self.loss is not None else "")

    def on_train_end(self, args, state, control, **kwargs):
        self.display.__exit__(None, None, None)


@contextlib.contextmanager
def trainable_dtypes_kept(model):
    """The trainable weights' dtypes as they were before a TRL trainer was built inside: TRL 1.x casts
    LoRA on a quantized base to bf16 (QLoRA's paper's choice), where ours train in fp32 as PPO's do
    (an AdamW step at 1e-5 rounds away in bf16). The optimizer is made later, in train()."""
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    yield
    for name, p in model.named_parameters():
        if name in trainable and p.dtype != trainable[name]:
            p.data = p.data.to(trainable[name])


def _trainer_args(cfg: SFT | RewardModel, seed: int, work_dir: Path, report: dict, precision: dict | None = None) -> dict:
    """The transformers Trainer settings both stages share: the section's own values, a cosine
    schedule with 5% warm-up and no weight decay, nothing saved by the Trainer, and the run's
    trackers (`report`, from trackers.trainer_settings). TRL 1.x turned bf16 and gradient
    checkpointing on by default: set here, so that a TRL release cannot move them; `precision`
    (stage_models.Precision.trainer_args: mixed precision and checkpointing) overrides them."""
    return dict(output_dir=str(work_dir), learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
                per_device_train_batch_size=cfg.batch_size, lr_scheduler_type="cosine", **compat.warmup(0.05),
                weight_decay=0.0, seed=seed, logging_steps=10, save_strategy="no", **compat.trainer_logging(report),
                disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
                ddp_find_unused_parameters=False,  # under accelerate launch: every weight is used
                **{"bf16": False, "fp16": False, **compat.checkpointing_args(False), **(precision or {})})


def train_sft(model, tokenizer, texts: list[str], cfg: SFT, seed: int, work_dir: Path, report: dict,
              precision: dict | None = None) -> list[float]:
    """TRL's SFTTrainer on `texts` (each ending in EOS, so the model learns to stop); returns the logged losses."""
    from datasets import Dataset

    data = Dataset.from_dict({"text": [t + tokenizer.eos_token for t in texts]})
    args = SFTConfig(**_trainer_args(cfg, seed, work_dir, report, precision), dataset_text_field="text",
                     max_length=cfg.max_length, packing=False, padding_free=False)
    with compat.tensorboard_dir(report.get("logging_dir")), trainable_dtypes_kept(model):
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             data_collator=lambda rows: _lm_batch(tokenizer, rows), callbacks=[_Progress("sft")])
    trainer.remove_callback(PrinterCallback)  # a raw dict per log step; the stage prints its own summary
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_seq2seq_sft(model, tokenizer, pairs: list[tuple[str, str]], cfg: SFT, seed: int, work_dir: Path,
                      report: dict, precision: dict | None = None) -> list[float]:
    """transformers' Trainer on (source, target) pairs, for an encoder-decoder policy: the target's
    cross-entropy given the source (TRL's SFTTrainer is for causal LMs); returns the logged losses."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from ..components import seq2seq

    data = Dataset.from_dict({"source": [p[0] for p in pairs], "target": [p[1] for p in pairs]})
    args = TrainingArguments(**_trainer_args(cfg, seed, work_dir, report, precision), remove_unused_columns=False)
    collate = lambda rows: seq2seq.batch(tokenizer, [(r["source"], r["target"]) for r in rows], cfg.max_length)  # noqa
    with compat.tensorboard_dir(report.get("logging_dir")):
        trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                          data_collator=collate, callbacks=[_Progress("sft")])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _lm_batch(tokenizer, rows: list[dict]) -> dict:
    """Pad a batch for next-token loss, masking padding by position, not by token id: GPT-2's pad
    is its EOS, which would otherwise never be learned. TRL 1.x's tokenized rows carry input_ids
    (and labels) only, so the mask comes from the padding of input_ids."""
    batch = tokenizer.pad({"input_ids": [list(r["input_ids"]) for r in rows]}, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def train_reward_model(model, tokenizer, pairs: list[tuple[str, str]], cfg: RewardModel, seed: int,
                       work_dir: Path, report: dict, precision: dict | None = None) -> list[float]:
    """TRL's RewardTrainer on (chosen, rejected) pairs: -log sigmoid(r_chosen - r_rejected), plus a
    small pull of the rewards towards 0 so PPO sees centred values; returns the logged losses."""
    from datasets import Dataset

    # tokenized and cut here: TRL 1.x would append an EOS to texts (which the scoring of PPO's
    # samples never has) and drops, rather than cuts, a pair longer than max_length
    chosen, rejected = (tokenizer([p[i] for p in pairs], truncation=True, max_length=cfg.max_length)["input_ids"]
                        for i in (0, 1))
    data = Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    # TRL 1.x turns dropout off by default; the stage trained with the model's own, as before
    args = RewardConfig(**_trainer_args(cfg, seed, work_dir, report, precision), max_length=cfg.max_length,
                        center_rewards_coefficient=cfg.center_rewards, disable_dropout=False)
    with compat.tensorboard_dir(report.get("logging_dir")), trainable_dtypes_kept(model):
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                callbacks=[_Progress("reward_model")])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
