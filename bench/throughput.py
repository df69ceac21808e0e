"""PPO step time of rlhf_recipes against two plain TRL 0.11.4 loops, split into generation,
reward and optimisation, with medians over steps after warm-up and the ratios.

    python bench/throughput.py --shape gpt2-small --batch 64 --steps 5 --warmup 1

The plain loops are written the way TRL's gpt2-sentiment example does it (a LoRA policy
with a value head, the reference by switching adapters off, a text-classification pipeline
with batch 16): "per-prompt" calls generate once per prompt, as the example does;
"batched" generates the whole batch in one call. All three use the same models, prompts,
response lengths, batch and PPO settings, and seeds.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import build_models, table, write_section

PHASES = ("generate", "reward", "optimise")


def recipe_for(paths: dict, args, out: Path):
    from rlhf_recipes import apply_overrides, load_recipe

    return apply_overrides(load_recipe("imdb_positive"), [
        f"policy.model={paths['policy']}", f"reward.model={paths['reward']}", f"prompts.dataset={paths['prompts']}",
        "prompts.filter=none", f"ppo.batch_size={args.batch}", f"ppo.mini_batch_size={args.mini_batch}",
        f"ppo.ppo_epochs={args.epochs}", f"generation.response_min_tokens={args.min_tokens}",
        f"generation.response_max_tokens={args.max_tokens}", "reward.batch_size=16", "eval.num_prompts=8",
        "eval.batch_size=8", f"run.steps={args.warmup + args.steps}", "run.sample_every=0",
        f"run.checkpoint_every={args.warmup + args.steps}", f"run.output_dir={out}"])


def ours(paths: dict, args) -> list[dict]:
    from rlhf_recipes.training import train

    with tempfile.TemporaryDirectory() as tmp:
        result = train(recipe_for(paths, args, Path(tmp) / "run"))
    steps = []
    for m in result.metrics[args.warmup:]:
        gen, score = m["time/rollout/generate"], m["time/rollout/score"]
        steps.append({"generate": gen, "reward": score, "optimise": m["time/step"] - gen - score})
    return steps


def plain(paths: dict, args, batched: bool) -> list[dict]:
    """TRL's example loop, per prompt or batched, on the same prompts and response lengths as ours."""
    from peft import LoraConfig
    from transformers import AutoTokenizer, pipeline, set_seed
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    from rlhf_recipes.data import batch_indices, load_prompts

    recipe = recipe_for(paths, args, Path("unused"))
    tokenizer = AutoTokenizer.from_pretrained(str(paths["policy"]))
    tokenizer.pad_token = tokenizer.eos_token
    prompts = load_prompts(recipe.prompts, tokenizer, recipe.eval.num_prompts, recipe.run.seed)
    set_seed(recipe.run.seed)
    config = PPOConfig(learning_rate=recipe.ppo.learning_rate, batch_size=args.batch, mini_batch_size=args.mini_batch,
                       ppo_epochs=args.epochs, adap_kl_ctrl=True, init_kl_coef=0.2, target=6.0, horizon=10000.0,
                       seed=recipe.run.seed, log_with=None)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(paths["policy"]), peft_config=lora)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)
    pipe = pipeline("sentiment-analysis", model=str(paths["reward"]), device=trainer.accelerator.device)
    gen_kwargs = {"min_length": -1, "top_k": 0, "top_p": 1.0, "do_sample": True, "pad_token_id": tokenizer.eos_token_id}
    steps = []
    for step in range(args.warmup + args.steps):
        queries = [prompts.train[i] for i in batch_indices(len(prompts.train), args.batch, step, recipe.run.seed)]
        lengths = np.random.default_rng([recipe.run.seed, step]).integers(
            args.min_tokens, args.max_tokens + 1, size=len(queries)).tolist()
        t0 = time.perf_counter()
        if batched:
            out = trainer.generate(queries, batch_size=args.batch, return_prompt=False,
                                   max_new_tokens=max(lengths), **gen_kwargs)
            responses = [r[:n] for r, n in zip(out, lengths)]
        else:
            responses = [trainer.generate(q, max_new_tokens=n, **gen_kwargs).squeeze()[-n:]
                         for q, n in zip(queries, lengths)]
        t1 = time.perf_counter()
        texts = [tokenizer.decode(q) + tokenizer.decode(r) for q, r in zip(queries, responses)]
        scored = pipe(texts, top_k=None, function_to_apply="none", batch_size=16, truncation=True)
        rewards = [torch.tensor(next(s["score"] for s in row if s["label"] == "POSITIVE")) for row in scored]
        t2 = time.perf_counter()
        trainer.step(queries, responses, rewards)
        t3 = time.perf_counter()
        if step >= args.warmup:
            steps.append({"generate": t1 - t0, "reward": t2 - t1, "optimise": t3 - t2})
    return steps


def medians(steps: list[dict]) -> dict:
    out = {k: statistics.median(s[k] for s in steps) for k in PHASES}
    out["total"] = statistics.median(sum(s[k] for k in PHASES) for s in steps)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="gpt2-small", choices=["tiny", "gpt2-small"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--min-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="measured steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    paths = build_models(args.shape)
    results = {"rlhf_recipes": medians(ours(paths, args)),
               "plain TRL, batched": medians(plain(paths, args, batched=True)),
               "plain TRL, per prompt": medians(plain(paths, args, batched=False))}
    rows = [[name, *(f"{r[k]:.3f}" for k in (*PHASES, "total"))] for name, r in results.items()]
    ours_total = results["rlhf_recipes"]["total"]
    body = (f"Shape {args.shape}, batch {args.batch}, mini-batch {args.mini_batch}, {args.epochs} PPO epochs, "
            f"responses of {args.min_tokens}-{args.max_tokens} tokens; medians of {args.steps} steps after "
            f"{args.warmup} warm-up, in seconds.\n\n"
            + table(rows, ["loop", "generate", "reward", "optimise", "step"])
            + f"\n- rlhf_recipes / plain batched: **{ours_total / results['plain TRL, batched']['total']:.3f}** "
              "(target: at most 1.03)\n"
            + f"- plain per-prompt / rlhf_recipes: **{results['plain TRL, per prompt']['total'] / ours_total:.2f}x** "
              "(target: at least 5x at batch 64)\n")
    write_section(f"throughput ({args.shape}, batch {args.batch})", body)
    print(body)


if __name__ == "__main__":
    main()
