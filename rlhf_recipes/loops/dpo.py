"""`train_dpo(recipe)`: Direct Preference Optimization, in numbered steps, judged as PPO is.

The policy is the recipe's LoRA policy, the reference the same model with its adapters off
(after SFT, when the recipe has that stage). Each step takes dpo.batch_size preference pairs
(a pure function of seed and step, as PPO's prompts are, so a resumed run continues exactly)
and makes one update with TRL's DPO loss. The evaluation is PPO's, on the held-out prompts:
the recipe's reward and KL(policy || reference) of the policy's own samples, so a DPO run and
a PPO run of the same task compare directly (rlhf_recipes.frontier).

DPO's own metrics go to metrics.jsonl under TRL's keys: rewards/chosen and rewards/rejected
(beta times the policy-to-reference log-ratio of each answer), rewards/margins, rewards/accuracies
(the share of pairs whose chosen answer has the higher of those; a tie counts as wrong, so it is
0 at step 0), logps/chosen and logps/rejected. They are measured on the dataset's answers, not
on samples: neither a reward nor a KL.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from rich.markup import escape

from .. import trl_backend
from ..components.data import batch_indices, load_preferences
from ..config.sections import DPO, Recipe, RecipeError
from ..reporting import trackers
from ..reporting.console import StepDisplay, console
from ..reporting.report import write_report
from ..runtime import checkpoint, distributed
from ..runtime.stopping import StopRequests
from .session import (TrainResult, begin, checkpoint_or_stop, evaluate_during, finish, load_models, record_step,
                      start_records)
from .stages import flatten, split


def load_pairs(cfg: DPO, seed: int, heldout_prompts: set[str]) -> tuple[list[tuple], list[tuple], int]:
    """(training triples, held-out triples, rows dropped): (prompt, chosen, rejected) from the
    section's data, rankings expanded. Rows whose prompt is one of `heldout_prompts` (the
    evaluation's) are dropped, so that the evaluation stays on prompts never trained on."""
    groups = load_preferences("dpo", cfg, cfg.prompt_column)
    kept = [g for g in groups if g[0][0].strip() not in heldout_prompts]
    held, train = split(kept, cfg.heldout, seed, "dpo")
    return flatten(train), flatten(held), len(groups) - len(kept)


def total_steps(cfg: DPO, pairs: int, cap: int | None) -> int:
    """ceil(epochs * pairs / batch_size) updates, or `cap` (run.steps) if that is fewer; the
    same on any number of processes, which share each batch."""
    steps = max(1, math.ceil(cfg.epochs * pairs / cfg.batch_size))
    return min(steps, cap) if cap else steps


def pair_metrics(trainer, batch_size: int) -> dict[str, float]:
    """TRL's DPO metrics and loss on the held-out pairs (trainer.eval_dataset), averaged over pairs,
    `batch_size` at a time (a training pass's: scoring keeps whole logits, as training does).
    Every process scores them all, alike: TRL gathers its metrics across processes."""
    rows = trainer.eval_dataset
    if rows is None:
        return {}
    trainer.model.eval()
    totals: dict[str, float] = {}
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        loss, metrics = trl_backend.dpo_batch_loss(trainer, chunk, train=False)
        for k, v in {"loss": float(loss), **metrics}.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk) / len(rows)
    return totals


def train_dpo(recipe: Recipe, resume: bool = False) -> TrainResult:
    """Train `recipe`'s policy with DPO on its dpo.dataset; outputs as for PPO (rlhf_recipes.runtime.rundir).

    resume: continue the run in run.output_dir from its newest checkpoint.
    Raises RunStopped when a signal or repeated non-finite batches stop it early.
    """
    cfg, run = recipe.dpo, recipe.run
    started = begin(recipe, resume)
    rank, processes = started.state.process_index, started.state.num_processes
    if processes > 1 and cfg.batch_size % (processes * cfg.gradient_accumulation_steps):
        raise RecipeError(f"dpo.batch_size={cfg.batch_size} must be a multiple of the processes times "
                          f"dpo.gradient_accumulation_steps ({processes} x {cfg.gradient_accumulation_steps}): "
                          "each process takes an equal share of every batch")
    if started.encoder_decoder:
        raise RecipeError(f"dpo: policy.model {recipe.policy.model!r} is an encoder-decoder, which the DPO loop "
                          "does not train yet; use a causal LM, or PPO for this policy")
    out, saved, tokenizer = started.out, started.saved, started.tokenizer
    heldout_prompts = {t.strip() for t in started.prompts.heldout_texts}
    with started.state.main_process_first():
        train_rows, held_rows, dropped = load_pairs(cfg, run.seed, heldout_prompts)
    steps = total_steps(cfg, len(train_rows), run.steps)
    checkpoint.check_steps(saved, steps, out)
    if saved is not None and saved.state["num_pairs"] != len(train_rows):
        raise RecipeError(f"--resume: the training pairs changed ({len(train_rows)} now, {saved.state['num_pairs']} "
                          f"at {saved.path}); resume needs the same data")
    load_models(started)
    # the Trainer wants a directory; our loop saves nothing in it
    with tempfile.TemporaryDirectory(prefix="rlhf_recipes-dpo-") as work:
        trainer = trl_backend.make_dpo_trainer(cfg, started.policy.pretrained_model, tokenizer, train_rows, held_rows,
                                               steps, run.seed, Path(work), cfg.gradient_checkpointing,
                                               chat=recipe.prompts if recipe.prompts.chat_template else None,
                                               deepspeed=started.deepspeed)
    started.partitioned = trl_backend.partitioned(trainer)
    started.trainable_whole = lambda: trl_backend.trainable_whole(trainer)

    def evaluate_now(step: int, check: bool = False) -> dict:
        record = started.held_out(step, check)  # the recipe's reward and KL of samples, as for PPO,
        # and DPO's own metrics on its held-out pairs
        record["heldout_pairs"] = pair_metrics(trainer, cfg.batch_size // (processes * cfg.gradient_accumulation_steps))
        return record

    evaluation, records, start, skipped, bad_in_row = start_records(
        started, lambda state: trl_backend.load_trainer_state(trainer, state["trainer"]), evaluate_now)
    main = started.state.is_main_process
    if main:
        write_report(out, evaluation, records)
    tracked = trackers.Trackers(run.report_to, run.run_name or recipe.name, out, start, main)
    if saved is None:
        tracked.log_evaluation(evaluation["before"])
    console.print(f"[bold]{escape(recipe.name)}[/]: DPO on {len(train_rows)} pairs ({len(held_rows)} held out), "
                  f"{steps} steps of {cfg.batch_size}" + (f" ({processes} processes x {cfg.batch_size // processes})"
                                                          if processes > 1 else "")
                  + f" (beta {cfg.beta:g}, {cfg.loss_type}), "
                  f"evaluated on {len(started.prompts.heldout)} held-out prompts -> {out}", soft_wrap=True)
    if dropped:
        console.print(f"dpo: {dropped} rows had a held-out evaluation prompt and were left out of training",
                      soft_wrap=True)

    def save_checkpoint(done: int) -> Path:
        rngs = distributed.gather([checkpoint.rng_state()])
        state = {"trainer": trl_backend.trainer_state(trainer, all_processes=True), "num_pairs": len(train_rows),
                 "num_prompts": len(started.prompts.train), "processes": processes,
                 "deepspeed": distributed.zero_stage(trainer.accelerator),
                 "skipped": skipped, "bad_in_row": bad_in_row, "evaluation": evaluation}
        return distributed.from_main(checkpoint.save(out, done, state, records, run.keep_checkpoints, rngs)
                                     if main else None)

    with StepDisplay(steps, start, label="DPO") as display, StopRequests() as stop:
        for step in range(start, steps):
            t0 = time.perf_counter()
            # 1. this step's pairs: a pure function of seed and step, one shuffle per epoch; each
            #    process takes its share
            batch = batch_indices(len(train_rows), cfg.batch_size, step, run.seed)
            share = cfg.batch_size // processes
            rows = [trainer.train_dataset[i] for i in batch[rank * share:(rank + 1) * share]]

            # 2. one update with TRL's DPO loss against the adapters-off reference, the gradients
            #    averaged over processes; none, with nothing changed, when a loss or the gradient
            #    is not finite
            stats = trl_backend.dpo_update(trainer, rows)
            if stats is None:
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
                console.print(f"[yellow]step {step + 1}: non-finite loss or gradient, batch skipped "
                              f"({skipped} so far)")
            else:
                # 3. log: TRL's keys
                bad_in_row = 0
                stats.update({"step": step + 1, "epoch": (step + 1) * cfg.batch_size / len(train_rows),
                              "env/skipped_batches": skipped, "time/step": time.perf_counter() - t0})
                record_step(started, stats, records, tracked, display)

                # 4. evaluate on the held-out prompts every eval.every steps
                if recipe.eval.every and (step + 1) % recipe.eval.every == 0 and step + 1 < steps:
                    evaluate_during(started, evaluate_now(step + 1), evaluation, records, tracked)

            # 5. checkpoint: periodically, at the end, and before stopping early
            checkpoint_or_stop(started, step + 1, steps, bad_in_row, stop, save_checkpoint, tracked,
                               "fix the data and resume, or start a new run with a lower dpo.learning_rate")
    distributed.barrier()
    return finish(started, evaluation, records, tracked, steps, skipped, evaluate_now=evaluate_now)
