"""Reward and KL against the frozen reference, on held-out prompts: the evaluation every run
makes before, during and after training (the library part; rlhf_recipes.evaluation re-evaluates
a saved run with it).

For each held-out prompt, the reference (adapters off) and the policy each sample one
response with the same seed. Per sample: reward, sequence KL(policy || reference) on the
policy's samples, response length, distinct-1/2 and mean token entropy. Aggregates carry
95% confidence intervals; the improvement is paired by prompt, with a win rate.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random

import numpy as np
import torch

from ..components.reward import reward_inputs
from ..components.rollout import decode_pairs, evaluating, generate, pad_batch
from ..components.seq2seq import is_encoder_decoder
from ..config.recipe import resolve_callable
from ..config.sections import Recipe, RecipeError
from .console import StepDisplay
from .metrics import distinct_n, masked_mean, sequence_kl, summarize, token_entropy, token_logprobs, win_rate


KL_AT_START_TOLERANCE = 1e-6


class SanityCheckError(RecipeError):
    """Before any update the policy must be its reference; it is not."""


@torch.no_grad()
def score_responses(model, queries: list[torch.Tensor], responses: list[torch.Tensor], pad_id: int,
                    device: torch.device, batch_size: int, done=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: KL(policy || reference), the policy's and the reference's mean token entropy;
    `done(n)`, if given, is told after each batch how many samples it held.

    queries, responses: n 1-D token tensors -> three (n,) arrays.
    """
    peft_model = model.pretrained_model
    kl, ent, ref_ent = [], [], []
    for start in range(0, len(queries), batch_size):
        qs, rs = queries[start:start + batch_size], responses[start:start + batch_size]
        inputs, targets, mask = scoring_inputs(qs, rs, pad_id, device, is_encoder_decoder(model))
        logits = peft_model(**inputs).logits[:, :-1]  # logits at t predict token t + 1
        with peft_model.disable_adapter():
            ref_logits = peft_model(**inputs).logits[:, :-1]
        kl.append(sequence_kl(token_logprobs(logits, targets), token_logprobs(ref_logits, targets), mask))
        ent.append(masked_mean(token_entropy(logits), mask))
        ref_ent.append(masked_mean(token_entropy(ref_logits), mask))
        if done is not None:
            done(len(qs))
    return tuple(torch.cat(x).cpu().numpy() for x in (kl, ent, ref_ent))


def scoring_inputs(queries: list[torch.Tensor], responses: list[torch.Tensor], pad_id: int, device: torch.device,
                   encoder_decoder: bool) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(model kwargs, targets, mask) to score n responses: logits[:, :-1] at t predict targets[:, t].

    Causal: the query and response as one right-padded sequence; mask (n, T-1) marks response
    tokens. Encoder-decoder: the query is the encoder's input and the response (start token
    first) the decoder's; targets are the decoder tokens after the start, and the mask marks
    every generated one, the first included (TRL's training statistics skip that one).
    """
    if encoder_decoder:
        enc, enc_mask = pad_batch(queries, pad_id, side="right")
        dec, dec_mask = pad_batch(responses, pad_id, side="right")
        inputs = {"input_ids": enc, "attention_mask": enc_mask, "decoder_input_ids": dec,
                  "decoder_attention_mask": dec_mask}
        targets, mask = dec[:, 1:], dec_mask[:, 1:].float()
    else:
        ids, attn = pad_batch([torch.cat([q, r]) for q, r in zip(queries, responses)], pad_id, side="right")
        mask = torch.zeros_like(ids, dtype=torch.float32)
        for i, (q, r) in enumerate(zip(queries, responses)):
            mask[i, len(q):len(q) + len(r)] = 1.0
        inputs, targets, mask = {"input_ids": ids, "attention_mask": attn}, ids[:, 1:], mask[:, 1:]
    return {k: v.to(device) for k, v in inputs.items()}, targets.to(device), mask.to(device)


def evaluate(model, tokenizer, reward_fn, queries: list[torch.Tensor], recipe: Recipe, device: torch.device,
             step: int, check_reference: bool = False, label: str | None = None) -> dict:
    """One evaluation of the policy against its reference on `queries`: a JSON-able record.
    `label` names its progress bar ("eval at step N" by default).

    Runs in forked RNGs (torch, numpy, python: a reward function or judge may draw from
    them), so evaluating, or not, never changes the training run's samples.
    """
    saved = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), evaluating(model):
            return _evaluate(model, tokenizer, reward_fn, queries, recipe, device, step, check_reference,
                             label or f"eval at step {step}")
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def _evaluate(model, tokenizer, reward_fn, queries, recipe, device, step, check_reference, label) -> dict:
    ev, gen = recipe.eval, recipe.generation
    lengths = np.random.default_rng(ev.seed).integers(
        gen.response_min_tokens, gen.response_max_tokens + 1, size=len(queries)).tolist()
    gen = dataclasses.replace(gen, batch_size=ev.batch_size)
    judge = resolve_callable(ev.judge, "eval.judge") if ev.judge is not None else None
    sides = {}
    with StepDisplay(4 * len(queries), label=label, every=5.0) as display:
        progress = [0]  # samples generated or scored, both sides

        def done(n: int) -> None:
            progress[0] += n
            display.update(progress[0])

        for side, adapters in (("reference", model.pretrained_model.disable_adapter()),
                               ("policy", contextlib.nullcontext())):
            torch.manual_seed(ev.seed)  # same seed for both: identical models give identical samples
            with adapters:
                responses = generate(model, tokenizer, queries, lengths, gen, device, done)
            texts = decode_pairs(tokenizer, queries, responses, is_encoder_decoder(model))
            generated = [r[1:] for r in responses] if is_encoder_decoder(model) else responses  # no start token
            sides[side] = _per_sample(generated, *texts, reward_fn, judge, recipe)
            kl, ent, ref_ent = score_responses(model, queries, responses, tokenizer.pad_token_id, device,
                                               ev.batch_size, done)
            sides[side]["entropy"] = ent if side == "policy" else ref_ent
            if side == "policy":
                sides[side]["kl"] = kl
    return _record(sides, queries, recipe, judge, step, check_reference)


def _per_sample(responses, prompts, texts, reward_fn, judge, recipe) -> dict:
    """One side's texts and per-sample figures that need no model: reward, length, distinct-n, judge."""
    tokens = [r.tolist() for r in responses]
    out = {"prompts": prompts, "texts": texts, "tokens": tokens,
           "reward": np.asarray(reward_fn(reward_inputs(recipe.reward, prompts, texts)), dtype=float),
           "length": np.asarray([len(t) for t in tokens], dtype=float),
           "distinct_1": np.asarray([distinct_n([t], 1) for t in tokens]),
           "distinct_2": np.asarray([distinct_n([t], 2) for t in tokens])}
    if judge is not None:
        out["judged"] = np.asarray([float(bool(judge(t))) for t in texts])
    return out


def _record(sides: dict, queries, recipe: Recipe, judge, step: int, check_reference: bool) -> dict:
    """The JSON-able record of one evaluation, from both sides' samples."""
    ev = recipe.eval
    ref, pol = sides["reference"], sides["policy"]
    prompts = pol["prompts"]
    keys = ("reward", "kl", "length", "distinct_1", "distinct_2", "entropy", "judged")
    record = {
        "step": step, "num_prompts": len(queries),
        "reference": {k: summarize(ref[k]) for k in keys if k in ref},
        "policy": {k: summarize(pol[k]) for k in keys if k in pol},
        "judge": getattr(judge, "__name__", str(ev.judge)) if judge is not None else None,
        "reward_improvement": summarize(pol["reward"] - ref["reward"]),
        "win_rate": win_rate(pol["reward"], ref["reward"]),
        "corpus_distinct": {s: {f"distinct_{n}": distinct_n(sides[s]["tokens"], n) for n in (1, 2)} for s in sides},
        "per_sample": {"reference_reward": ref["reward"].tolist(), "policy_reward": pol["reward"].tolist(),
                       "kl": pol["kl"].tolist()},
        "samples": [{"prompt": p, "reference": r, "policy": q, "reference_reward": float(a),
                     "policy_reward": float(b), "kl": float(k)}
                    for p, r, q, a, b, k in zip(prompts, ref["texts"], pol["texts"], ref["reward"], pol["reward"],
                                                pol["kl"])][:recipe.run.sample_rows * 2],
    }
    if check_reference:
        worst = float(np.max(np.abs(pol["kl"]))) if len(pol["kl"]) else 0.0
        if worst > KL_AT_START_TOLERANCE:
            raise SanityCheckError(
                f"KL(policy || reference) before any update is {worst:.3g}, not 0: the policy is not its "
                "reference (dropout left on, adapters not starting at zero, or non-deterministic kernels); "
                "training against it would report false KL, so the run stops here")
    return record
