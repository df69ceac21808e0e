"""PPO through TRL 0.11.4's classic PPOTrainer: the value head on the policy's backbone, the
trainer (with rlhf_recipes' changes to its step, see _PPOTrainer) and one step of it."""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
from trl import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer
from trl.core import PPODecorators, entropy_from_logits, masked_mean

from ..components import compat, token_scores
from ..components.seq2seq import is_encoder_decoder
from ..config.sections import Recipe
from ..runtime import distributed
from .probes import last_hidden, logits_from_last_hidden, packed_forward, packs_rows


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
    """TRL's PPOTrainer with five changes to its step; the first two are off unless a recipe asks.

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
       tokens only, not at every prompt and padding position (rlhf_recipes.components.token_scores), and
       the masks and per-token rewards are built without a loop over rows. Unpacked (5), each
       pass's log-probs, values and masks are TRL's bit for bit (tested); a step's statistics
       and updates agree to the last bits, as the gradient sums over fewer rows round otherwise
       on some CPUs (an AMD EPYC; not the Intel Xeon) and may on a GPU. The policy's and the
       reference's passes stay alike, so the KL is still exactly 0 before the first update. Where the model's logits are not its
       LM head of the last hidden state, or its forward takes no logits_to_keep (checked once,
       in make_trainer), or for a full-distribution KL penalty, TRL's own pass runs.
       ppo.length_buckets > 1 also splits each pass by response length (see _response_pass).
    5. Those passes lay their rows end to end (ppo.pack_rows, on unless a recipe says false):
       no padding is computed, and each sequence has positions of its own. Where the start-up
       check (probes.packs_rows) finds that the model lets packed rows see each other, they pad
       as TRL does. The numbers move in their last bits, the policy's and reference's alike.
    """

    entropy_coef: float = 0.0
    checkpointing: bool = False
    responses_only: bool = False
    length_buckets: int = 1
    pack_rows: bool = False
    pack_width: int = 0

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
        With ppo.pack_rows, each chunk of mini_batch_size rows runs packed (token_scores.pack).
        With ppo.length_buckets > 1, each chunk runs as that many passes over rows of similar
        length, trimmed to their longest (right padding only: no position ids are passed, so
        trimming on the left would move every token)."""
        model.eval()
        wrapper = self.accelerator.unwrap_model(model)
        device = model_inputs["input_ids"].device
        query_lens = torch.tensor([len(q) for q in queries], device=device)
        response_lens = torch.tensor([len(r) for r in responses], device=device)
        lengths = [len(q) + len(r) for q, r in zip(queries, responses)]
        buckets = 1 if self.pack_rows else self.length_buckets
        if buckets > 1 and not bool(model_inputs["attention_mask"][:, 0].all()):
            buckets = 1
        parts: list[tuple] = []
        for start in range(0, len(queries), self.config.mini_batch_size):
            if buckets == 1:  # TRL's chunk, as it is
                rows = slice(start, start + self.config.mini_batch_size)
                inputs = {key: value[rows] for key, value in model_inputs.items()}
                parts.append(self._score(model, wrapper, inputs, query_lens[rows], response_lens[rows], return_logits,
                                         lengths[rows] if self.pack_rows else None))
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

    def _score(self, model, wrapper, inputs, query_lens, response_lens, return_logits, packed_lengths=None):
        """One forward pass: (logprobs, entropies or None, values, masks), each (n, w - 1). Given
        each row's length (ppo.pack_rows), over the rows laid end to end (token_scores.pack)."""
        mask = token_scores.response_mask(inputs["attention_mask"], query_lens, response_lens)
        picked = mask.bool()
        with last_hidden(wrapper) as hidden:  # the value head's input: the LM head's too
            if packed_lengths is None:
                _, _, values = model(**inputs, logits_to_keep=1)
                values, states = values[:, :-1], hidden[0][:, :-1][picked]
            else:
                capacity = self.pack_width or inputs["input_ids"].shape[1]
                (_, _, values), index = packed_forward(model, inputs, packed_lengths, capacity)
                index = index[:, :-1]  # masked positions of values point at some other token's value
                values, states = values.flatten()[index], hidden[0].flatten(0, 1)[index[picked]]
        lm_head = wrapper.pretrained_model.get_output_embeddings()
        logits = lm_head(states.to(lm_head.weight.device)).float()
        labels = inputs["input_ids"][:, 1:][picked].to(logits.device)
        logprobs = token_scores.scatter(token_scores.token_logprobs(logits, labels).to(mask.device), mask)
        entropies = None
        if return_logits:  # only the statistic needs it, unless the entropy bonus is in the loss
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.entropy_coef)):
                entropies = token_scores.scatter(token_scores.entropy(logits).to(mask.device), mask)
        return logprobs, entropies, values, mask

    def compute_rewards(self, scores, logprobs, ref_logprobs, masks):
        """TRL's per-token rewards (the KL penalty, plus the score at each response's last token),
        for the whole batch at once instead of row by row."""
        if self.config.kl_penalty == "full":
            return super().compute_rewards(scores, logprobs, ref_logprobs, masks)
        if not bool(masks.any(dim=1).all()):  # TRL's row loop fails on such a row; the score would be lost here
            raise ValueError("a response has no scored token: every response needs at least one")
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
    length_buckets, pack_rows = fields.pop("length_buckets"), fields.pop("pack_rows")
    if checkpointing:
        compat.enable_checkpointing(model.pretrained_model)
        # TRL's scoring passes need no KV cache (generation sets its own), and with one asked for,
        # every checkpointed pass logs that it is switched off
        model.pretrained_model.config.use_cache = False
    config = PPOConfig(**fields, gradient_checkpointing=False, seed=recipe.run.seed, exp_name=recipe.name,
                       steps=recipe.run.steps * recipe.ppo.batch_size, log_with=None,
                       accelerator_kwargs={"deepspeed_plugin": deepspeed} if deepspeed else {})
    trainer = _PPOTrainer(config, model=model, ref_model=None, tokenizer=tokenizer)
    trainer.entropy_coef, trainer.checkpointing, trainer.length_buckets = entropy_coef, checkpointing, length_buckets
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    # every process passes the same way, even where one's kernels answered a probe otherwise
    trainer.responses_only = not distributed.any_process(not logits_from_last_hidden(unwrapped))
    trainer.pack_rows = pack_rows and trainer.responses_only and not distributed.any_process(not packs_rows(unwrapped))
    text = unwrapped.pretrained_model.config.get_text_config()
    # attention over a packed row of C tokens costs about C / 6d of the linear layers' time at
    # width d: rows up to d / 3 wide keep it near 5% (and never shorter than the longest sequence).
    # Eager attention also keeps each row's C x C scores for the backward pass: there, rows no
    # wider than TRL's padded ones (0: the pass's own padded width)
    trainer.pack_width = 0 if getattr(text, "_attn_implementation", None) == "eager" else text.hidden_size // 3
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
