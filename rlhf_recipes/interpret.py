"""What training changed inside the policy, against its reference (the same model, adapters off).

    python -m rlhf_recipes.interpret RUN_DIR [--top-k 10] [--heads 5] [--positive " great, good" --negative " bad"]

works on a finished PPO or DPO run and writes RUN_DIR/interpret/ (interpret.json and figures) and
a section of RUN_DIR/report.md; `analyse(policy, tokenizer, queries)` does the same on a policy in
memory and returns the record. On the run's held-out prompts, with plain PyTorch hooks:

1. Logit shift: the tokens whose log-probability rose and fell most, at the prompt's end and over
   the policy's own samples, and KL(policy || reference) by response position.
2. A contrast c over the vocabulary, picked by nobody: +1/k on the k tokens that rose most at the
   prompt's end, -1/k on the k that fell most (or on the user's tokens). m = final logits . c.
3. Logit lens (each layer's residual through the final norm and unembedding) and direct logit
   attribution of m to the embeddings and each attention and MLP output, the final norm's scale
   frozen per prompt, so that the parts sum to m exactly.
4. Heads: per-head attribution, activation patching of single heads (and of the best few together)
   from the policy into the reference, and how far each head's attention moved.

Causal models only, of the architectures in reporting.interpret_passes.ARCHS (where the passes
and the maths live). Costs one hooked forward per model on the prompts, two scoring passes over
the samples, and one reference forward per patched head.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .components.rollout import end_ids, evaluating, generate, pad_batch
from .config.sections import Generation, RecipeError
from .reporting.heldout import scoring_inputs
from .reporting.console import StepDisplay
from .reporting.interpret_passes import (QUANTIZED, check_model, chunks, contrast, decompose, hooked_forward,
                                         kl_rows, merge, patched_forward, position_stats, token_ids)
from .reporting.report import KEPT
from .cli import OneLineParser

OUT_DIR, (BEGIN, END) = "interpret", KEPT  # report.md keeps the section when it is rewritten


@torch.no_grad()
def response_shift(peft, queries: list, responses: list, pad_id: int, device, batch_size: int) -> dict:
    """On the policy's own samples, both models scoring them: per vocabulary token its mean share over
    response positions of KL(policy || reference), p (log p - log p_ref) ("rise", (V,): the tokens the
    policy now says), and of KL(reference || policy), p_ref (log p_ref - log p) ("fall": the tokens it
    stopped saying); a plain mean log-ratio would rank the rare tokens that every shift of the logits
    moves. Per response position (width,): KL(policy || reference) over the vocabulary ("kl") and the
    sampled log-ratio ("sampled", whose sum over positions is the evaluation's sequence KL), each
    averaged over the samples that reach it ("count")."""
    width = max(len(r) for r in responses)
    rise, fall, kl, sampled, count = 0.0, 0.0, torch.zeros(width, device=device), torch.zeros(width, device=device), 0.0
    for s in range(0, len(queries), batch_size):
        qs, rs = queries[s:s + batch_size], responses[s:s + batch_size]
        inputs, targets, mask = scoring_inputs(qs, rs, pad_id, device, False)
        lp = peft(**inputs).logits[:, :-1].float().log_softmax(-1)  # at t: the next token's distribution
        with peft.disable_adapter():
            lq = peft(**inputs).logits[:, :-1].float().log_softmax(-1)
        start = torch.tensor([len(q) - 1 for q in qs], device=device)
        rise = rise + (lp.exp() * (lp - lq) * mask[..., None]).sum((0, 1))
        fall = fall + (lq.exp() * (lq - lp) * mask[..., None]).sum((0, 1))
        k, n = position_stats(kl_rows(lp, lq), mask, start, width)
        x, _ = position_stats((lp - lq).gather(-1, targets[..., None])[..., 0], mask, start, width)
        kl, sampled, count = kl + k, sampled + x, count + n
    total = count.sum().clamp(min=1)
    return {"rise": rise / total, "fall": fall / total, "kl": kl / count.clamp(min=1),
            "sampled": sampled / count.clamp(min=1), "count": count}


@torch.no_grad()
def analyse(policy, tokenizer, queries: list[torch.Tensor], generation: Generation | None = None, seed: int = 1234,
            top_k: int = 10, heads: int = 5, positive: list[str] | None = None, negative: list[str] | None = None,
            patch_limit: int = 64, batch_size: int = 64) -> dict:
    """The record (JSON-able) of what the adapters change, on `queries` (causal prompts, no padding).

    Responses are sampled as the evaluation samples them (lengths, then torch, from `seed`), in
    forked RNGs. `positive`/`negative`: texts whose first tokens make the direction instead of the
    top_k risers and fallers. `heads`: how many of the best single heads (at most half) to patch together.
    """
    arch, peft, base = check_model(policy)
    notes = []
    if min(top_k, heads, patch_limit, batch_size) < 1:
        raise RecipeError("interpret: --top-k, --heads, --patch-limit and --batch-size must be at least 1")
    if bool(positive) != bool(negative):
        raise RecipeError("interpret: give both --positive and --negative, or neither")
    given = (token_ids(tokenizer, positive, "--positive", notes), token_ids(tokenizer, negative, "--negative", notes)) \
        if positive else None
    device, tic, seconds = next(base.parameters()).device, time.perf_counter(), {}
    lap = lambda key: seconds.__setitem__(key, time.perf_counter() - tic - sum(seconds.values()))  # noqa: E731
    gen = dataclasses.replace(generation or Generation(response_min_tokens=4, response_max_tokens=16),
                              batch_size=batch_size)
    # special tokens other than the end tokens are never sampled in training, so their rows move at random
    skip = sorted(set(tokenizer.all_special_ids) - set(end_ids(policy, tokenizer)))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), evaluating(peft):
        lengths = np.random.default_rng(seed).integers(gen.response_min_tokens, gen.response_max_tokens + 1,
                                                       size=len(queries)).tolist()
        torch.manual_seed(seed)  # the evaluation's samples, for the same seed
        responses = generate(policy, tokenizer, queries, lengths, gen, device)
        lap("generate")
        shift = response_shift(peft, queries, responses, tokenizer.pad_token_id, device, batch_size)
        lap("score_samples")
        ids, mask = pad_batch(queries, tokenizer.pad_token_id, side="right")  # each row's prompt end: its length - 1
        last = mask.sum(1) - 1
        saved = base.config._attn_implementation
        sides = {"policy": contextlib.nullcontext, "reference": peft.disable_adapter}
        base.set_attn_implementation("eager")  # sdpa returns no attention weights
        try:
            caps, dec = {}, {}
            for side, adapters in sides.items():
                with adapters():
                    caps[side] = merge(chunks(lambda i, a, t, _: hooked_forward(peft, base, arch, i, a, t), ids, mask,
                                                last, batch_size, device))
                caps[side]["last"] = last.to(device)
            lap("hooked_forwards")
            at_end = (caps["policy"]["logits"].log_softmax(-1) - caps["reference"]["logits"].log_softmax(-1)).mean(0)
            pos, neg = given or extremes(at_end, top_k, skip)
            c = contrast(at_end.numel(), pos, neg).to(device)
            for side, adapters in sides.items():
                with adapters():
                    dec[side] = decompose(base, arch, caps[side], c)
            patching = _patching(peft, base, arch, (ids, mask, last), c, caps, dec, heads, patch_limit, batch_size,
                                 device)
        finally:
            base.set_attn_implementation(saved)
    lap("patching")
    seconds["total"] = time.perf_counter() - tic
    source = "given" if given else f"the top {top_k} risers minus the top {top_k} fallers at the prompt's end"
    return _record(tokenizer, base, queries, shift, at_end, skip, (pos, neg, source), caps, dec, patching, seconds,
                   notes, top_k)


def extremes(shift: torch.Tensor, k: int, skip: list[int]) -> tuple[list[int], list[int]]:
    """The k entries of shift (V,) that rose most and the k that fell most, none of `skip`."""
    shift = shift.clone()
    shift[skip] = float("nan")
    return (shift.nan_to_num(-float("inf")).topk(k).indices.tolist(),
            (-shift).nan_to_num(-float("inf")).topk(k).indices.tolist())


def _patching(peft, base, arch, batch, c, caps, dec, heads, limit, batch_size, device) -> dict:
    """Each head's z from the policy into the reference, alone (all heads, or the `limit` whose
    attribution moved most), then the `heads` that recover most, together."""
    def m_with(patches):  # mean m of the reference run with `patches` {layer: (z, heads)}
        run = lambda i, a, t, rows: patched_forward(peft, base, arch, i, a, t, {  # noqa: E731
            layer: (z[rows], hs) for layer, (z, hs) in patches.items()}) @ c
        return float(torch.cat(chunks(run, *batch, batch_size, device)).mean())

    diff = dec["policy"]["heads"].mean(0) - dec["reference"]["heads"].mean(0)  # (L, H)
    n_layers, n_heads = diff.shape
    order = diff.abs().flatten().argsort(descending=True).tolist()
    chosen = order if len(order) <= limit else order[:limit]
    m_pol, m_ref = float(dec["policy"]["m"].mean()), float(dec["reference"]["m"].mean())
    change = m_pol - m_ref if m_pol != m_ref else float("nan")
    recovered = torch.full((n_layers, n_heads), float("nan"))
    with peft.disable_adapter(), StepDisplay(len(chosen) + 1, label="patching heads", every=10.0) as display:
        for n, flat in enumerate(chosen):
            layer, head = divmod(flat, n_heads)
            recovered[layer, head] = (m_with({layer: (caps["policy"]["z"][layer], [head])}) - m_ref) / change
            display.update(n + 1)
        best = recovered.flatten().nan_to_num(-float("inf")).topk(max(1, min(heads, len(chosen), len(order) // 2)))
        best = best.indices.tolist()
        together = {}
        for flat in best:
            together.setdefault(flat // n_heads, (caps["policy"]["z"][flat // n_heads], []))[1].append(flat % n_heads)
        share = (m_with(together) - m_ref) / change
        display.update(len(chosen) + 1)
    return {"recovered": recovered, "best": [divmod(f, n_heads) for f in best], "together": share,
            "which": "all heads" if len(chosen) == len(order) else
            f"the {limit} heads with the largest |per-head attribution difference| (of {len(order)})"}


def _record(tokenizer, base, queries, shift, at_end, skip, direction, caps, dec, patching, seconds, notes,
            top_k) -> dict:
    """The JSON-able record of one analysis."""
    word = lambda i: tokenizer.decode([i])  # noqa: E731

    def ranked(v):
        up, down = extremes(v, top_k, skip)
        return {"up": [[word(i), float(v[i])] for i in up], "down": [[word(i), float(v[i])] for i in down]}

    mean = lambda side, key: dec[side][key].mean(0).tolist()  # noqa: E731
    n_layers, n_heads = dec["policy"]["heads"].shape[1:]
    quantized = any(type(m).__name__ in QUANTIZED for m in base.modules())
    p, r = dec["policy"], dec["reference"]
    best, (pos, neg, source) = patching["best"], direction
    length0 = int(caps["policy"]["last"][0]) + 1
    return {
        "model_type": base.config.model_type, "num_prompts": len(queries), "layers": n_layers, "heads": n_heads,
        "approximate": (["per-head attribution: o(z_h) - o(0) through a quantized o_proj is not exactly linear, so "
                         "heads plus o(0) only approximate the attention output"] if quantized else []),
        "notes": notes + ["KL and logit lens in nats; logit-lens KL is KL(final output || lens) of each model",
                          f"special tokens other than the end tokens ({', '.join(map(word, skip)) or 'none'}) are left out of "
                          "the token rankings and the default direction",
                          "m = final-position logits . c; each model's parts use its own unembedding "
                          "(adapters on or off)"],
        "logit_shift": {"prompt_end": ranked(at_end),
                        "samples": {"up": [[word(i), float(shift["rise"][i])] for i in extremes(shift["rise"], top_k, skip)[0]],
                                    "down": [[word(i), -float(shift["fall"][i])]
                                             for i in extremes(shift["fall"], top_k, skip)[0]]},
                        "sample_positions": int(shift["count"].sum())},
        "kl_by_position": {k: shift[k].tolist() for k in ("kl", "sampled", "count")},
        "direction": {"source": source, "positive": [word(i) for i in pos], "negative": [word(i) for i in neg]},
        "m": {"policy": float(p["m"].mean()), "reference": float(r["m"].mean()),
              "change": float(p["m"].mean() - r["m"].mean())},
        "logit_lens": {"boundaries": ["embed"] + [f"L{i}" for i in range(n_layers)],
                       **{side: {"kl": mean(side, "lens_kl"), "m": mean(side, "lens_m")} for side in dec}},
        "dla": {"components": ["embed"] + [f"{k} {i}" for i in range(n_layers) for k in ("attn", "mlp")],
                **{side: mean(side, "dla") for side in dec},
                "difference": (p["dla"].mean(0) - r["dla"].mean(0)).tolist(),
                "bias": {side: dec[side]["bias"] for side in dec}, "max_gap": max(p["gap"], r["gap"])},
        "heads_dla": {**{side: mean(side, "heads") for side in dec},
                      "difference": (p["heads"].mean(0) - r["heads"].mean(0)).tolist(),
                      "o_bias_difference": (p["o_bias"].mean(0) - r["o_bias"].mean(0)).tolist()},
        "patching": {"patched": patching["which"], "recovered": patching["recovered"].tolist(),
                     "best": [f"L{layer}H{head}" for layer, head in best], "best_together": patching["together"],
                     "note": "fraction of (m_policy - m_reference) recovered when the head's z (o_proj input, all "
                             "positions) is copied from the policy into the reference run"},
        "attention_tv": (0.5 * (torch.stack(caps["policy"]["pattern"], 1)  # (N, L, H, T) -> (L, H)
                                - torch.stack(caps["reference"]["pattern"], 1)).abs().sum(-1).mean(0)).tolist(),
        "example": {"tokens": [word(i) for i in queries[0].tolist()],
                    "heads": [{"head": f"L{layer}H{head}",
                               **{side: caps[side]["pattern0"][layer][head, :length0, :length0].tolist()
                                  for side in dec}}
                              for layer, head in best[:4]]},
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------- a saved run
def interpret_run(run_dir: str | Path, overrides: list[str] | None = None, **options) -> dict:
    """analyse() a finished run on its held-out prompts; writes interpret/ and the report's section."""
    from .evaluation import load_run
    from .reporting.interpret_plots import markdown, plot_all, replace_section
    from .runtime.rundir import REPORT, read_heldout, write_atomic

    run = load_run(run_dir, overrides)
    ev = run.recipe.eval
    options.setdefault("batch_size", ev.batch_size)
    result = {"recipe": run.recipe.name, **analyse(run.policy, run.tokenizer, read_heldout(run.out),
                                                   run.recipe.generation, ev.seed, **options)}
    out = run.out / OUT_DIR
    out.mkdir(exist_ok=True)
    write_atomic(out / "interpret.json", json.dumps(result, indent=1) + "\n")
    report = run.out / REPORT
    body = markdown(result, plot_all(out, result), OUT_DIR)
    text = replace_section(report.read_text() if report.exists() else "", body, BEGIN, END)
    write_atomic(report, text)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m rlhf_recipes.interpret",
                           description="What training changed inside a finished run's policy, against its reference.")
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    parser.add_argument("--top-k", type=int, default=10, help="tokens listed, and in the default direction (10)")
    parser.add_argument("--heads", type=int, default=5, help="best heads patched together and drawn (5)")
    parser.add_argument("--positive", help='comma-separated tokens for the direction, e.g. " great, good"')
    parser.add_argument("--negative", help='comma-separated tokens against it, e.g. " awful, bad"')
    parser.add_argument("--patch-limit", type=int, default=64, help="patch at most this many single heads (64)")
    parser.add_argument("--batch-size", type=int, help="prompts per forward (default: eval.batch_size)")
    args = parser.parse_intermixed_args(argv)
    split = lambda s: [e for e in s.split(",") if e.strip()] if s else None  # noqa: E731
    options = dict(top_k=args.top_k, heads=args.heads, positive=split(args.positive), negative=split(args.negative),
                   patch_limit=args.patch_limit, **({"batch_size": args.batch_size} if args.batch_size else {}))
    try:
        result = interpret_run(args.run_dir, args.overrides, **options)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"m {result['m']['reference']:.3f} -> {result['m']['policy']:.3f}; "
          f"best heads {', '.join(result['patching']['best'])} "
          f"recover {result['patching']['best_together']:.0%} together; {result['seconds']['total']:.1f}s; "
          f"wrote {Path(args.run_dir) / OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
