"""The classic PPO trainer: one step on a batch of (query, response, score), in numbered steps.

TRL 0.11.4's PPOTrainer.step, owned here since TRL 1.13 deleted it: the same maths, order of
operations and statistics (held against TRL 0.11.4 itself by tests/test_parity.py), with what
rlhf_recipes added to it as plain code: the entropy bonus, the first generated token of an
encoder-decoder scored, response-only and packed scoring passes, gradient checkpointing that
checkpoints, and a trainable-parameter list that max_grad_norm clips every time.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..components import compat
from ..components.rollout import pad_batch
from ..config.sections import PPO, Recipe
from ..runtime import distributed
from . import maths
from .probes import logits_from_last_hidden, packing_problem
from .scoring import Batch, Passes, score


@dataclasses.dataclass
class PPOTrainer:
    """What a PPO run keeps between steps (make_trainer builds it; step() trains)."""

    config: PPO
    model: torch.nn.Module
    """The ValueHeadModel, as accelerate prepared it (DDP- or DeepSpeed-wrapped under a launcher)."""
    tokenizer: object
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    kl_ctl: maths.AdaptiveKL | maths.FixedKL
    passes: Passes
    checkpointing: bool = False
    running: maths.RunningMoments = dataclasses.field(default_factory=maths.RunningMoments)
    lr_scheduler: object = None
    """Always None (recipes have no schedule); kept for the checkpoint code PPO shares with DPO."""
    model_params: list = dataclasses.field(default_factory=list)
    unpacked: str | None = None
    """Why ppo.pack_rows is off for this policy (the start-up probe's answer), or None."""
    rollout: dict = dataclasses.field(default_factory=dict)
    """The last step's scored rollout (mask, logprobs, ref_logprobs, values, advantages, returns,
    each (b, L - 1)) and how many minibatches it trained on: to inspect, or to test."""

    @property
    def responses_only(self) -> bool:
        return self.passes.responses_only

    @property
    def pack_rows(self) -> bool:
        return self.passes.pack_rows

    @property
    def policy(self):
        """The value-head model without accelerate's wrapper."""
        return self.accelerator.unwrap_model(self.model)

    def batch(self, queries: list[torch.Tensor], responses: list[torch.Tensor]) -> Batch:
        """The model inputs of a step: query + response in one row (causal), or the query as the
        encoder's input and the response as the decoder's, padded on the tokenizer's side; under a
        launcher, to the widest process's width, as every process must run the same shapes."""
        side, pad_id = self.tokenizer.padding_side, self.tokenizer.pad_token_id
        if self.passes.encoder_decoder:
            parts = {"input_ids": queries, "decoder_input_ids": responses}
        else:
            parts = {"input_ids": [torch.cat([q, r]) for q, r in zip(queries, responses)]}
        inputs = {}
        for name, seqs in parts.items():
            ids, mask = pad_batch(seqs, pad_id, side)
            mask_name = name.replace("input_ids", "attention_mask")
            inputs[name], inputs[mask_name] = ids.to(self.accelerator.device), mask.to(self.accelerator.device)
            if self.accelerator.num_processes > 1:
                for key, pad in ((name, pad_id), (mask_name, 0)):
                    inputs[key] = self.accelerator.pad_across_processes(inputs[key], dim=1, pad_index=pad,
                                                                        pad_first=side == "left")
        lens = [torch.tensor([len(s) for s in seqs], device=self.accelerator.device) for seqs in (queries, responses)]
        return Batch(inputs, *lens)

    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor],
             scores: list[float]) -> dict[str, float]:
        """One PPO update on this process's ppo.batch_size samples -> TRL 0.11.4's scalar
        statistics (objective/kl, ppo/loss/total, ...), averaged over processes."""
        cfg, model, t0 = self.config, self.model, time.time()
        if not len(queries) == len(responses) == len(scores) == cfg.batch_size:
            raise ValueError(f"a PPO step takes ppo.batch_size={cfg.batch_size} queries, responses and scores, "
                             f"got {len(queries)}, {len(responses)} and {len(scores)}")
        timing = {}
        # 1. the scores: scaled by the running moments of every score so far, then clipped
        scores = torch.tensor(scores, dtype=torch.float32, device=self.accelerator.device)
        if cfg.use_score_scaling:
            self.running.update(*self._moments(scores))
            scores = maths.scale_scores(scores, self.running, cfg.use_score_norm)
        if cfg.score_clip is not None:
            scores = torch.clip(scores.float(), -cfg.score_clip, cfg.score_clip).to(scores.dtype)

        # 2. the rollout scored: log-probs and values under the policy, log-probs under the
        #    reference (the same model with its adapters off)
        t = time.time()
        batch = self.batch(queries, responses)
        full = cfg.kl_penalty == "full"
        model.eval()
        with torch.no_grad():
            logprobs, logits, values, mask = score(model, batch, self.passes, "logits" if full else None)
            with self.policy.pretrained_model.disable_adapter():
                ref_logprobs, ref_logits, _, _ = score(model, batch, self.passes, "logits" if full else None)
        timing["time/ppo/forward_pass"] = time.time() - t

        # 3. per-token rewards (the KL penalty, the score at each response's last token), then GAE
        with torch.no_grad():
            t = time.time()
            if full:
                kls = maths.kl_penalty(F.log_softmax(logits, dim=-1), F.log_softmax(ref_logits, dim=-1), "full")
            else:
                kls = maths.kl_penalty(logprobs, ref_logprobs, cfg.kl_penalty)
            rewards, non_score = maths.token_rewards(scores, kls, mask, self.kl_ctl.value)
            timing["time/ppo/compute_rewards"] = time.time() - t
            t = time.time()
            values, advantages, returns = maths.advantages_and_returns(values, rewards, mask, cfg.gamma, cfg.lam,
                                                                        cfg.whiten_rewards)
            timing["time/ppo/compute_advantages"] = time.time() - t
        self.rollout = {"mask": mask, "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values,
                        "advantages": advantages, "returns": returns}
        old = {"logprobs": logprobs.float(), "values": values.float(), "mask": mask, "advantages": advantages,
               "returns": returns}

        # 4. optimise: ppo_epochs passes over the batch in shuffled minibatches, the optimizer
        #    stepping every gradient_accumulation_steps of them; target_kl may stop it early
        t, minibatches = time.time(), []
        for _ in range(cfg.ppo_epochs):
            order = torch.as_tensor(np.random.permutation(cfg.batch_size), device=mask.device)
            for start in range(0, cfg.batch_size, cfg.mini_batch_size):
                rows = order[start:start + cfg.mini_batch_size]
                with self.accelerator.accumulate(model):
                    minibatches.append(self._minibatch(batch.rows(rows), {k: v[rows] for k, v in old.items()}))
            if cfg.early_stopping and self._early_stop(minibatches[-1]["policy/policykl"]):
                break
        timing["time/ppo/optimize_step"] = time.time() - t
        self.rollout["minibatches"] = len(minibatches)

        # 5. statistics under TRL's keys, averaged over processes; then the KL coefficient moves
        t = time.time()
        stats = self._statistics(scores, logprobs, kls, non_score, mask, queries, responses, minibatches)
        timing["time/ppo/calc_stats"] = time.time() - t
        stats["ppo/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        self.kl_ctl.update(stats["objective/kl"], cfg.batch_size * self.accelerator.num_processes)
        timing["time/ppo/total"] = time.time() - t0
        return stats | timing

    def _minibatch(self, batch: Batch, old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One forward and backward pass, and an optimizer step where accumulation ends."""
        cfg, model = self.config, self.model
        # scored in eval mode (dropout is off anyway), but transformers checkpoints only in train mode
        model.train(self.checkpointing)
        logprobs, entropies, vpreds, _ = score(model, batch, self.passes, "entropy")
        model.train()
        losses = maths.ppo_losses(old["logprobs"], old["values"], entropies, vpreds, logprobs, old["mask"],
                                  old["advantages"], old["returns"], cfg.cliprange, cfg.cliprange_value, cfg.vf_coef,
                                  cfg.ratio_threshold, cfg.entropy_coef)
        self.accelerator.backward(losses.policy + losses.value)
        if cfg.max_grad_norm is not None and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.model_params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()  # accelerate skips both until the last accumulated minibatch
        return losses.stats

    def _early_stop(self, policykl: torch.Tensor) -> bool:
        """Whether the epoch's last minibatch moved the policy past 1.5 x ppo.target_kl (averaged
        over processes, so that all stop together)."""
        if self.accelerator.num_processes > 1:
            dist.barrier()
            dist.all_reduce(policykl, dist.ReduceOp.SUM)
            policykl /= self.accelerator.num_processes
        if policykl > 1.5 * self.config.target_kl:
            self.optimizer.zero_grad()
            return True
        return False

    def _moments(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The (mean, biased variance, count) of every process's scores."""
        if not self.accelerator.use_distributed:
            var, mean = torch.var_mean(scores, unbiased=False)
            return mean, var, scores.numel()
        sum_count = self.accelerator.reduce(torch.tensor([scores.sum(), scores.numel()], device=scores.device))
        mean = sum_count[0] / sum_count[1]
        var = self.accelerator.reduce(torch.sum((scores - mean) ** 2)) / sum_count[1]
        return mean, var, int(sum_count[1].item())

    def _statistics(self, scores, logprobs, kls, non_score, mask, queries, responses, minibatches) -> dict:
        """TRL 0.11.4's scalar statistics of a step. The tensors are averaged over processes (the
        token counts and KL coefficient are this process's own, as in TRL)."""
        per_sequence_kl = (kls * mask).sum(dim=-1)
        stats = {
            "objective/kl": per_sequence_kl.mean(),
            "objective/entropy": (-logprobs * mask).sum(dim=-1).mean(),
            "ppo/mean_non_score_reward": maths.masked_mean(non_score, mask),
            "ppo/mean_scores": scores.mean(),
            "ppo/std_scores": scores.std(),
        }
        for key in minibatches[0]:
            stats[f"ppo/{key}"] = torch.stack([m[key].flatten() for m in minibatches]).mean(dim=0)
        stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
        if self.accelerator.num_processes > 1:
            dist.barrier()
            for value in stats.values():
                dist.all_reduce(value, dist.ReduceOp.SUM)
                value /= self.accelerator.num_processes
        stats = {k: float(v.float().cpu()) for k, v in stats.items()}
        stats["objective/kl_coef"] = float(self.kl_ctl.value)
        for name, seqs in (("queries", queries), ("responses", responses)):
            lens = torch.tensor([len(s) for s in seqs], dtype=torch.float)
            stats[f"tokens/{name}_len_mean"], stats[f"tokens/{name}_len_std"] = lens.mean().item(), lens.std().item()
        return stats


def make_trainer(recipe: Recipe, model, tokenizer, deepspeed=None) -> PPOTrainer:
    """The PPO trainer for a recipe's policy (see build_trainer)."""
    return build_trainer(recipe.ppo, model, tokenizer, recipe.run.seed, deepspeed)


def build_trainer(cfg: PPO, model, tokenizer, seed: int = 0, deepspeed=None) -> PPOTrainer:
    """The PPO trainer for `model` (a ValueHeadModel), with Adam over its trainable parameters
    at cfg.learning_rate, under accelerate (DDP, or DeepSpeed ZeRO-2 when the launcher says so).

    tokenizer: anything with pad_token_id and padding_side. deepspeed: the plugin from
    distributed.deepspeed_plugin, when launched with DeepSpeed. Gradient checkpointing is the
    non-reentrant kind, which needs no inputs that require grad and stays quiet in the no-grad
    scoring passes.
    """
    deepspeed = distributed.live_deepspeed(deepspeed)
    set_seed(seed)
    if cfg.gradient_checkpointing:
        compat.enable_checkpointing(model.pretrained_model)
        # the scoring passes need no KV cache (generation makes its own), and with one asked
        # for, every checkpointed pass logs that it is switched off
        model.pretrained_model.config.use_cache = False
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              **({"deepspeed_plugin": deepspeed} if deepspeed else {}))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    # every process passes the same way, even where one's kernels answered a probe otherwise
    # the full-distribution penalty needs every logit: its passes all pad, the gradient one too
    responses_only = cfg.kl_penalty != "full" and not distributed.any_process(not logits_from_last_hidden(model))
    unpacked = packing_problem(model) if cfg.pack_rows and responses_only else None
    if distributed.any_process(unpacked is not None) and unpacked is None:
        unpacked = "another process's probe found its rows could not be packed, and every process passes alike"
    pack_rows = cfg.pack_rows and responses_only and unpacked is None
    text = model.pretrained_model.config.get_text_config()
    # attention over a packed row of C tokens costs about C / 6d of the linear layers' time at
    # width d: rows up to d / 3 wide keep it near 5% (and never shorter than the longest sequence).
    # Eager attention also keeps each row's C x C scores for the backward pass: there, rows no
    # wider than the padded ones (0: the pass's own padded width)
    pack_width = 0 if getattr(text, "_attn_implementation", None) == "eager" else text.hidden_size // 3
    passes = Passes(chunk=cfg.mini_batch_size, encoder_decoder=model.is_encoder_decoder,
                    responses_only=responses_only, pack_rows=pack_rows, pack_width=pack_width,
                    length_buckets=cfg.length_buckets, entropy_grad=cfg.entropy_coef > 0)
    kl_ctl = (maths.AdaptiveKL(cfg.init_kl_coef, cfg.target, cfg.horizon) if cfg.adap_kl_ctrl
              else maths.FixedKL(cfg.init_kl_coef))
    return PPOTrainer(cfg, prepared, tokenizer, accelerator, optimizer, kl_ctl, passes, cfg.gradient_checkpointing,
                      model_params=[p for p in prepared.parameters() if p.requires_grad],
                      unpacked=unpacked)


def ppo_step(trainer: PPOTrainer, queries: list[torch.Tensor], responses: list[torch.Tensor],
             rewards: list[float]) -> dict[str, float]:
    """One PPO update (PPOTrainer.step) on this process's samples, moved to its device."""
    device = trainer.accelerator.device
    return trainer.step([q.to(device) for q in queries], [r.to(device) for r in responses], rewards)


def step_is_finite(trainer: PPOTrainer, stats: dict[str, float]) -> bool:
    """False if the step produced a non-finite loss or left a non-finite trainable parameter.

    A few fused passes and one device sync: 0 * x is 0 for a finite x and NaN otherwise, and
    the sum of those magnitudes is NaN exactly when some element is not finite, whatever a
    max-norm kernel does with NaN, and without the overflow a 2-norm of large values risks.
    """
    if not all(np.isfinite(v) for k, v in stats.items() if k.startswith("ppo/loss/")):
        return False
    zeros = torch._foreach_mul([p.detach() for p in trainer.model.parameters() if p.requires_grad], 0.0)
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(zeros, norm_type=1.0)))
