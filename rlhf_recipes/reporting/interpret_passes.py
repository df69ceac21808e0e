"""The forward passes and maths behind rlhf_recipes.interpret: where each supported architecture
keeps its blocks (ARCHS), hooked and patched forwards of the policy and its reference, and
direct logit attribution with the final norm's scale frozen. Plain PyTorch hooks; tensor shapes
in the docstrings."""
from __future__ import annotations

import torch

from ..components.seq2seq import is_encoder_decoder
from ..config.sections import RecipeError

# Module paths inside the transformers model (the same on 4.57 and 5.x; under PEFT these modules
# are the LoRA wrappers, whose forward includes the adapter). The embeddings are not named: the
# residual entering the first block is them (token + position where there is one).
ARCHS = {
    "gpt2": dict(layers="transformer.h", attn="attn", mlp="mlp", o_proj="attn.c_proj", final_norm="transformer.ln_f"),
    "gpt_neo": dict(layers="transformer.h", attn="attn", mlp="mlp", o_proj="attn.attention.out_proj",
                    final_norm="transformer.ln_f"),
    "gpt_neox": dict(layers="gpt_neox.layers", attn="attention", mlp="mlp", o_proj="attention.dense",
                     final_norm="gpt_neox.final_layer_norm"),  # parallel residual: both read the block input
    "llama": dict(layers="model.layers", attn="self_attn", mlp="mlp", o_proj="self_attn.o_proj",
                  final_norm="model.norm"),  # RMSNorm; grouped-query: o_proj still reads all query heads
}
QUANTIZED = ("Linear8bitLt", "Linear4bit")


# ---------------------------------------------------------------------------- pure maths
def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row. logp, logq (..., V) log-probs -> (...)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def contrast(vocab: int, up: list[int], down: list[int]) -> torch.Tensor:
    """c (V,): +1/len(up) on `up`, -1/len(down) on `down`; logits . c is a logit difference of means,
    blind to a shift of all logits (which changes no probability)."""
    c = torch.zeros(vocab)  # index_add_, not c[up] +=: a token given twice counts twice
    c.index_add_(0, torch.tensor(up), torch.full((len(up),), 1.0 / len(up)))
    return c.index_add_(0, torch.tensor(down), torch.full((len(down),), -1.0 / len(down)))


def frozen_norm(parts: torch.Tensor, final: torch.Tensor, gamma: torch.Tensor, u: torch.Tensor, eps: float,
                rms: bool) -> torch.Tensor:
    """Each part's share of m through the final norm with its scale frozen at the full residual's.

    parts (N, C, d) add up to final (N, d); gamma, u (d,) -> (N, C). LayerNorm: (x_c - mean x_c) /
    sigma(final) * gamma . u; RMSNorm: x_c / rms(final) * gamma . u. Linear in each part, so the
    shares plus the bias term (beta . u + b_U . c) are m exactly.
    """
    if rms:
        scale = final.pow(2).mean(-1).add(eps).sqrt()
    else:
        parts = parts - parts.mean(-1, keepdim=True)
        scale = final.var(-1, unbiased=False).add(eps).sqrt()
    return (parts / scale[:, None, None]) @ (gamma * u)


def position_stats(values: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, width: int) -> tuple:
    """Per response position: the sum of `values` over samples and how many samples reach it.

    values, mask (B, T); start (B,) the column of each row's first response token -> two (width,)."""
    rel = torch.arange(values.shape[1], device=values.device)[None] - start[:, None]
    keep = mask.bool() & (rel >= 0) & (rel < width)
    sums = torch.zeros(width, device=values.device).index_add_(0, rel[keep], values[keep].float())
    return sums, torch.bincount(rel[keep], minlength=width).float()


# ---------------------------------------------------------------------------- the model
def check_model(policy) -> tuple[dict, object, object]:
    """(ARCHS row, the PeftModel, the transformers model inside it), or a one-line refusal."""
    if is_encoder_decoder(policy):
        raise RecipeError("interpret: encoder-decoder policies (T5, BART) are not supported; it reads one "
                          "causal residual stream")
    peft = getattr(policy, "pretrained_model", policy)  # the value-head wrapper, or the PeftModel itself
    if not hasattr(peft, "disable_adapter"):
        raise RecipeError("interpret: the policy has no PEFT adapters, so no reference (its adapters off) to compare")
    base = peft.get_base_model()
    kind = base.config.model_type
    if kind not in ARCHS:
        raise RecipeError(f"interpret: model type {kind!r} is not supported; supported: {', '.join(ARCHS)}")
    return ARCHS[kind], peft, base


def hooked_forward(peft, base, arch: dict, ids, mask, last) -> dict:
    """One forward, recording at each prompt's last position the residual entering block 0, each
    attention and MLP output, the raw final residual (a pre-hook on the final norm: hidden_states[-1]
    is already normed), the logits and the last query's attention; o_proj's input z at every position;
    and the first prompt's whole attention. Eager attention modules return their weights without
    output_attentions, which would keep every layer's (N, H, T, T) map."""
    layers, rows, cap = base.get_submodule(arch["layers"]), torch.arange(len(ids)), {}
    at_last = lambda t: t[rows, last].float()  # noqa: E731

    def keep(key, i=0):
        def hook(module, args, *rest):  # pre-hooks get (args, kwargs), forward hooks (args, output)
            if key in ("embed", "final", "z"):
                x = args[0] if args else rest[0]["hidden_states"]
                cap.setdefault(key, {})[i] = x if key == "z" else at_last(x)
            elif key == "attn":
                if rest[0][1] is None:
                    raise RecipeError(f"interpret: {type(module).__name__} returned no attention weights in eager mode")
                cap.setdefault(key, {})[i] = at_last(rest[0][0])
                cap.setdefault("pattern", {})[i] = rest[0][1][rows, :, last].float()
                cap.setdefault("pattern0", {})[i] = rest[0][1][0].float()
            else:
                cap.setdefault(key, {})[i] = at_last(rest[0])
        return hook

    hooks = [layers[0].register_forward_pre_hook(keep("embed"), with_kwargs=True),
             base.get_submodule(arch["final_norm"]).register_forward_pre_hook(keep("final"), with_kwargs=True)]
    for i, layer in enumerate(layers):
        hooks += [layer.get_submodule(arch["attn"]).register_forward_hook(keep("attn", i)),
                  layer.get_submodule(arch["mlp"]).register_forward_hook(keep("mlp", i)),
                  layer.get_submodule(arch["o_proj"]).register_forward_pre_hook(keep("z", i), with_kwargs=True)]
    try:
        logits = peft(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in hooks:
            h.remove()
    by_layer = lambda key: [cap[key][i] for i in range(len(layers))]  # noqa: E731
    return {"embed": cap["embed"][0], "final": cap["final"][0], "logits": at_last(logits),
            "attn": torch.stack(by_layer("attn"), 1), "mlp": torch.stack(by_layer("mlp"), 1),
            **{key: by_layer(key) for key in ("z", "pattern", "pattern0")}}


def patched_forward(peft, base, arch: dict, ids, mask, last, patches: dict) -> torch.Tensor:
    """The final-position logits (N, V) with heads' z replaced at every position: patches
    {layer: (z_source (N, T, H*dh), [head, ...])}."""
    layers, heads = base.get_submodule(arch["layers"]), base.config.num_attention_heads

    def hook(source, chosen):
        def swap(module, args):
            z, dh = args[0].clone(), args[0].shape[-1] // heads
            for h in chosen:
                z[..., h * dh:(h + 1) * dh] = source[..., h * dh:(h + 1) * dh]
            return (z, *args[1:])
        return swap

    hooks = [layers[i].get_submodule(arch["o_proj"]).register_forward_pre_hook(hook(*p)) for i, p in patches.items()]
    try:
        return peft(input_ids=ids, attention_mask=mask).logits[torch.arange(len(ids)), last].float()
    finally:
        for h in hooks:
            h.remove()


def unembed(head, c: torch.Tensor, width: int, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(u, b): logits . c = x . u + b for the unembedding as it runs (LoRA on it included, GPT-2's tied
    to wte), as a vector-Jacobian product: no (V, d) matrix is built."""
    with torch.enable_grad():
        x = torch.zeros(width, dtype=like.dtype, device=like.device, requires_grad=True)
        y = head(x).float() @ c.to(like.device)
        (u,) = torch.autograd.grad(y, x)
    return u.float(), float(y)


def decompose(base, arch: dict, cap: dict, c: torch.Tensor) -> dict:
    """m and its parts for one model, in its adapter state: logit lens, component and per-head DLA."""
    norm, head = base.get_submodule(arch["final_norm"]), base.get_output_embeddings()
    layers = base.get_submodule(arch["layers"])
    final, d, dt = cap["final"], cap["final"].shape[-1], next(head.parameters())
    u, b_u = unembed(head, c, d, dt)
    rms, eps = not isinstance(norm, torch.nn.LayerNorm), getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    gamma = norm.weight.float()
    bias = b_u + (float(norm.bias.float() @ u) if getattr(norm, "bias", None) is not None else 0.0)
    parts = torch.cat([cap["embed"][:, None], torch.stack([cap["attn"], cap["mlp"]], 2).flatten(1, 2)], 1)
    dla = frozen_norm(parts, final, gamma, u, eps, rms)  # (N, 1 + 2L): embed, attn 0, mlp 0, ...
    m = cap["logits"] @ c.to(final.device)
    gap = (dla.sum(1) + bias - m).abs().max()
    if dt.dtype == torch.float32 and gap > 1e-4 * max(1.0, float(dla.abs().sum(1).max())):  # in float32 it is exact
        raise RuntimeError(f"interpret: the parts miss m by {gap:.3g}: {base.config.model_type}'s residual stream "
                           "is not the sum ARCHS assumes")
    resid = torch.cat([cap["embed"][:, None], cap["embed"][:, None] + parts[:, 1:].cumsum(1)[:, 1::2]], 1)
    lens_kl, lens_m = logit_lens(head, norm, resid.to(dt.dtype), cap["logits"], c)
    per_head, o_bias, heads = [], [], base.config.num_attention_heads
    for i, layer in enumerate(layers):
        o, z = layer.get_submodule(arch["o_proj"]), cap["z"][i][torch.arange(len(final)), cap["last"]]
        only = torch.eye(heads, device=z.device).repeat_interleave(z.shape[-1] // heads, 1)  # (H, H*dh)
        zero = o(torch.zeros_like(z[:1])).float()  # o(0): the bias, given once rather than to every head
        per_head.append(frozen_norm(o(z[:, None] * only.to(z.dtype)).float() - zero, final, gamma, u, eps, rms))
        o_bias.append(frozen_norm(zero.expand(len(z), -1)[:, None], final, gamma, u, eps, rms)[:, 0])
    return {"m": m, "dla": dla, "bias": bias, "gap": float(gap), "lens_kl": lens_kl, "lens_m": lens_m,
            "heads": torch.stack(per_head, 1), "o_bias": torch.stack(o_bias, 1)}


LENS_ELEMENTS = 2 ** 25
"""The most logit-lens logits held at once (128 MB in fp32): the whole lens, prompts x layers x
vocabulary, is about 4 GB a copy for Llama-3-8B on 256 prompts, and log-softmax makes more."""


def logit_lens(head, norm, resid: torch.Tensor, logits: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(KL(final || lens), lens . c), each (N, L + 1): the output head read at the residual after the
    embeddings and after each block. resid (N, L + 1, d), logits (N, V) the final ones, c (V,).

    Computed a few prompts at a time (at most LENS_ELEMENTS logits at once), so that memory does
    not grow with the number of prompts."""
    rows = max(1, LENS_ELEMENTS // (resid.shape[1] * logits.shape[-1]))
    kl, along = [], []
    for s in range(0, len(resid), rows):
        lens = head(norm(resid[s:s + rows])).float()  # (rows, L + 1, V)
        kl.append(kl_rows(logits[s:s + rows].log_softmax(-1)[:, None], lens.log_softmax(-1)))
        along.append(lens @ c.to(lens.device))
        del lens
    return torch.cat(kl), torch.cat(along)


def token_ids(tokenizer, entries: list[str], flag: str, notes: list) -> list[int]:
    """The first token of each entry (said so in `notes` when an entry has several)."""
    ids = []
    for entry in entries:
        pieces = tokenizer(entry, add_special_tokens=False).input_ids
        if not pieces:
            raise RecipeError(f"interpret: {flag} entry {entry!r} tokenizes to nothing; give words")
        if len(pieces) > 1:
            notes.append(f"{flag} {entry!r} is {len(pieces)} tokens; its first, {tokenizer.decode(pieces[:1])!r}, "
                         "is used")
        ids.append(pieces[0])
    return ids


def chunks(fn, ids, mask, last, size: int, device) -> list:
    return [fn(ids[s:s + size].to(device), mask[s:s + size].to(device), last[s:s + size].to(device), slice(s, s + size))
            for s in range(0, len(ids), size)]


def merge(chunks: list[dict]) -> dict:
    """Captures of row chunks as one (prompts padded together, so the widths agree)."""
    return {k: v if k == "pattern0" else [torch.cat(x) for x in zip(*(c[k] for c in chunks))] if isinstance(v, list)
            else torch.cat([c[k] for c in chunks]) for k, v in chunks[0].items()}
