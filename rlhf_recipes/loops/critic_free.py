"""`train_critic_free(recipe)`: GRPO or RLOO, in numbered steps, judged as PPO is.

The policy is the recipe's LoRA policy (on its 8-bit or 4-bit base too), the reference the same
model with its adapters off. Each step takes grpo.batch_size (or rloo.batch_size) training
prompts, a pure function of seed and step as PPO's are, samples num_generations responses to
each with TRL's trainer, scores them with the recipe's reward, and makes num_iterations updates
with TRL's loss; a batch with a non-finite reward, loss or gradient is skipped, nothing changed.
The evaluation is PPO's, on the held-out prompts, so the methods compare directly
(rlhf_recipes.frontier).

Metrics go to metrics.jsonl under our keys (trl_backend.critic_free.metrics): env/reward_mean,
objective/kl (the samples' log-ratio to the reference, summed over each response's tokens and
averaged, as PPO's objective/kl is), grpo/loss/total, grpo/policy/entropy and TRL's others.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from accelerate.utils import set_seed
from rich.markup import escape

from .. import trl_backend
from ..components.data import batch_indices
from ..config.sections import Recipe, RecipeError
from ..reporting import trackers
from ..reporting.console import StepDisplay, console, sample_table
from ..reporting.report import write_report
from ..runtime import checkpoint, distributed
from ..runtime.stopping import StopRequests
from ..runtime.trainer_state import load_trainer_state, trainer_state
from .session import (TrainResult, begin, checkpoint_or_stop, evaluate_during, finish, load_models, record_step,
                      start_records)


def refuse(recipe: Recipe, encoder_decoder: bool, processes: int) -> None:
    """What GRPO and RLOO cannot run here, in one line each, before any model loads."""
    name = recipe.method
    cfg = getattr(recipe, name)
    samples = cfg.batch_size * cfg.num_generations
    if samples % (processes * cfg.gradient_accumulation_steps):
        raise RecipeError(f"{name}.batch_size x num_generations ({samples}) must be a multiple of the processes times "
                          f"{name}.gradient_accumulation_steps ({processes} x {cfg.gradient_accumulation_steps}): "
                          "each process takes an equal share of every batch")
    if encoder_decoder:
        raise RecipeError(f"{name}: policy.model {recipe.policy.model!r} is an encoder-decoder, and TRL's "
                          f"{name.upper()} trains causal LMs only; use PPO (a ppo section) for this policy")


def one_per_prompt(reward, n: int) -> tuple[list, list, list]:
    """The last step's first response to each prompt (prompts, responses, rewards): a table of the
    first rows would otherwise show one prompt num_generations times."""
    prompts, responses = reward.texts
    return prompts[::n], responses[::n], reward.last[::n]


def train_critic_free(recipe: Recipe, resume: bool = False) -> TrainResult:
    """Train `recipe`'s policy with GRPO or RLOO (its grpo or rloo section); outputs as for PPO
    (rlhf_recipes.runtime.rundir).

    resume: continue the run in run.output_dir from its newest checkpoint.
    Raises RunStopped when a signal or repeated non-finite batches stop it early.
    """
    method, run = recipe.method, recipe.run
    cfg = getattr(recipe, method)
    trl_backend.check_vllm(cfg)
    started = begin(recipe, resume)
    refuse(recipe, started.encoder_decoder, started.state.num_processes)
    out, prompts, processes = started.out, started.prompts, started.state.num_processes
    checkpoint.check_steps(started.saved, run.steps, out)
    load_models(started)
    reward = trl_backend.RecipeReward(started.reward_fn, started.trained.reward, started.tokenizer, prompts.train)
    # the Trainer wants a directory; our loop saves nothing in it
    with tempfile.TemporaryDirectory(prefix=f"rlhf_recipes-{method}-") as work:
        trainer = trl_backend.make_critic_free_trainer(cfg, recipe.generation, started.policy.pretrained_model,
                                                       started.tokenizer, prompts.train, reward, run.steps, run.seed,
                                                       Path(work), processes, started.deepspeed)
    started.partitioned = trl_backend.partitioned(trainer)
    started.trainable_whole = lambda: trl_backend.trainable_whole(trainer)
    set_seed(run.seed, device_specific=True)  # seed + rank: each process samples its own responses
    evaluation, records, start, skipped, bad_in_row = start_records(
        started, lambda state: load_trainer_state(trainer, state["trainer"]))
    main = started.state.is_main_process
    if main:
        write_report(out, evaluation, records)
    tracked = trackers.Trackers(run.report_to, run.run_name or recipe.name, out, start, main)
    if started.saved is None:
        tracked.log_evaluation(evaluation["before"])
    per_step = cfg.batch_size * cfg.num_generations
    console.print(f"[bold]{escape(recipe.name)}[/]: {method.upper()} on {len(prompts.train)} training prompts, "
                  f"{len(prompts.heldout)} held out, {run.steps} steps of {cfg.batch_size} prompts x "
                  f"{cfg.num_generations} responses" + (f" ({processes} processes x {per_step // processes})"
                                                        if processes > 1 else "")
                  + f" (beta {cfg.beta:g}) -> {out}", soft_wrap=True)

    def save_checkpoint(done: int) -> Path:
        rngs = distributed.gather([checkpoint.rng_state()])  # each process's own, to resume its own sampling
        state = {"trainer": trainer_state(trainer, all_processes=True), "num_prompts": len(prompts.train),
                 "processes": processes, "deepspeed": distributed.zero_stage(trainer.accelerator), "skipped": skipped,
                 "bad_in_row": bad_in_row, "evaluation": evaluation}
        return distributed.from_main(checkpoint.save(out, done, state, records, run.keep_checkpoints, rngs)
                                     if main else None)

    with StepDisplay(run.steps, start, label=method.upper()) as display, StopRequests() as stop:
        for step in range(start, run.steps):
            t0 = time.perf_counter()
            # 1. sample: num_generations responses to each of this step's prompts (a pure function
            #    of seed and step; each process answers its share), scored by the recipe's reward and
            #    the reference, advantages from each prompt's group
            batch = trl_backend.sample_and_score(trainer, batch_indices(len(prompts.train), cfg.batch_size, step,
                                                                         run.seed), step)
            samples = sum(distributed.gather([len(batch["completion_ids"])]))  # all processes' shares
            t1 = time.perf_counter()

            # 2. update: num_iterations optimizer steps with TRL's loss, the gradients averaged over
            #    processes; none, with nothing changed, when a reward, loss or gradient is not finite
            stats = trl_backend.critic_free_update(trainer, batch)
            if stats is None:
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
                console.print(f"[yellow]step {step + 1}: non-finite reward, loss or gradient, batch skipped "
                              f"({skipped} so far)")
            else:
                # 3. log: TRL's metrics under our keys, and the samples' KL as PPO's objective/kl
                bad_in_row = 0
                record = trl_backend.critic_free_metrics(method, trainer._metrics["train"])
                kl = stats.pop("sequence_kl", None)
                record.update({f"{method}/loss/total": stats["loss"], f"{method}/grad_norm": stats["grad_norm"],
                               f"{method}/learning_rate": stats["learning_rate"], "step": step + 1,
                               "env/batch_size": samples, "env/skipped_batches": skipped,
                               "time/rollout": t1 - t0, "time/step": time.perf_counter() - t0,
                               **({"objective/kl": kl} if kl is not None else {})})
                record_step(started, record, records, tracked, display)
                if run.sample_every and (step + 1) % run.sample_every == 0 and step + 1 < run.steps:
                    shown = one_per_prompt(reward, cfg.num_generations)
                    sample_table(f"samples at step {step + 1}", *shown, run.sample_rows)
                    tracked.log_samples(step + 1, *shown)

                # 4. evaluate on the held-out prompts every eval.every steps
                if recipe.eval.every and (step + 1) % recipe.eval.every == 0 and step + 1 < run.steps:
                    evaluate_during(started, started.held_out(step + 1), evaluation, records, tracked)

            # 5. checkpoint: periodically, at the end, and before stopping early
            checkpoint_or_stop(started, step + 1, run.steps, bad_in_row, stop, save_checkpoint, tracked,
                               f"fix the reward function and resume, or start a new run with a lower "
                               f"{method}.learning_rate")
    distributed.barrier()
    last = one_per_prompt(reward, cfg.num_generations) if records and start < run.steps else None
    return finish(started, evaluation, records, tracked, run.steps, skipped, last)
