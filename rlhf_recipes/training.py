"""`train(recipe)`: the PPO loop, in numbered steps (generate, score, step, log, checkpoint).

This is what `python -m rlhf_recipes.run` calls, and what other projects call to train
a recipe from Python. Under `accelerate launch` every process runs it: each generates and
scores its own ppo.batch_size prompts of a step, and only the main one writes files.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed
from rich.markup import escape

from . import checkpoint, distributed, seq2seq, stages, startup, trackers, trl_backend
from .config import Recipe, RecipeError
from .console import StepDisplay, append_jsonl, console, sample_table
from .data import batch_indices, load_prompts
from .evaluation import evaluate
from .loading import check_hub
from .policy import build_policy, load_config, load_tokenizer
from .reward import all_finite, build_reward, reward_inputs
from .recipe import absolute_paths, resolve_callable
from .rollout import decode_pairs, generate
from .report import summary_line, write_report
from .rundir import METRICS, MODEL, check_output_dir, save_policy, start_output_dir, write_heldout, write_metrics
from .stopping import RunStopped, StopRequests


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    metrics: list[dict]
    """One record per PPO step taken, as written to metrics.jsonl."""
    skipped: int
    """Batches skipped (and rolled back) for non-finite rewards or losses."""
    evaluation: dict
    """What eval.json holds: the held-out evaluation before, during and after training."""
    policy: object
    """The trained policy (TRL's value-head wrapper around the PEFT model), on this process's device."""


def train(recipe: Recipe, resume: bool = False) -> TrainResult:
    """Train `recipe` with PPO; outputs go to recipe.run.output_dir (see rlhf_recipes.rundir).

    resume: continue the run in output_dir from its newest checkpoint (a new run if it has none).
    Raises RunStopped when a signal or repeated non-finite batches stop it early.
    """
    run, gen = recipe.run, recipe.generation
    out = Path(run.output_dir)
    check_output_dir(out, run.overwrite, resume)  # before minutes of loading, and before writing anything
    check_hub(recipe)
    trackers.check_installed(run.report_to)
    recipe = absolute_paths(recipe)  # recipe.json and the saved adapter then work from any directory
    state = distributed.init()
    device = state.device  # this process's accelerator if it has one, else the CPU
    rank, processes, main = state.process_index, state.num_processes, state.is_main_process
    deepspeed = distributed.deepspeed_plugin(recipe.ppo)  # refuses what cannot run, before minutes of loading
    startup.check_device(recipe, device)
    saved = checkpoint.resume_point(out, recipe, processes, deepspeed is not None) if resume else None

    tokenizer = load_tokenizer("policy.model", recipe.policy.model, recipe.policy.trust_remote_code)
    encoder_decoder = seq2seq.is_encoder_decoder(load_config(recipe.policy))
    with state.main_process_first():  # one process fills the datasets cache
        prompts = load_prompts(recipe.prompts, tokenizer, recipe.eval.num_prompts, run.seed, encoder_decoder)
    if recipe.eval.judge is not None:
        resolve_callable(recipe.eval.judge, "eval.judge")  # fail before minutes of SFT, not after
    if saved is not None and saved.state["num_prompts"] != len(prompts.train):
        raise RecipeError(f"--resume: the training prompts changed ({len(prompts.train)} now, "
                          f"{saved.state['num_prompts']} at {saved.path}); resume needs the same data")
    # SFT and reward model, trained or reused; a resumed run must find the ones it trained with
    given, recipe = recipe, stages.prepare(recipe, out, device, train=saved is None)
    set_seed(run.seed)  # after the stages, so a run that reuses them samples exactly as one that trained them
    reward_fn = build_reward(recipe.reward, device)
    policy = build_policy(recipe.policy, device)
    trainer = trl_backend.make_trainer(recipe, policy, tokenizer, deepspeed)
    set_seed(run.seed, device_specific=True)  # seed + rank: each process samples its own responses

    def held_out(step: int, check: bool = False) -> dict:  # on the main process; the others wait for it
        return distributed.from_main(evaluate(policy, tokenizer, reward_fn, prompts.heldout, recipe, device, step,
                                              check_reference=check) if main else None)

    if saved is None:
        evaluation = {"recipe": recipe.name, "before": held_out(0, check=True), "during": [], "after": None}
        if main:  # only now: a failing reward or sanity check leaves an old run whole
            start_output_dir(out, given, replace=run.overwrite or resume)
            write_heldout(out, prompts.heldout)
        records, start, skipped, bad_in_row = [], 0, 0, 0
    else:
        trl_backend.load_trainer_state(trainer, saved.state["trainer"])
        records, start, evaluation = saved.metrics, saved.step, saved.state["evaluation"]
        skipped, bad_in_row = saved.state["skipped"], saved.state["bad_in_row"]
        if main:
            start_output_dir(out, given, replace=False)  # records any change to run.steps
            write_metrics(out, records)  # drops the steps after the checkpoint
        checkpoint.set_rng_state(checkpoint.rng_of(saved, rank))  # last: building the trainer reseeds
        console.print(f"resuming from {saved.path} (step {start})")
    if main:
        write_report(out, evaluation, records)
    tracked = trackers.Trackers(run.report_to, run.run_name or recipe.name, out, start, main)
    if saved is None:
        tracked.log_evaluation(evaluation["before"])
    per_step = recipe.ppo.batch_size * processes
    console.print(f"[bold]{escape(recipe.name)}[/]: {len(prompts.train)} training prompts, "
                  f"{len(prompts.heldout)} held out, {run.steps} steps of {per_step}"
                  + (f" ({processes} processes x {recipe.ppo.batch_size})" if processes > 1 else "") + f" -> {out}",
                  soft_wrap=True)
    if prompts.duplicates:
        console.print(f"prompts: {prompts.duplicates} queries repeated an earlier one token for token and were "
                      "dropped, so no held-out prompt is also a training prompt", soft_wrap=True)
    for level, text in startup.notices(recipe, processes, device):
        console.print(f"[yellow]warning:[/] {escape(text)}" if level == "warning" else f"note: {escape(text)}",
                      soft_wrap=True)

    def save_checkpoint(done: int) -> Path:
        rngs = distributed.gather([checkpoint.rng_state()])  # each process's own, to resume its own sampling
        saved = {"trainer": trl_backend.trainer_state(trainer, all_processes=True), "num_prompts": len(prompts.train),
                 "processes": processes, "deepspeed": deepspeed is not None, "skipped": skipped,
                 "bad_in_row": bad_in_row, "evaluation": evaluation}
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
                last_good = trl_backend.trainer_state(trainer)
                stats = trl_backend.ppo_step(trainer, queries, responses, rewards)
                if distributed.any_process(not trl_backend.step_is_finite(trainer, stats)):
                    trl_backend.load_trainer_state(trainer, last_good)
                    stats = None
            if stats is None:
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
                console.print(f"[yellow]step {step + 1}: non-finite {'loss' if all_finite(all_rewards) else 'reward'}, "
                              f"batch skipped and rolled back ({skipped} so far)")
            else:
                # 4. log: TRL's keys, plus the raw reward (TRL's ppo/mean_scores is after any scaling)
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
                if main:
                    append_jsonl(out / METRICS, stats)
                tracked.log(stats, step + 1)
                records.append(stats)
                display.update(step + 1, stats)
                if run.sample_every and (step + 1) % run.sample_every == 0 and step + 1 < run.steps:
                    sample_table(f"samples at step {step + 1}", query_texts, response_texts, rewards, run.sample_rows)
                    tracked.log_samples(step + 1, query_texts, response_texts, rewards)
                if recipe.eval.every and (step + 1) % recipe.eval.every == 0 and step + 1 < run.steps:
                    evaluation["during"].append(held_out(step + 1))
                    tracked.log_evaluation(evaluation["during"][-1])
                    if main:
                        write_report(out, evaluation, records)

            # 5. checkpoint: periodically, at the end, and before stopping early
            # read once (signals race), and agreed by all processes, which must stop at the same step
            failing, signalled = bad_in_row >= run.max_bad_batches, stop.signal_name
            signalled = distributed.any_process(signalled is not None) and (signalled or "a signal to another process")
            if failing or signalled or (step + 1) % run.checkpoint_every == 0 or step + 1 == run.steps:
                path = save_checkpoint(step + 1)
            if failing or signalled:
                tracked.finish()
            if failing:
                raise RunStopped(f"{bad_in_row} batches in a row had non-finite rewards or losses (to step {step + 1}); "
                                 f"the last good state is in {path}; fix the reward function or data and resume, "
                                 "or start a new run with a lower ppo.learning_rate", exit_code=1, checkpoint=path)
            if signalled:
                raise RunStopped(f"stopped by {signalled} after step {step + 1}; checkpoint written to {path}",
                                 exit_code=stop.exit_code or 143, checkpoint=path)

    if main:
        save_policy(policy, tokenizer, out / MODEL)
    if records and start < run.steps and records[-1]["step"] == run.steps:  # this process sampled the last step
        sample_table(f"samples at step {run.steps}", query_texts, response_texts, rewards, run.sample_rows)
        tracked.log_samples(run.steps, query_texts, response_texts, rewards)
    console.print(f"saved adapter, value head and tokenizer to {out / MODEL}")
    evaluation["after"] = held_out(run.steps)
    tracked.log_evaluation(evaluation["after"])
    tracked.finish()
    if main:
        write_report(out, evaluation, records)
    console.print(f"held-out evaluation: {summary_line(evaluation)}; see {out / 'report.md'}", soft_wrap=True)
    return TrainResult(output_dir=out, metrics=records, skipped=skipped, evaluation=evaluation, policy=policy)

