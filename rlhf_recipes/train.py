"""`train(recipe)`: the PPO loop, in numbered steps (generate, score, step, log, save).

This is what `python -m rlhf_recipes.run` calls, and what other projects call to train
a recipe from Python.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate import PartialState
from rich.markup import escape
from transformers import set_seed

from . import trl_backend
from .config import Recipe
from .console import StepDisplay, append_jsonl, console, sample_table
from .data import batch_indices, load_prompts
from .evaluation import evaluate
from .policy import build_policy, load_tokenizer
from .reward import all_finite, build_reward, reward_inputs
from .rollout import decode_pairs, generate
from .report import summary_line, write_report
from .rundir import METRICS, MODEL, check_output_dir, save_policy, start_output_dir, write_heldout


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    metrics: list[dict]
    """One record per PPO step taken, as written to metrics.jsonl."""
    skipped: int
    """Batches skipped for non-finite rewards."""
    evaluation: dict
    """What eval.json holds: the held-out evaluation before, during and after training."""


def train(recipe: Recipe) -> TrainResult:
    """Train `recipe` with PPO; outputs go to recipe.run.output_dir (see rlhf_recipes.rundir)."""
    run, gen = recipe.run, recipe.generation
    out = Path(run.output_dir)
    check_output_dir(out, run.overwrite)  # before minutes of loading, and before writing anything
    set_seed(run.seed)
    device = PartialState().device  # this process's accelerator if it has one, else the CPU

    tokenizer = load_tokenizer("policy.model", recipe.policy.model, recipe.policy.trust_remote_code)
    prompts = load_prompts(recipe.prompts, tokenizer, recipe.eval.num_prompts, run.seed)
    reward_fn = build_reward(recipe.reward, device)
    policy = build_policy(recipe.policy, device)
    trainer = trl_backend.make_trainer(recipe, policy, tokenizer)
    held_out = lambda step, check=False: evaluate(  # noqa: E731
        policy, tokenizer, reward_fn, prompts.heldout, recipe, device, step, check_reference=check)
    evaluation = {"recipe": recipe.name, "before": held_out(0, check=True), "during": [], "after": None}
    start_output_dir(out, recipe)  # only now: a failing reward or sanity check leaves the old run whole
    write_heldout(out, prompts.heldout)
    write_report(out, evaluation, [])
    console.print(f"[bold]{escape(recipe.name)}[/]: {len(prompts.train)} training prompts, "
                  f"{len(prompts.heldout)} held out, {run.steps} steps of {recipe.ppo.batch_size} -> {out}", soft_wrap=True)

    records: list[dict] = []
    skipped = 0
    with StepDisplay(run.steps) as display:
        for step in range(run.steps):
            t0 = time.perf_counter()
            # 1. generate: a batch of prompts (a pure function of seed and step), one response each
            batch = batch_indices(len(prompts.train), recipe.ppo.batch_size, step, run.seed)
            queries = [prompts.train[i] for i in batch]
            lengths = np.random.default_rng([run.seed, step]).integers(
                gen.response_min_tokens, gen.response_max_tokens + 1, size=len(queries)).tolist()
            responses = generate(policy, tokenizer, queries, lengths, gen, device)
            t1 = time.perf_counter()

            # 2. score the decoded texts
            query_texts, response_texts = decode_pairs(tokenizer, queries, responses)
            rewards = reward_fn(reward_inputs(recipe.reward, query_texts, response_texts))
            t2 = time.perf_counter()
            if not all_finite(rewards):
                skipped += 1
                console.print(f"[yellow]step {step + 1}: non-finite reward, batch skipped ({skipped} so far)")
                continue

            # 3. one PPO update against the adapters-off reference
            stats = trl_backend.ppo_step(trainer, queries, responses, rewards)

            # 4. log: TRL's keys, plus the raw reward (TRL's ppo/mean_scores is after any scaling)
            stats.update({
                "step": step + 1,
                "env/reward_mean": statistics.fmean(rewards),
                "env/reward_std": statistics.pstdev(rewards),
                "env/response_length": statistics.fmean(len(r) for r in responses),
                "env/skipped_batches": skipped,
                "time/rollout/generate": t1 - t0,
                "time/rollout/score": t2 - t1,
                "time/step": time.perf_counter() - t0,
            })
            append_jsonl(out / METRICS, stats)
            records.append(stats)
            display.update(step + 1, stats)
            if run.sample_every and (step + 1) % run.sample_every == 0 and step + 1 < run.steps:
                sample_table(f"samples at step {step + 1}", query_texts, response_texts, rewards, run.sample_rows)
            if recipe.eval.every and (step + 1) % recipe.eval.every == 0 and step + 1 < run.steps:
                evaluation["during"].append(held_out(step + 1))
                write_report(out, evaluation, records)

    # 5. save the adapter, value head and tokenizer
    save_policy(policy, tokenizer, out / MODEL)
    if records:
        sample_table(f"samples at step {records[-1]['step']}", query_texts, response_texts, rewards, run.sample_rows)
    console.print(f"saved adapter, value head and tokenizer to {out / MODEL}")
    evaluation["after"] = held_out(run.steps)
    write_report(out, evaluation, records)
    console.print(f"held-out evaluation: {summary_line(evaluation)}; see {out / 'report.md'}", soft_wrap=True)
    return TrainResult(output_dir=out, metrics=records, skipped=skipped, evaluation=evaluation)
