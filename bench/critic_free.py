"""A GRPO step of rlhf_recipes against TRL's GRPOTrainer called directly: is our wrapper thin?

    python bench/critic_free.py --shape tiny --prompts 16 --generations 8 --steps 10 --warmup 3 --rounds 3
    python bench/critic_free.py --shape gpt2-small --prompts 8 --generations 8 --steps 3 --warmup 1 --rounds 3

Both sides train the same LoRA policy (the imdb_positive recipe's adapters on `--shape`'s random
GPT-2) with the same GRPO settings, prompts and reward (the tiny DistilBERT's POSITIVE
probability of prompt + response, batched by 16). Ours is `train(recipe)`, whose step is TRL's
sampling, scoring and loss driven by our loop, timed by its own time/step. TRL's is
`GRPOTrainer.train()` on the same PEFT model, its steps timed by a callback from one optimizer
step's start to its end (the batch fetch before it and the logging after it left out).
Rounds alternate which side goes first; the ratio is of medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import build_models, table, write_section


def recipe_for(paths: dict, args, out: Path):
    import dataclasses

    from rlhf_recipes import GRPO, apply_overrides, load_recipe

    base = load_recipe("imdb_positive")
    grpo = GRPO(learning_rate=1e-4, batch_size=args.prompts, num_generations=args.generations, beta=0.04,
                loss_type="grpo", scale_rewards="group", epsilon=0.2, temperature=1.0, lr_scheduler="constant")
    recipe = dataclasses.replace(base, ppo=None, grpo=grpo)
    return apply_overrides(recipe, [
        f"policy.model={paths['policy']}", f"reward.model={paths['reward']}", f"prompts.dataset={paths['prompts']}",
        "prompts.filter=none", f"generation.response_min_tokens={args.max_tokens}",
        f"generation.response_max_tokens={args.max_tokens}", "reward.batch_size=16", "reward.score=probability",
        "eval.num_prompts=8", "eval.batch_size=8", f"run.steps={args.warmup + args.steps}", "run.sample_every=0",
        f"run.checkpoint_every={args.warmup + args.steps}", f"run.output_dir={out}"])


def ours(paths: dict, args) -> list[float]:
    from rlhf_recipes.loops.training import train

    with tempfile.TemporaryDirectory() as tmp:
        result = train(recipe_for(paths, args, Path(tmp) / "run"))
    return [m["time/step"] for m in result.metrics][args.warmup:]


def trl_direct(paths: dict, args) -> list[float]:
    """GRPOTrainer.train() on the same policy, prompts (as texts) and reward, the settings our loop passes."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_recipes.components.data import load_prompts
    from rlhf_recipes.components.loading import load_pretrained
    from rlhf_recipes.components.policy import add_lora, load_tokenizer
    from rlhf_recipes.components.reward import build_reward

    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for(paths, args, Path(tmp) / "run")
        tokenizer = load_tokenizer("policy.model", recipe.policy.model)
        prompts = load_prompts(recipe.prompts, tokenizer, recipe.eval.num_prompts, recipe.run.seed)
        texts = tokenizer.batch_decode(prompts.train, skip_special_tokens=True)
        base = load_pretrained("policy.model", AutoModelForCausalLM.from_pretrained, recipe.policy.model)
        model = add_lora(base, recipe.policy)
        classifier = build_reward(recipe.reward, torch.device("cpu"), recipe.policy)

        def reward(prompts, completions, **_):
            return classifier([p + c for p, c in zip(prompts, completions)])

        times, started = [], []

        class Timer(TrainerCallback):
            def on_step_begin(self, *_, **__):
                started.append(time.perf_counter())

            def on_step_end(self, *_, **__):
                times.append(time.perf_counter() - started[-1])

        cfg, gen = recipe.grpo, recipe.generation
        trl_args = GRPOConfig(
            output_dir=tmp, learning_rate=cfg.learning_rate, beta=cfg.beta, num_generations=cfg.num_generations,
            per_device_train_batch_size=cfg.batch_size * cfg.num_generations, gradient_accumulation_steps=1,
            steps_per_generation=1, num_iterations=1, epsilon=cfg.epsilon, temperature=cfg.temperature,
            max_completion_length=gen.response_max_tokens, top_k=gen.top_k, top_p=gen.top_p,
            max_steps=recipe.run.steps, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="constant",
            loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards, seed=0, save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
            gradient_checkpointing=False, logging_steps=1, log_completions=False, disable_dropout=True)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=trl_args,
                              train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                              callbacks=[Timer()])
        trainer.train()
    return times[args.warmup:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    paths = build_models(args.shape)
    runs = {"rlhf_recipes (our loop)": [], "TRL GRPOTrainer.train()": []}
    sides = [("rlhf_recipes (our loop)", ours), ("TRL GRPOTrainer.train()", trl_direct)]
    for r in range(args.rounds):  # each side goes first in every other round
        for name, run in sides[::1 if r % 2 == 0 else -1]:
            runs[name] += run(paths, args)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    trl = medians["TRL GRPOTrainer.train()"]
    rows = [[k, f"{m:.3f}", f"{min(runs[k]):.3f}", f"{m / trl:.3f}x"] for k, m in medians.items()]
    body = (f"A GRPO step on the {args.shape} shape: {args.prompts} prompts x {args.generations} responses of "
            f"{args.max_tokens} tokens, LoRA, beta 0.04, loss grpo; {args.steps} steps after {args.warmup} of "
            f"warm-up, {args.rounds} rounds, each side first in every other.\n\n"
            + table(rows, ["loop", "median step, s", "fastest step, s", "against TRL"])
            + f"\nsteps timed: {json.dumps({k: len(v) for k, v in runs.items()})}\n")
    write_section(f"critic-free wrapper ({args.shape})", body)


if __name__ == "__main__":
    main()
