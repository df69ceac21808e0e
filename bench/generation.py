"""Generation tokens per second against the memory-bandwidth bound, at several batch sizes.

    python bench/generation.py --shape gpt2-small             # a CPU, or a GPU
    python bench/generation.py --shape pythia-1b --dtype float16  # a GPU

Each decoding step of a batch must read every weight the forward pass uses at least once,
so with B sequences tokens/s <= B x bandwidth / weight bytes. The bandwidth is measured
here with a large copy on the device (read + write), and the weight bytes are those of the
policy's parameters, less an untied input embedding (a lookup reads B rows of it). The
ratio says how much of the hardware rlhf_recipes' sampling (rlhf_recipes.components.rollout.generate,
the policy with its LoRA adapters, fixed-length responses) uses.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from common import NEOX_SHAPES, SHAPES, build_models, table, write_section

BATCHES = [1, 8, 64]


def bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy of `gib` GiB, counting the read and the write."""
    x = torch.empty(int(gib * 2 ** 30) // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / statistics.median(times[1:])


def weight_bytes(model) -> int:
    """Bytes of the weights each decoding step reads: all of them but an untied input embedding."""
    lm = model.pretrained_model.get_base_model()
    skip = set()
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if head is None or embedding.weight.data_ptr() != head.weight.data_ptr():
        skip.add(embedding.weight.data_ptr())
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in skip or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="gpt2-small", choices=[*SHAPES, *NEOX_SHAPES])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--tokens", type=int, default=64, help="new tokens per response")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from accelerate import PartialState

    from rlhf_recipes import load_recipe
    from rlhf_recipes.components.policy import build_policy, load_tokenizer
    from rlhf_recipes.components.rollout import generate

    device = PartialState().device
    paths = build_models(args.shape)
    recipe = load_recipe("imdb_positive")
    policy_cfg = dataclasses.replace(recipe.policy, model=str(paths["policy"]), dtype=args.dtype)
    gen = dataclasses.replace(recipe.generation, response_min_tokens=args.tokens, response_max_tokens=args.tokens)
    tokenizer = load_tokenizer("policy.model", str(paths["policy"]))
    model = build_policy(policy_cfg, device)
    bw, nbytes = bandwidth(device), weight_bytes(model)
    rows = []
    for batch in BATCHES:
        queries = [torch.randint(1, 500, (8,)) for _ in range(batch)]
        rates = []
        for _ in range(args.repeats + 1):  # the first is warm-up
            _sync(device)
            t0 = time.perf_counter()
            out = generate(model, tokenizer, queries, [args.tokens] * batch, dataclasses.replace(gen, batch_size=batch),
                           device)
            _sync(device)
            rates.append(sum(len(r) for r in out) / (time.perf_counter() - t0))  # fewer if one sampled EOS
        rate = statistics.median(rates[1:])
        bound = batch * bw / nbytes
        rows.append([str(batch), f"{rate:,.0f}", f"{bound:,.0f}", f"{rate / bound:.0%}"])
    body = (f"Shape {args.shape} in {args.dtype} with LoRA, 8-token prompts, {args.tokens} new tokens each, "
            f"median of {args.repeats} after a warm-up. Measured copy bandwidth {bw / 1e9:.1f} GB/s; weights "
            f"read per decoding step {nbytes / 1e6:,.0f} MB.\n\n"
            + table(rows, ["batch", "tokens/s", "bandwidth bound, tokens/s", "of the bound"]))
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    write_section(f"generation ({args.shape}, {args.dtype}, {where})", body)
    print(body)


if __name__ == "__main__":
    main()
