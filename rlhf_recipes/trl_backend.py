"""The one module that imports TRL (0.11.4, the last with the classic PPOTrainer).

Everything TRL-shaped stays here, so that moving to another PPO implementation
touches only this file.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from transformers import PrinterCallback, TrainerCallback

from . import compat

compat.patch_trl_flags()  # before TRL's trainers import (transformers 5.x)
from trl import (AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, DPOConfig,  # noqa: E402
                 DPOTrainer, PPOConfig, PPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer)
from trl.core import PPODecorators, entropy_from_logits, masked_mean  # noqa: E402

from . import distributed, token_scores  # noqa: E402
from .seq2seq import is_encoder_decoder  # noqa: E402
from .console import StepDisplay  # noqa: E402
from .config import DPO, SFT, Recipe, RecipeError, RewardModel  # noqa: E402


def with_value_head(adapted_model) -> AutoModelForCausalLMWithValueHead:
    """Put TRL's value head on a PEFT-adapted causal LM (or seq2seq LM, reading the last decoder
    hidden state), sharing its backbone.

    TRL's own `from_pretrained` refuses any model whose device map mentions the CPU
    (8-bit and 4-bit models on a CPU have one), so the wrapper is built directly and
    the value head placed next to the weights, which works the same on CPU and CUDA.
    """
    wrapper = (AutoModelForSeq2SeqLMWithValueHead if is_encoder_decoder(adapted_model)
               else AutoModelForCausalLMWithValueHead)
    model = wrapper(adapted_model, summary_dropout_prob=0.0)
    # tells PPOTrainer to use the adapters-off model as reference (built directly, TRL leaves it
    # unset, and the seq2seq forward then fails: TRL #858)
    model.is_peft_model = True
    # TRL's forward always passes past_key_values=None, an argument transformers 5.x deprecates
    adapted_model.register_forward_pre_hook(_drop_empty_cache, with_kwargs=True)
    model.v_head.to(next(adapted_model.parameters()).device, torch.float32)
    return model


class _PPOTrainer(PPOTrainer):
    """TRL's PPOTrainer with four changes to its step; the first two are off unless a recipe asks.

    1. Gradient checkpointing that checkpoints. TRL's batched_forward_pass calls model.eval()
       before every forward pass, the gradient-carrying one inside each minibatch included, and
       transformers checkpoints only in train mode: with checkpointing on, that pass runs in
       train mode here. Dropout is off in the policy (policy.lora_dropout must be 0), so train
       mode changes nothing else, and the no-grad scoring passes stay in eval mode.
    2. An entropy bonus: the loss becomes pg_loss + vf_coef * vf_loss - entropy_coef * entropy,
       the entropy being the masked mean over response tokens that TRL computes for its
       statistics and discards; `ppo/loss/entropy` logs the term as added to the total.
    3. Encoder-decoder responses are scored from their first generated token. TRL masks it out
       (start = 1 in batched_forward_pass), so that token was in neither the KL penalty nor the
       policy loss, and a response of one token left nothing scored (a crash). On the seq2seq
       quickstart that first token carried most of the KL: the controller saw 2 nats where the
       policy had moved 13, lowered the coefficient and let the policy collapse.
    4. A causal policy's scoring passes apply the LM head, softmax and entropy at the response
       tokens only, not at every prompt and padding position (rlhf_recipes.token_scores), and
       the masks and per-token rewards are built without a loop over rows. The log-probs,
       values, masks, statistics and updates are TRL's bit for bit on this CPU (tested); with
       the entropy bonus in the loss, to the last bits (its gradient meets the LM head at fewer
       rows). Where the model's logits are not its LM head of the last hidden state (checked
       once, in make_trainer), or for a full-distribution KL penalty, TRL's own pass runs.
       ppo.length_buckets > 1 also splits each pass by response length (see _response_pass).
    """

    entropy_coef: float = 0.0
    checkpointing: bool = False
    responses_only: bool = False
    length_buckets: int = 1

    @PPODecorators.empty_device_cache()
    def batched_forward_pass(self, model, queries, responses, model_inputs, return_logits=False,
                             response_masks=None):
        keep = _train_mode_kept(model) if self.checkpointing and torch.is_grad_enabled() else contextlib.nullcontext()
        with keep:
            if self.responses_only and response_masks is None and self.config.kl_penalty != "full":
                return self._response_pass(model, queries, responses, model_inputs, return_logits)
            logprobs, logits, values, masks = super().batched_forward_pass(
                model, queries, responses, model_inputs, return_logits=return_logits, response_masks=response_masks)
        if self.is_encoder_decoder:  # every decoder token after the start: logprobs[:, t] is token t + 1's
            masks = model_inputs["decoder_attention_mask"][:, 1:].to(masks.dtype)
        return logprobs, logits, values, masks

    def _response_pass(self, model, queries, responses, model_inputs, return_logits):
        """batched_forward_pass's (logprobs, entropies or None, values, masks), each (b, L - 1);
        in place of the logits, which TRL uses only for its entropy statistic, the entropies.
        With ppo.length_buckets > 1, each chunk of mini_batch_size rows runs as that many passes
        over rows of similar length, trimmed to their longest (right padding only: no position
        ids are passed, so trimming on the left would move every token)."""
        model.eval()
        wrapper = self.accelerator.unwrap_model(model)
        device = model_inputs["input_ids"].device
        query_lens = torch.tensor([len(q) for q in queries], device=device)
        response_lens = torch.tensor([len(r) for r in responses], device=device)
        lengths = [len(q) + len(r) for q, r in zip(queries, responses)]
        buckets = self.length_buckets
        if buckets > 1 and not bool(model_inputs["attention_mask"][:, 0].all()):
            buckets = 1
        parts: list[tuple] = []
        for start in range(0, len(queries), self.config.mini_batch_size):
            if buckets == 1:  # TRL's chunk, as it is
                rows = slice(start, start + self.config.mini_batch_size)
                inputs = {key: value[rows] for key, value in model_inputs.items()}
                parts.append(self._score(model, wrapper, inputs, query_lens[rows], response_lens[rows], return_logits))
                continue
            rows = sorted(range(start, min(start + self.config.mini_batch_size, len(queries))), key=lengths.__getitem__)
            size = -(-len(rows) // buckets)
            for k in range(0, len(rows), size):
                group = torch.tensor(rows[k:k + size], device=device)
                width = max(lengths[i] for i in rows[k:k + size])
                inputs = {key: value[group, :width] for key, value in model_inputs.items()}
                parts.append(self._score(model, wrapper, inputs, query_lens[group], response_lens[group],
                                         return_logits) + (group,))
        width = model_inputs["input_ids"].shape[1] - 1
        order = torch.cat([part[4] for part in parts]).argsort() if buckets > 1 else slice(None)
        return tuple(None if parts[0][n] is None else
                     torch.cat([token_scores.widen(part[n], width) for part in parts])[order] for n in range(4))

    def _score(self, model, wrapper, inputs, query_lens, response_lens, return_logits):
        """One forward pass: (logprobs, entropies or None, values, masks), each (n, w - 1)."""
        with _last_hidden(wrapper) as hidden:  # the value head's input: the LM head's too
            _, _, values = model(**inputs, logits_to_keep=1)
        mask = token_scores.response_mask(inputs["attention_mask"], query_lens, response_lens)
        picked = mask.bool()
        lm_head = wrapper.pretrained_model.get_output_embeddings()
        logits = lm_head(hidden[0][:, :-1][picked].to(lm_head.weight.device)).float()
        logprobs = token_scores.scatter(token_scores.token_logprobs(logits, inputs["input_ids"][:, 1:][picked]), mask)
        entropies = None
        if return_logits:  # only the statistic needs it, unless the entropy bonus is in the loss
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.entropy_coef)):
                entropies = token_scores.scatter(token_scores.entropy(logits), mask)
        return logprobs, entropies, values[:, :-1], mask

    def compute_rewards(self, scores, logprobs, ref_logprobs, masks):
        """TRL's per-token rewards (the KL penalty, plus the score at each response's last token),
        for the whole batch at once instead of row by row."""
        if self.config.kl_penalty == "full":
            return super().compute_rewards(scores, logprobs, ref_logprobs, masks)
        kls = self._kl_penalty(logprobs, ref_logprobs)
        non_score_rewards = -self.kl_ctl.value * kls
        rewards = non_score_rewards.clone()
        rewards[torch.arange(len(rewards), device=rewards.device), token_scores.last_positions(masks)] += scores
        return rewards, non_score_rewards, kls

    def loss(self, old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns):
        entropies = None
        if logits.dim() == 2:  # _response_pass's entropies: TRL's own entropy of a one-token vocabulary is 0, cheaply
            entropies, logits = logits, logits.new_zeros(logits.shape + (1,))
        pg_loss, vf_term, stats = super().loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages,
                                               returns)
        if entropies is not None:
            stats["policy/entropy"] = masked_mean(entropies, mask).detach()
        if not self.entropy_coef:
            return pg_loss, vf_term, stats
        entropy = masked_mean(entropies if entropies is not None else entropy_from_logits(logits), mask)
        term = -self.entropy_coef * entropy
        if masked_mean(torch.exp(logprobs - old_logprobs), mask).item() > self.config.ratio_threshold:
            term = term * 0.0  # TRL's ratio-threshold skip zeroes the whole loss, this term too
        stats["loss/entropy"] = term.detach()
        stats["loss/total"] = stats["loss/total"] + term.detach()
        return pg_loss + term, vf_term, stats


@contextlib.contextmanager
def _last_hidden(wrapper):
    """A one-item list that the block's forward pass fills with the value head's input (the
    last hidden state, (b, L, d))."""
    seen: list[torch.Tensor] = []
    handle = wrapper.v_head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def _logits_from_last_hidden(model) -> bool:
    """Whether `model`'s logits are exactly its LM head applied to the last hidden state, with
    logits_to_keep accepted: what _PPOTrainer's response-only pass assumes. False for models that
    scale or cap their logits after the head (Gemma 2, Cohere, Granite), or whose forward takes
    no logits_to_keep."""
    if is_encoder_decoder(model.pretrained_model):
        return False
    device = next(model.parameters()).device
    ids = torch.arange(1, 6, device=device)[None] % model.pretrained_model.config.get_text_config().vocab_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _last_hidden(model) as hidden:
            full, _, _ = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            last, _, _ = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            head = model.pretrained_model.get_output_embeddings()
            return (head is not None and last.shape[1] == 1
                    and torch.equal(head(hidden[0].to(head.weight.device)).float(), full))
    except (TypeError, ValueError, AttributeError):
        return False
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _train_mode_kept(model):
    """`model` in train mode, with its eval() a no-op until the block ends."""
    was_training = model.training
    model.train()
    model.eval = lambda: model  # an instance attribute: shadows nn.Module.eval for this object only
    try:
        yield
    finally:
        del model.eval
        model.train(was_training)


def _drop_empty_cache(module, args, kwargs):
    if "past_key_values" in kwargs and kwargs["past_key_values"] is None:
        kwargs = {k: v for k, v in kwargs.items() if k != "past_key_values"}
    return args, kwargs


def make_trainer(recipe: Recipe, model, tokenizer, deepspeed=None) -> PPOTrainer:
    """TRL's PPOTrainer (with the changes of _PPOTrainer) and the recipe's PPO section passed
    through field for field.

    deepspeed: the plugin from distributed.deepspeed_plugin, when launched with DeepSpeed.

    Gradient checkpointing is switched on here, not by TRL: TRL turns on the reentrant kind,
    which needs inputs that require grad and warns on every no-grad scoring pass; the
    non-reentrant kind needs neither.
    """
    deepspeed = distributed.live_deepspeed(deepspeed)
    fields = dataclasses.asdict(recipe.ppo)
    checkpointing, entropy_coef = fields.pop("gradient_checkpointing"), fields.pop("entropy_coef")
    length_buckets = fields.pop("length_buckets")
    if checkpointing:
        model.pretrained_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # TRL's scoring passes need no KV cache (generation sets its own), and with one asked for,
        # every checkpointed pass logs that it is switched off
        model.pretrained_model.config.use_cache = False
    config = PPOConfig(**fields, gradient_checkpointing=False, seed=recipe.run.seed, exp_name=recipe.name,
                       steps=recipe.run.steps * recipe.ppo.batch_size, log_with=None,
                       accelerator_kwargs={"deepspeed_plugin": deepspeed} if deepspeed else {})
    trainer = _PPOTrainer(config, model=model, ref_model=None, tokenizer=tokenizer)
    trainer.entropy_coef, trainer.checkpointing, trainer.length_buckets = entropy_coef, checkpointing, length_buckets
    trainer.responses_only = _logits_from_last_hidden(trainer.accelerator.unwrap_model(trainer.model))
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



def trainer_state(trainer: PPOTrainer, all_processes: bool = False) -> dict:
    """A detached copy of everything PPO (or DPO) changes as it trains, to checkpoint or roll back to.

    The trainable parameters (LoRA adapters, value head), the optimizer and any LR scheduler,
    and for PPO the KL controller's coefficient and TRL's running reward moments (used by
    use_score_scaling). The frozen base is not included: it never changes.
    DeepSpeed's optimizer holds only this process's share of the state: all_processes
    gathers every process's share (a list in rank order), for a checkpoint.
    """
    running = getattr(trainer, "running", None)  # PPO's reward moments (DPO's bco_pair loss has its own)
    gather = all_processes and _sharded(trainer)  # on the CPU: unpickled, a tensor returns to the device it left
    optimizer = _plain(trainer.optimizer.state_dict(), torch.device("cpu") if gather else None)
    if gather:
        optimizer = distributed.gather([optimizer])
    return {
        "params": {n: p.detach().clone() for n, p in _policy(trainer).named_parameters() if p.requires_grad},
        "optimizer": optimizer,
        "lr_scheduler": copy.deepcopy(trainer.lr_scheduler.state_dict()) if trainer.lr_scheduler else None,
        "kl_coef": float(trainer.kl_ctl.value) if hasattr(trainer, "kl_ctl") else None,  # PPO's; DPO has none
        "running": {k: float(getattr(running, k)) for k in ("mean", "std", "var", "count")} if running else None,
    }


def load_trainer_state(trainer: PPOTrainer, state: dict) -> None:
    """Put `trainer` back into `state` (from trainer_state, or a checkpoint read from disk)."""
    params = dict(_policy(trainer).named_parameters())
    missing = sorted(set(n for n, p in params.items() if p.requires_grad) ^ set(state["params"]))
    if missing:
        raise RecipeError(f"the checkpoint's trainable parameters do not match the policy (e.g. {missing[0]}); "
                          "resume with the recipe the run was trained with")
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    optimizer = _plain(state["optimizer"])  # a copy: loading may alias the tensors
    if _sharded(trainer):  # DeepSpeed takes every process's share and reads its own; after the
        # parameters, from which it rebuilds its fp32 copy of them
        optimizer = optimizer if isinstance(optimizer, list) else [optimizer] * distributed.world()[1]
    trainer.optimizer.load_state_dict(optimizer)
    if trainer.lr_scheduler is not None and state["lr_scheduler"] is not None:
        trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state["kl_coef"] is not None:
        trainer.kl_ctl.value = state["kl_coef"]
    for key, value in (state["running"] or {}).items():
        setattr(trainer.running, key, value)


def _sharded(trainer: PPOTrainer) -> bool:
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


def _policy(trainer: PPOTrainer):
    """The policy without accelerate's wrapper (DDP's adds 'module.' to every parameter name)."""
    return trainer.accelerator.unwrap_model(trainer.model)


def step_is_finite(trainer: PPOTrainer, stats: dict[str, float]) -> bool:
    """False if the step produced a non-finite loss or left a non-finite trainable parameter.

    One fused pass and one device sync: the largest magnitude over every trainable tensor is
    finite exactly when all their elements are (a 2-norm could overflow on large finite ones).
    """
    if not all(np.isfinite(v) for k, v in stats.items() if k.startswith("ppo/loss/")):
        return False
    params = [p.detach() for p in trainer.model.parameters() if p.requires_grad]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=float("inf"))))


class Rollback:
    """What a PPO step changes, copied before it, to put back if the step goes non-finite.

    `take()` before the step, `restore()` to undo it. The trainable parameters and the
    optimizer's state are copied into buffers allocated once and refilled in place, in one
    fused copy per device and dtype; the rest (KL coefficient, LR schedule, reward moments)
    is a few numbers. Before the optimizer has state (the first step) and under DeepSpeed,
    whose optimizer keeps its own, it falls back to a full trainer_state copy.
    """

    def __init__(self, trainer: PPOTrainer):
        self.trainer, self.buffers, self.full, self.small = trainer, None, None, None

    def _tensors(self) -> list[torch.Tensor] | None:
        params = [p for p in _policy(self.trainer).parameters() if p.requires_grad]
        state = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer).state  # under accelerate's wrapper
        if _sharded(self.trainer) or any(p not in state for p in params):
            return None
        return [p.data for p in params] + [v for p in params for v in state[p].values() if isinstance(v, torch.Tensor)]

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
        self.small = {"lr_scheduler": copy.deepcopy(trainer.lr_scheduler.state_dict()) if trainer.lr_scheduler else None,
                      "kl_coef": float(trainer.kl_ctl.value),
                      "running": {k: float(getattr(trainer.running, k)) for k in ("mean", "std", "var", "count")}}

    def restore(self) -> None:
        if self.full is not None:
            load_trainer_state(self.trainer, self.full)
            return
        torch._foreach_copy_(self._tensors(), self.buffers)
        trainer = self.trainer
        if trainer.lr_scheduler is not None:
            trainer.lr_scheduler.load_state_dict(self.small["lr_scheduler"])
        trainer.kl_ctl.value = self.small["kl_coef"]
        for key, value in self.small["running"].items():
            setattr(trainer.running, key, value)


# ---------------------------------------------------------------------------- stages before PPO
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


def _trainer_args(cfg: SFT | RewardModel, seed: int, work_dir: Path, report: dict) -> dict:
    """The transformers Trainer settings both stages share: the section's own values, a cosine
    schedule with 5% warm-up and no weight decay, nothing saved by the Trainer, and the run's
    trackers (`report`, from trackers.trainer_settings)."""
    return dict(output_dir=str(work_dir), learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
                per_device_train_batch_size=cfg.batch_size, lr_scheduler_type="cosine", **compat.warmup(0.05),
                weight_decay=0.0, seed=seed, logging_steps=10, save_strategy="no", **compat.trainer_logging(report),
                disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
                ddp_find_unused_parameters=False)  # under accelerate launch: every weight is used


def train_sft(model, tokenizer, texts: list[str], cfg: SFT, seed: int, work_dir: Path, report: dict) -> list[float]:
    """TRL's SFTTrainer on `texts` (each ending in EOS, so the model learns to stop); returns the logged losses."""
    from datasets import Dataset

    data = Dataset.from_dict({"text": [t + tokenizer.eos_token for t in texts]})
    args = SFTConfig(**_trainer_args(cfg, seed, work_dir, report), dataset_text_field="text",
                     max_seq_length=cfg.max_length, packing=False)
    with compat.tensorboard_dir(report.get("logging_dir")):
        trainer = _SFTTrainer(model=model, args=args, train_dataset=data, tokenizer=tokenizer,
                              data_collator=lambda rows: _lm_batch(tokenizer, rows), callbacks=[_Progress("sft")])
    trainer.remove_callback(PrinterCallback)  # a raw dict per log step; the stage prints its own summary
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_seq2seq_sft(model, tokenizer, pairs: list[tuple[str, str]], cfg: SFT, seed: int, work_dir: Path,
                      report: dict) -> list[float]:
    """transformers' Trainer on (source, target) pairs, for an encoder-decoder policy: the target's
    cross-entropy given the source (TRL 0.11.4's SFTTrainer is for causal LMs); returns the logged losses."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from . import seq2seq

    data = Dataset.from_dict({"source": [p[0] for p in pairs], "target": [p[1] for p in pairs]})
    args = TrainingArguments(**_trainer_args(cfg, seed, work_dir, report), remove_unused_columns=False)
    collate = lambda rows: seq2seq.batch(tokenizer, [(r["source"], r["target"]) for r in rows], cfg.max_length)  # noqa
    with compat.tensorboard_dir(report.get("logging_dir")):
        trainer = compat.TokenizerArgument(model=model, args=args, train_dataset=data, tokenizer=tokenizer,
                                           data_collator=collate, callbacks=[_Progress("sft")])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _lm_batch(tokenizer, rows: list[dict]) -> dict:
    """Pad a batch for next-token loss, masking padding by the attention mask, not by token id:
    TRL's default collator masks every pad id, and GPT-2's pad is its EOS, which would then
    never be learned."""
    batch = tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows], return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


class _SFTTrainer(SFTTrainer, compat.TokenizerArgument):
    """TRL's SFTTrainer, its `tokenizer=` taken by both transformers versions."""


class _PairwiseRewardTrainer(RewardTrainer, compat.TokenizerArgument):
    """TRL 0.11.4's compute_loss predates the num_items_in_batch argument transformers now passes."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs=return_outputs)


def train_reward_model(model, tokenizer, pairs: list[tuple[str, str]], cfg: RewardModel, seed: int,
                       work_dir: Path, report: dict) -> list[float]:
    """TRL's RewardTrainer on (chosen, rejected) pairs: -log sigmoid(r_chosen - r_rejected), plus a
    small pull of the rewards towards 0 so PPO sees centred values; returns the logged losses."""
    from datasets import Dataset

    chosen, rejected = (tokenizer([p[i] for p in pairs], truncation=True, max_length=cfg.max_length) for i in (0, 1))
    data = Dataset.from_dict({"input_ids_chosen": chosen["input_ids"], "attention_mask_chosen": chosen["attention_mask"],
                              "input_ids_rejected": rejected["input_ids"],
                              "attention_mask_rejected": rejected["attention_mask"]})
    args = RewardConfig(**_trainer_args(cfg, seed, work_dir, report), max_length=cfg.max_length,
                        remove_unused_columns=False, center_rewards_coefficient=cfg.center_rewards)
    with compat.tensorboard_dir(report.get("logging_dir")):
        trainer = _PairwiseRewardTrainer(model=model, args=args, train_dataset=data, tokenizer=tokenizer,
                                         callbacks=[_Progress("reward_model")])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------------------- DPO
class _DPOTrainer(DPOTrainer, compat.TokenizerArgument):
    """TRL 0.11.4's DPOTrainer on today's Trainer, which has methods of three of its names with
    newer signatures. rlhf_recipes.dpo runs its own loop and calls only the loss; these keep
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

    from .data import no_progress_bars

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
