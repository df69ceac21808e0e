"""Peak GPU memory of one 8-bit LoRA PPO step on 1B- and 7B-shaped models (random weights),
with the settings of recipes/imdb_positive_7b_8bit.py: does a 7B policy train on a 24 GB GPU?

    python bench/large.py        # needs a CUDA GPU; the 7B shape is written to bench/.models (14 GB) once

Each shape runs in a fresh process: the policy is built as a run builds it (8-bit base,
fp16 compute, LoRA on query_key_value, TRL's value head, gradient checkpointing), then
32 prompts of 8 tokens get responses of 32 tokens (the recipe's longest) and TRL takes a
PPO step (4 epochs of mini-batches of 8). Rewards are fixed numbers: the recipe's
DistilBERT reward model would add about 0.3 GB.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

from common import build_models, table, write_section

SHAPES = ["pythia-1b", "pythia-6.9b"]
CONSUMER_GB = 24
CONTEXT_GB = 0.5  # the CUDA context, which no torch counter includes


def one(shape: str) -> dict:
    """Run in a child process: build `shape`, take two PPO steps, report memory in GB and the second step's time."""
    import torch

    from rlhf_recipes import load_recipe, ppo
    from rlhf_recipes.components.policy import build_policy, load_tokenizer
    from rlhf_recipes.components.rollout import generate

    paths = build_models(shape)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    device = torch.device("cuda", 0)
    recipe = load_recipe("imdb_positive_7b_8bit")
    recipe = dataclasses.replace(recipe, policy=dataclasses.replace(recipe.policy, model=str(paths["policy"])))
    tokenizer = load_tokenizer("policy.model", str(paths["policy"]))
    model = build_policy(recipe.policy, device)
    trainer = ppo.make_trainer(recipe, model, tokenizer)
    loaded = torch.cuda.memory_allocated() / 2 ** 30
    batch, length = recipe.ppo.batch_size, recipe.generation.response_max_tokens
    queries = [torch.randint(1, 500, (8,)) for _ in range(batch)]
    for _ in range(2):  # the second step is timed
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        responses = generate(model, tokenizer, queries, [length] * batch, recipe.generation, device)
        ppo.ppo_step(trainer, queries, responses, [1.0] * batch)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"params": sum(p.numel() for p in model.parameters()) / 1e9, "loaded_gb": loaded,
            "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2 ** 30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2 ** 30, "step_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=SHAPES, choices=SHAPES)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: bench/large.py measures GPU memory and needs a CUDA GPU; "
                         "bench/memory.py measures the CPU")
    rows, found = [], {}
    for shape in args.shapes:
        done = subprocess.run([sys.executable, __file__, "--one", shape], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{shape} failed:\n{done.stderr[-3000:]}")
        m = found[shape] = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append([shape, f"{m['params']:.2f}B", f"{m['loaded_gb']:.1f}", f"{m['peak_allocated_gb']:.1f}",
                     f"{m['peak_reserved_gb']:.1f}", f"{m['step_s']:.1f}"])
    body = ("One PPO step with recipes/imdb_positive_7b_8bit.py's settings (8-bit base, LoRA r=16, batch 32, "
            "mini-batch 8, 4 epochs, responses of 32 tokens, gradient checkpointing), random weights; GB are GiB.\n\n"
            + table(rows, ["shape", "parameters", "after loading", "peak allocated", "peak reserved", "step s"]))
    if "pythia-6.9b" in found:
        need = found["pythia-6.9b"]["peak_reserved_gb"] + CONTEXT_GB
        body += (f"\n- 7B shape: peak reserved plus about {CONTEXT_GB} GB of CUDA context is **{need:.1f} GB**: "
                 f"{'fits' if need < CONSUMER_GB else 'does not fit'} a {CONSUMER_GB} GB consumer GPU "
                 "(the DistilBERT reward adds about 0.3 GB)\n")
    write_section(f"8-bit LoRA PPO, 1B and 7B shapes ({torch.cuda.get_device_name(0)})", body)
    print(body)


if __name__ == "__main__":
    main()
