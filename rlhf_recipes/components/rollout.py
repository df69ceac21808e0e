"""Sampling responses from the policy: batched, plain sampling, per-sample lengths."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
from transformers import CompileConfig, GenerationConfig

from . import compat
from ..config.sections import Generation
from .seq2seq import is_encoder_decoder


def pad_batch(seqs: list[torch.Tensor], pad_id: int, side: str = "left",
              multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token tensors, padded on `side`.

    seqs: n tensors of shape (len_i,) -> (input_ids, attention_mask), both (n, W), W the
    longest len_i rounded up to a multiple of `multiple`.
    Left for generation (continue from the right end); right for scoring, so that with
    no position ids every token sits at the position it had when sampled.
    """
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = s
        mask[i, cols] = 1
    return ids, mask


def cut_response(tokens: torch.Tensor, length: int, ends: Sequence[int] = (), keep: int = 0) -> torch.Tensor:
    """The first `length` generated tokens, ending at the first end token (kept), after `keep`
    leading tokens that are not generated (a decoder's start token, and a BART's forced BOS:
    never cut from the left).

    tokens: (keep + max_new_tokens,) -> (keep + <= length,). ends: every id that ends a
    response (end_ids). Cutting a longer sample is exactly a sample of that length, so one
    generate call serves prompts with different target lengths.
    """
    head, tokens = tokens[:keep], tokens[keep:keep + length]
    if len(ends):
        hits = torch.isin(tokens, torch.tensor(list(ends), dtype=tokens.dtype)).nonzero()
        if len(hits):
            tokens = tokens[: int(hits[0]) + 1]
    return torch.cat([head, tokens])


def end_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a response: the tokenizer's EOS and each end token the model's own
    generation config names. An instruct model ends its turn with one of its own (<|im_end|>,
    <|eot_id|>, <end_of_turn>, <|end|>), often not the tokenizer's EOS; sampling from a blank
    config (no_model_defaults) would otherwise run past it, and reward, KL and PPO score the
    text after the turn."""
    named = _base(model).generation_config.eos_token_id
    ids = [tokenizer.eos_token_id, *(named if isinstance(named, (list, tuple)) else [named])]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def forced_bos_id(model) -> int | None:
    """The token a BART-family encoder-decoder is made to write first (its generation config's
    forced_bos_token_id); None for T5 and for causal LMs."""
    if not is_encoder_decoder(model):
        return None
    base = _base(model)
    forced = getattr(base.generation_config, "forced_bos_token_id", None)
    return forced if forced is not None else getattr(base.config, "forced_bos_token_id", None)


def sampling_config(gen: Generation, max_new_tokens: int, tokenizer, model=None) -> GenerationConfig:
    """Plain sampling, built from scratch so that no model's generation_config (repetition
    penalties, no_repeat_ngram_size, min lengths) can leak in and bias the KL. From `model` it
    takes only what ends a response and how an encoder-decoder starts one: its end tokens, its
    decoder start token and a forced first token (BART's BOS)."""
    config = GenerationConfig(do_sample=True, top_k=gen.top_k, top_p=gen.top_p, temperature=gen.temperature,
                              max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id if model is None else end_ids(model, tokenizer),
                              bos_token_id=tokenizer.bos_token_id)
    if model is not None and is_encoder_decoder(model):
        config.decoder_start_token_id = _base(model).config.decoder_start_token_id
        config.forced_bos_token_id = forced_bos_id(model)
    return config


def compiled_decoding(config: GenerationConfig) -> GenerationConfig:
    """`config` with transformers' static KV cache and its compiled decoding step (generation.compile).
    transformers compiles by itself only on accelerators; its own switch for other devices is
    the compile config's _compile_all_devices (private, the same on 4.57 and 5.x)."""
    config.cache_implementation = "static"
    config.compile_config = CompileConfig()  # transformers' defaults: CUDA graphs where there is CUDA
    config.compile_config._compile_all_devices = True
    return config


def compiles(model) -> bool:
    """Whether transformers can compile `model`'s decoding: not through bitsandbytes' 8-bit and
    4-bit layers (their quantizer says so), where generation.compile samples as usual."""
    quantizer = getattr(_base(model), "hf_quantizer", None)
    return quantizer is None or bool(getattr(quantizer, "is_compileable", False))


def _base(model):
    """The transformers model inside the value-head wrapper and PEFT's."""
    inner = getattr(model, "pretrained_model", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


@contextlib.contextmanager
def no_model_defaults(model):
    """The model's own generation_config blanked while inside: transformers fills every sampling
    field we leave unset from it (4.57 unless told use_model_defaults=False, 5.x always), and its
    repetition penalties, suppressed tokens or minimum lengths would bias the sampled KL."""
    base = _base(model)
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


@contextlib.contextmanager
def evaluating(model):
    """Eval mode (no dropout) and no gradients inside; the model's own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def generate(model, tokenizer, queries: list[torch.Tensor], lengths: list[int], gen: Generation,
             device: torch.device, done=None) -> list[torch.Tensor]:
    """One response per query, `lengths[i]` tokens at most, in batches of gen.batch_size;
    `done(n)`, if given, is told after each batch how many queries it held.

    Sampling is in eval mode: the PPO step leaves the model training, and in train mode dropout is
    live and gradient checkpointing drops the KV cache, so each token would see one token.
    """
    chunk = gen.batch_size or len(queries)
    responses: list[torch.Tensor] = []
    encoder_decoder = is_encoder_decoder(model)
    ends = end_ids(model, tokenizer)
    # what the decoder is given before it samples: its start token, and BART's forced BOS after it
    keep = (1 + (forced_bos_id(model) is not None)) if encoder_decoder else 0
    compiled = gen.compile and compiles(model)
    with evaluating(model):
        for start in range(0, len(queries), chunk):
            qs, ls = queries[start:start + chunk], lengths[start:start + chunk]
            # a causal LM continues from the right end; an encoder reads its whole input
            # compiled, a batch's shape is a compilation: few widths, and every batch to the longest length
            ids, mask = pad_batch(qs, tokenizer.pad_token_id, side="right" if encoder_decoder else "left",
                                  multiple=8 if compiled else 1)
            longest = (gen.response_max_tokens if compiled else max(ls)) + max(keep - 1, 0)  # BART's BOS on top
            config = sampling_config(gen, longest, tokenizer, model)
            if compiled:
                compiled_decoding(config)
            with no_model_defaults(model):
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)
            if compiled:
                compat.drop_static_cache(_base(model))
            # a decoder's output from its start token, which stays (PPO scores it as given); a causal
            # LM's continuation after the prompt
            new = out.cpu() if encoder_decoder else out[:, ids.shape[1]:].cpu()
            responses.extend(cut_response(row, n, ends, keep) for row, n in zip(new, ls))
            if done is not None:
                done(len(qs))
    return responses


def decode_pairs(tokenizer, queries: list[torch.Tensor], responses: list[torch.Tensor],
                 encoder_decoder: bool = False) -> tuple[list[str], list[str]]:
    """Prompt and response texts such that prompt + response is exactly the decoded whole.

    For an encoder-decoder policy the response is the decoder's text alone (no start token, no
    special tokens), and the prompt the encoder's text.

    The whole is split where it stops agreeing with the prompt decoded alone. Decoding the
    response alone would lose its leading space with SentencePiece-style tokenizers (Llama,
    Mistral); and a prompt cut inside a character that byte-level BPE spreads over several
    tokens (curly quotes, accents, emoji) decodes alone to a replacement character, so the
    whole does not start with it: the response then starts with that completed character,
    and never with the prompt.
    """
    prompts = tokenizer.batch_decode(queries, skip_special_tokens=True)
    if encoder_decoder:  # two texts; the prompt ends in a space, so prompt + response reads as one
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        return [p if p.endswith((" ", "\n")) else p + " " for p in prompts], [t.lstrip() for t in texts]
    wholes = tokenizer.batch_decode([torch.cat([q, r]) for q, r in zip(queries, responses)], skip_special_tokens=True)
    cuts = [len(os.path.commonprefix([p, w])) for p, w in zip(prompts, wholes)]
    return [w[:k] for w, k in zip(wholes, cuts)], [w[k:] for w, k in zip(wholes, cuts)]
