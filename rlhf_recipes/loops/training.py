"""`train(recipe)`: the PPO loop, in numbered steps (generate, score, step, log, checkpoint); a
recipe with a dpo section goes to the DPO loop (rlhf_recipes.loops.dpo) instead, and one with a
grpo or rloo section to the critic-free loop (rlhf_recipes.loops.critic_free).

This is what `python -m rlhf_recipes.run` calls, and what other projects call to train
a recipe from Python. Under `accelerate launch` every process runs it: each generates and
scores its own ppo.batch_size prompts of a step, and only the main one writes files.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed
from rich.markup import escape

from .. import ppo
from ..components.data import batch_indices
from ..components.reward import all_finite, reward_inputs
from ..components.rollout import decode_pairs, generate
from ..config.sections import Recipe
from ..reporting import trackers
from ..reporting.console import StepDisplay, console, sample_table
from ..reporting.report import write_report
from ..runtime import checkpoint, distributed, startup
from ..runtime.stopping import StopRequests
from .session import (TrainResult, begin, checkpoint_or_stop, evaluate_during, finish, load_models, record_step,
                      start_records)

__all__ = ["TrainResult", "train"]


def train(recipe: Recipe, resume: bool = False) -> TrainResult:
    """Train `recipe` with PPO, or with DPO, GRPO or RLOO if it has that section instead
    (rlhf_recipes.loops.dpo, rlhf_recipes.loops.critic_free);
    outputs go to recipe.run.output_dir (see rlhf_recipes.runtime.rundir).

    resume: continue the run in output_dir from its newest checkpoint (a new run if it has none).
    Raises RunStopped when a signal or repeated non-finite batches stop it early.
    """
    if recipe.dpo is not None:
        from .dpo import train_dpo

        return train_dpo(recipe, resume)
    if recipe.grpo is not None or recipe.rloo is not None:
        from .critic_free import train_critic_free

        return train_critic_free(recipe, resume)
    started = begin(recipe, resume)
    checkpoint.check_steps(started.saved, recipe.run.steps, started.out)
    load_models(started)
    recipe, out, policy, tokenizer, prompts = (started.trained, started.out, started.policy, started.tokenizer,
                                               started.prompts)
    reward_fn, encoder_decoder, deepspeed = started.reward_fn, started.encoder_decoder, started.deepspeed
    state, run, gen = started.state, recipe.run, recipe.generation
    rank, processes, main, device = state.process_index, state.num_processes, state.is_main_process, state.device
    trainer = ppo.make_trainer(recipe, policy, tokenizer, deepspeed)
    rollback = ppo.Rollback(trainer)
    set_seed(run.seed, device_specific=True)  # seed + rank: each process samples its own responses
    evaluation, records, start, skipped, bad_in_row = start_records(
        started, lambda saved: ppo.load_trainer_state(trainer, saved["trainer"]))
    if main:
        write_report(out, evaluation, records)
    tracked = trackers.Trackers(run.report_to, run.run_name or recipe.name, out, start, main)
    if started.saved is None:
        tracked.log_evaluation(evaluation["before"])
    per_step = recipe.ppo.batch_size * processes
    console.print(f"[bold]{escape(recipe.name)}[/]: {len(prompts.train)} training prompts, "
                  f"{len(prompts.heldout)} held out, {run.steps} steps of {per_step}"
                  + (f" ({processes} processes x {recipe.ppo.batch_size})" if processes > 1 else "") + f" -> {out}",
                  soft_wrap=True)
    if prompts.duplicates:
        console.print(f"prompts: {prompts.duplicates} queries repeated an earlier one token for token and were "
                      "dropped, so no held-out prompt is also a training prompt", soft_wrap=True)
    if not (trainer.responses_only or encoder_decoder):
        console.print("note: PPO scores every position with the padded pass, which is slower: this policy's "
                      "logits are not its LM head applied to its last hidden state (a logit scale or soft cap, say), "
                      "or its forward takes no logits_to_keep", soft_wrap=True)
    if trainer.unpacked:
        console.print(f"note: ppo.pack_rows is off for this policy, which pads: {trainer.unpacked}", soft_wrap=True)
    for level, text in startup.notices(recipe, processes, device):
        console.print(f"[yellow]warning:[/] {escape(text)}" if level == "warning" else f"note: {escape(text)}",
                      soft_wrap=True)

    def save_checkpoint(done: int) -> Path:
        rngs = distributed.gather([checkpoint.rng_state()])  # each process's own, to resume its own sampling
        saved = {"trainer": ppo.trainer_state(trainer, all_processes=True), "num_prompts": len(prompts.train),
                 "processes": processes, "deepspeed": distributed.zero_stage(trainer.accelerator),
                 "skipped": skipped, "bad_in_row": bad_in_row, "evaluation": evaluation}
        return distributed.from_main(checkpoint.save(out, done, saved, records, run.keep_checkpoints, rngs)
                                     if main else None)

    with StepDisplay(run.steps, start) as display, StopRequests() as stop:
        for step in range(start, run.steps):
            t0 = time.perf_counter()
            # 1. generate: this process's share of a batch of prompts (a pure function of seed, step
            #    and process count), one response each
            batch = batch_indices(len(prompts.train), per_step, step, run.seed)
            lengths = np.random.default_rng([run.seed, step]).integers(
                gen.response_min_tokens, gen.response_max_tokens + 1, size=per_step).tolist()
            mine = slice(rank * recipe.ppo.batch_size, (rank + 1) * recipe.ppo.batch_size)
            queries = [prompts.train[i] for i in batch[mine]]
            responses = generate(policy, tokenizer, queries, lengths[mine], gen, device)
            t1 = time.perf_counter()

            # 2. score the decoded texts
            query_texts, response_texts = decode_pairs(tokenizer, queries, responses, encoder_decoder)
            rewards = reward_fn(reward_inputs(recipe.reward, query_texts, response_texts))
            all_rewards = distributed.gather(list(rewards))  # the whole batch's, for the decision and the log
            t2 = time.perf_counter()

            # 3. one PPO update against the adapters-off reference, undone if anything went non-finite
            stats = None
            if all_finite(all_rewards):
                rollback.take()
                stats = ppo.ppo_step(trainer, queries, responses, rewards)
                if distributed.any_process(not ppo.step_is_finite(trainer, stats)):
                    rollback.restore()
                    stats = None
            if stats is None:
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
                console.print(f"[yellow]step {step + 1}: non-finite {'loss' if all_finite(all_rewards) else 'reward'}, "
                              f"batch skipped and rolled back ({skipped} so far)")
            else:
                # 4. log: TRL 0.11.4's keys, plus the raw reward (ppo/mean_scores is after any scaling)
                bad_in_row = 0
                stats.update({
                    "step": step + 1,
                    "env/reward_mean": statistics.fmean(all_rewards),
                    "env/reward_std": statistics.pstdev(all_rewards),
                    "env/batch_size": len(all_rewards),  # samples learned from, all processes'
                    "env/response_length": statistics.fmean(distributed.gather(  # generated tokens, not a start token
                        [len(r) - int(encoder_decoder) for r in responses])),
                    "env/skipped_batches": skipped,
                    "time/rollout/generate": t1 - t0,
                    "time/rollout/score": t2 - t1,
                    "time/step": time.perf_counter() - t0,
                })
                record_step(started, stats, records, tracked, display)
                if run.sample_every and (step + 1) % run.sample_every == 0 and step + 1 < run.steps:
                    sample_table(f"samples at step {step + 1}", query_texts, response_texts, rewards, run.sample_rows)
                    tracked.log_samples(step + 1, query_texts, response_texts, rewards)
                if recipe.eval.every and (step + 1) % recipe.eval.every == 0 and step + 1 < run.steps:
                    evaluate_during(started, started.held_out(step + 1), evaluation, records, tracked)

            # 5. checkpoint: periodically, at the end, and before stopping early
            checkpoint_or_stop(started, step + 1, run.steps, bad_in_row, stop, save_checkpoint, tracked,
                               "fix the reward function or data and resume, or start a new run with a lower "
                               "ppo.learning_rate")

    last = None
    if records and start < run.steps and records[-1]["step"] == run.steps:  # this process sampled the last step
        last = (query_texts, response_texts, rewards)
    return finish(started, evaluation, records, tracked, run.steps, skipped, last)
