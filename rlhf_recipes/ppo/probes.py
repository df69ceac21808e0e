"""What a policy's forward pass does, checked once before PPO starts: whether the faster scoring
passes (rlhf_recipes.ppo.scoring) give this model's own numbers."""
from __future__ import annotations

import contextlib
import functools

import torch

from .. import quiet
from ..components import token_scores
from ..components.loading import first_line
from ..components.seq2seq import is_encoder_decoder


def _false_on_failure(probe):
    @functools.wraps(probe)
    def checked(model) -> bool:
        try:
            return probe(model)
        except Exception:  # noqa: BLE001 - any failure (a custom forward, a dtype or device mismatch): the plain pass
            return False
    return checked


@contextlib.contextmanager
def last_hidden(wrapper):
    """A one-item list that the block's forward pass fills with the value head's input (the
    last hidden state, (b, L, d))."""
    seen: list[torch.Tensor] = []
    handle = wrapper.v_head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


@_false_on_failure
def logits_from_last_hidden(model) -> bool:
    """Whether `model`'s logits are exactly its LM head applied to the last hidden state, with
    logits_to_keep accepted: what the response-only pass assumes. False for models that
    scale or cap their logits after the head (Gemma 2, Cohere, Granite), or whose forward takes
    no logits_to_keep."""
    if is_encoder_decoder(model.pretrained_model):
        return False
    ids = _probe_ids(model, 5)
    with _eval_mode(model), torch.no_grad(), last_hidden(model) as hidden:
        full, _, _ = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        last, _, _ = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        head = model.pretrained_model.get_output_embeddings()
        return (head is not None and last.shape[1] == 1
                and torch.equal(head(hidden[0].to(head.weight.device)).float(), full))


def packed_forward(model, inputs: dict, lengths: list[int], capacity: int):
    """The value-head model's (logits, loss, values) over `inputs`' rows laid end to end
    (token_scores.pack), with the index from each row's tokens to the packed ones."""
    ids, positions, index = token_scores.pack(inputs["input_ids"], inputs["attention_mask"], lengths, capacity)
    # transformers keeps packed sequences apart (from the position ids) only in a call with
    # neither an attention mask nor a KV cache, and a causal LM makes itself a cache unless told not to;
    # its advice to pass a mask, where a row ends in a pad-valued EOS, is for padded rows, not these
    with quiet.without_log("transformers.modeling_utils", "We strongly recommend passing in an `attention_mask`"):
        return model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1), index


LEAK = ("laid end to end, its rows would see each other (its forward does not keep packed sequences apart by "
        "their position ids)")


def packing_problem(model) -> str | None:
    """None where ppo.pack_rows can serve `model` (with its value head), else why not, in words.

    What packing must keep, checked on rows of 5, 3, 5 and 3 tokens packed into two rows of two
    sequences each (flash attention keeps packed sequences apart only in a batch of one row,
    which a one-row probe would not see):
    - the same packed rows give the same numbers to the bit on every pass, so that the policy's
      pass and the reference's (adapters off), the same model before the first update, agree and
      the KL is exactly 0;
    - nothing of one sequence reaches the one packed behind it, and each gets about the numbers
      it gets padded, alone in its row (a model that ignores position_ids, or builds its own
      causal mask without them, fails here).
    The second is checked to 2%, not to the bit: an 8-bit base (LLM.int8) picks its
    outlier columns over the whole batch, so a row's numbers move slightly with its neighbours,
    padded or packed alike (models from about 6.7B up have such outliers).
    """
    try:
        return _packing_problem(model)
    except Exception as err:  # noqa: BLE001 - a custom forward, a dtype or device mismatch: the padded pass
        return f"its forward fails on packed rows ({type(err).__name__}: {first_line(err)})"


def _packing_problem(model) -> str | None:
    lengths = [5, 3, 5, 3]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths], device=next(model.parameters()).device)

    def rows(shift: int) -> torch.Tensor:  # the 5-token rows move with shift, the 3-token ones stay
        return torch.cat([torch.nn.functional.pad(_probe_ids(model, n, start + shift * (n == 5)), (0, 5 - n))
                          for n, start in zip(lengths, (1, 2, 9, 20))])

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a.float(), b.float(), rtol=0.02, atol=0.02 * float(b.float().abs().max()))

    shorter = []  # the 3-token rows' states, packed each behind a 5-token row
    with _eval_mode(model), torch.no_grad(), last_hidden(model) as hidden:
        model(input_ids=rows(0), attention_mask=mask, logits_to_keep=1)  # padded on the right, as the padded pass does
        padded = hidden[0][1::2, :3]
        for shift in (0, 6):  # nothing of the 5-token rows may reach the 3-token rows packed behind them
            _, index = packed_forward(model, {"input_ids": rows(shift), "attention_mask": mask}, lengths, 8)
            shorter.append(hidden[-1].flatten(0, 1)[index[1::2, :3]])
        with model.pretrained_model.disable_adapter():  # the reference's pass, twice: at the start, the policy's too
            (reference, _, _), _ = packed_forward(model, {"input_ids": rows(6), "attention_mask": mask}, lengths, 8)
            (again, _, _), _ = packed_forward(model, {"input_ids": rows(6), "attention_mask": mask}, lengths, 8)
    if not close(shorter[0], shorter[1]):
        return LEAK
    if not close(shorter[0], padded):
        return "its packed rows do not get the numbers padded ones do (their positions are not their own)"
    if not torch.equal(reference, again):
        return ("two passes over the same packed rows differ (a kernel that is not deterministic), so the policy's "
                "and the reference's would not agree to the bit and the KL would not start at 0")
    return None


def _probe_ids(model, n: int, start: int = 1) -> torch.Tensor:
    """(1, n) token ids start, start + 1, ... within the vocabulary, on the model's device."""
    vocab = model.pretrained_model.config.get_text_config().vocab_size
    return (torch.arange(start, start + n) % vocab)[None].to(next(model.parameters()).device)


@contextlib.contextmanager
def _eval_mode(model):
    """`model` in eval mode, every module put back in its own mode after (the base loads in eval
    mode, the value-head wrapper in train mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
