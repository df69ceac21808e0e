"""PPO's forward passes over query + response: each response token's log-probability under
the policy (or the adapters-off reference), its value, and optionally its entropy.

Three ways to the same numbers, chosen once per run (see make_trainer):
- padded: every row padded to the batch's longest, the LM head at every position (TRL 0.11.4's
  pass, and the only one for encoder-decoders and the full-distribution KL penalty);
- response-only: the LM head, softmax and entropy at the response tokens alone, read from the
  value head's input (where a start-up probe finds the model's logits are its LM head of the
  last hidden state): log-probs and values bit for bit the padded pass's;
- packed (ppo.pack_rows): the response-only pass over rows laid end to end, each sequence at
  positions of its own, so that no padding is computed (where a probe finds packed sequences
  kept apart): equal to the last bits, the policy's and the reference's alike.
Every pass runs in chunks of ppo.mini_batch_size rows and returns (b, L - 1) tensors: position t
predicts token t + 1.
"""
from __future__ import annotations

import dataclasses

import torch

from ..components import token_scores
from . import maths
from .probes import last_hidden, packed_forward


@dataclasses.dataclass(frozen=True)
class Batch:
    """Queries and responses padded into one batch of model inputs (Batch.make)."""

    inputs: dict[str, torch.Tensor]
    """input_ids and attention_mask (b, L); for an encoder-decoder also decoder_input_ids and
    decoder_attention_mask (b, L'), the response being the decoder's input."""
    query_lens: torch.Tensor
    response_lens: torch.Tensor

    @property
    def lengths(self) -> list[int]:
        return (self.query_lens + self.response_lens).tolist()

    def rows(self, index) -> "Batch":
        """The rows at `index` (a slice or a tensor or array of row numbers)."""
        return Batch({k: v[index] for k, v in self.inputs.items()}, self.query_lens[index], self.response_lens[index])


@dataclasses.dataclass(frozen=True)
class Passes:
    """How this run's passes go: fixed once the start-up probes have run."""

    chunk: int
    """Rows per forward call (ppo.mini_batch_size)."""
    encoder_decoder: bool = False
    responses_only: bool = False
    pack_rows: bool = False
    pack_width: int = 0
    """A packed row's width in tokens; 0: the pass's own padded width."""
    length_buckets: int = 1
    entropy_grad: bool = False
    """Whether the entropies carry gradients (ppo.entropy_coef > 0), or are only a statistic."""


def score(model, batch: Batch, passes: Passes, extra: str | None = None) -> tuple[torch.Tensor, ...]:
    """(logprobs, extra, values, mask), each (b, L - 1) but extra: None; "entropy", each
    response token's entropy (b, L - 1); or "logits", (b, L - 1, V) for the full KL penalty.

    The model's train/eval mode is the caller's; gradients flow where autograd is on.
    """
    if extra == "logits" or not passes.responses_only:
        return _padded(model, batch, passes, extra)
    buckets = 1 if passes.pack_rows else passes.length_buckets
    if buckets > 1 and not bool(batch.inputs["attention_mask"][:, 0].all()):
        buckets = 1  # trimming on the left would move every token: right padding only
    parts, orders = [], []
    for start in range(0, len(batch.query_lens), passes.chunk):
        chunk = slice(start, start + passes.chunk)
        if buckets == 1:
            parts.append(_responses(model, batch.rows(chunk), passes, extra))
            continue
        rows = sorted(range(start, min(start + passes.chunk, len(batch.query_lens))), key=batch.lengths.__getitem__)
        size = -(-len(rows) // buckets)
        for k in range(0, len(rows), size):  # rows of similar length, trimmed to their longest
            group = torch.tensor(rows[k:k + size], device=batch.query_lens.device)
            width = max(batch.lengths[i] for i in rows[k:k + size])
            part = Batch({key: v[group, :width] for key, v in batch.inputs.items()}, batch.query_lens[group],
                         batch.response_lens[group])
            parts.append(_responses(model, part, passes, extra))
            orders.append(group)
    width = batch.inputs["input_ids"].shape[1] - 1
    order = torch.cat(orders).argsort() if orders else slice(None)
    return tuple(None if parts[0][n] is None else
                 torch.cat([token_scores.widen(part[n], width) for part in parts])[order] for n in range(4))


def mask_of(batch: Batch, encoder_decoder: bool) -> torch.Tensor:
    """(b, L - 1): 1 where position t predicts a response token. An encoder-decoder's response is
    scored from its first generated token on (TRL 0.11.4 left that token out: on the seq2seq
    quickstart it carried most of the KL, which the controller then never saw)."""
    if encoder_decoder:  # position t (a real token) predicts the real token t + 1
        decoder = batch.inputs["decoder_attention_mask"]
        return decoder[:, 1:] * decoder[:, :-1]
    return token_scores.response_mask(batch.inputs["attention_mask"], batch.query_lens, batch.response_lens)


def _padded(model, batch: Batch, passes: Passes, extra: str | None) -> tuple[torch.Tensor, ...]:
    """The pass over padded rows, the LM head at every position."""
    labels = batch.inputs["decoder_input_ids" if passes.encoder_decoder else "input_ids"][:, 1:]
    logprobs, extras, values = [], [], []
    for start in range(0, len(batch.query_lens), passes.chunk):
        chunk = slice(start, start + passes.chunk)
        logits, _, value = model(**{k: v[chunk] for k, v in batch.inputs.items()})
        logprobs.append(maths.gather_logprobs(logits[:, :-1], labels[chunk]))
        values.append(value[:, :-1])
        if extra == "logits":
            extras.append(logits[:, :-1])
        elif extra == "entropy":
            with torch.set_grad_enabled(torch.is_grad_enabled() and passes.entropy_grad):
                extras.append(maths.entropy(logits[:, :-1]))
    mask = mask_of(batch, passes.encoder_decoder)
    return torch.cat(logprobs), torch.cat(extras) if extras else None, torch.cat(values), mask


def _responses(model, batch: Batch, passes: Passes, extra: str | None) -> tuple[torch.Tensor, ...]:
    """One forward call over `batch`'s rows, the LM head at the response tokens only, packed if
    passes.pack_rows. `model` may be wrapped (DDP, DeepSpeed): it is called as it is, for the
    wrapper's gradient hooks, and read through."""
    mask = mask_of(batch, False)
    picked = mask.bool()
    inner = model
    while hasattr(inner, "module"):  # DDP's and DeepSpeed's wrappers keep the model as .module
        inner = inner.module
    with last_hidden(inner) as hidden:  # the value head's input: the LM head's too
        if passes.pack_rows:
            capacity = passes.pack_width or batch.inputs["input_ids"].shape[1]
            (_, _, values), index = packed_forward(model, batch.inputs, batch.lengths, capacity)
            index = index[:, :-1]  # masked positions of values point at some other token's value
            values, states = values.flatten()[index], hidden[0].flatten(0, 1)[index[picked]]
        else:
            _, _, values = model(**batch.inputs, logits_to_keep=1)
            values, states = values[:, :-1], hidden[0][:, :-1][picked]
    lm_head = inner.pretrained_model.get_output_embeddings()
    logits = lm_head(states.to(lm_head.weight.device)).float()
    labels = batch.inputs["input_ids"][:, 1:][picked].to(logits.device)
    logprobs = token_scores.scatter(maths.gather_logprobs(logits, labels).to(mask.device), mask)
    entropies = None
    if extra == "entropy":  # a statistic, unless the entropy bonus puts it in the loss
        with torch.set_grad_enabled(torch.is_grad_enabled() and passes.entropy_grad):
            entropies = token_scores.scatter(maths.entropy(logits).to(mask.device), mask)
    return logprobs, entropies, values, mask
