"""What the PPO loop (rlhf_recipes.loops.training) and the DPO loop (rlhf_recipes.loops.dpo) share: the
start (`begin`, `load_models`, `start_records`), each step's record and checkpoint, and the end
(`finish`: save the policy, evaluate on the held-out prompts, write the report).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import set_seed

from . import stages
from ..components import seq2seq
from ..components.data import load_prompts
from ..components.loading import check_hub
from ..components.policy import build_policy, load_config, load_tokenizer
from ..components.reward import build_reward
from ..config.recipe import absolute_paths, resolve_callable
from ..config.sections import Recipe, RecipeError
from ..reporting.heldout import evaluate
from ..reporting import trackers
from ..reporting.console import append_jsonl, console, sample_table
from ..reporting.report import summary_line, write_report
from ..runtime import checkpoint, distributed, startup
from ..runtime.rundir import METRICS, MODEL, check_output_dir, save_policy, start_output_dir, write_heldout, write_metrics
from ..runtime.stopping import RunStopped, StopRequests


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    metrics: list[dict]
    """One record per PPO (or DPO) step taken, as written to metrics.jsonl."""
    skipped: int
    """Batches skipped (PPO's rolled back) for non-finite rewards, losses or gradients."""
    evaluation: dict
    """What eval.json holds: the held-out evaluation before, during and after training."""
    policy: object
    """The trained policy (the value-head wrapper around the PEFT model), on this process's device."""


@dataclass
class Started:
    """What both training loops (PPO here, DPO in rlhf_recipes.loops.dpo) start from: see `begin`."""

    recipe: Recipe
    """As given, paths made absolute: what recipe.json records."""
    out: Path
    resume: bool
    state: object
    """accelerate's PartialState: device, process index and count."""
    deepspeed: object
    saved: checkpoint.Checkpoint | None
    """The checkpoint a resumed run continues from."""
    tokenizer: object
    encoder_decoder: bool
    prompts: object
    """The PromptSet: training prompts, and the held-out ones every evaluation uses."""
    trained: Recipe | None = None
    """The recipe after its stages (policy.model and reward.model at their outputs), once load_models ran."""
    reward_fn: object = None
    policy: object = None
    partitioned: bool = False
    """Whether the policy's weights are partitioned between the processes (DeepSpeed ZeRO-3)."""
    trainable_whole: Callable[[], ContextManager] = contextlib.nullcontext
    """Entered by every process around the main one's saving of the adapter: under ZeRO-3 it
    gathers the trainable weights whole (trl_backend.trainable_whole)."""

    def held_out(self, step: int, check: bool = False) -> dict:
        """The held-out evaluation at `step`, on the main process while the others wait for its
        result; or, with the weights partitioned, on every process alike (each layer gathered as
        it runs, the whole model never held by one), the main one's result kept."""
        main = self.state.is_main_process
        if not (main or self.partitioned):
            return distributed.from_main(None)
        result = evaluate(self.policy, self.tokenizer, self.reward_fn, self.prompts.heldout, self.trained,
                          self.state.device, step, check_reference=check)
        return distributed.from_main(result if main else None)


def begin(recipe: Recipe, resume: bool) -> Started:
    """The checks and loading both loops start with, before any model: the output directory,
    the Hub, trackers, devices, the checkpoint to resume from, the tokenizer and the prompts."""
    if resume and recipe.run.overwrite:  # "the same arguments plus --resume", for a run started with overwrite
        console.print("note: --resume continues the run in run.output_dir, so run.overwrite=true is ignored",
                      soft_wrap=True)
        recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, overwrite=False))
    run = recipe.run
    out = Path(run.output_dir)
    check_output_dir(out, run.overwrite, resume)  # before minutes of loading, and before writing anything
    check_hub(recipe)
    trackers.check_installed(run.report_to)
    recipe = absolute_paths(recipe)  # recipe.json and the saved adapter then work from any directory
    state = distributed.init()
    distributed.check_shared(out)  # every process reads what the main one writes there
    # refuses what cannot run, before minutes of loading
    deepspeed = distributed.deepspeed_plugin(recipe)
    startup.check_device(recipe, state.device)
    busy = startup.set_threads(run, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if busy:
        console.print(f"[yellow]warning:[/] {busy}", soft_wrap=True)
    stage = int(deepspeed.zero_stage) if deepspeed is not None else 0
    saved = checkpoint.resume_point(out, recipe, state.num_processes, stage) if resume else None
    tokenizer = load_tokenizer("policy.model", recipe.policy.model, recipe.policy.trust_remote_code)
    encoder_decoder = seq2seq.is_encoder_decoder(load_config(recipe.policy))
    with state.main_process_first():  # one process fills the datasets cache
        prompts = load_prompts(recipe.prompts, tokenizer, recipe.eval.num_prompts, run.seed, encoder_decoder)
    if recipe.eval.judge is not None:
        resolve_callable(recipe.eval.judge, "eval.judge")  # fail before minutes of SFT, not after
    if saved is not None and saved.state["num_prompts"] != len(prompts.train):
        raise RecipeError(f"--resume: the training prompts changed ({len(prompts.train)} now, "
                          f"{saved.state['num_prompts']} at {saved.path}); resume needs the same data")
    return Started(recipe, out, resume, state, deepspeed, saved, tokenizer, encoder_decoder, prompts)


def load_models(run: Started) -> None:
    """The stages (trained, or reused; a resumed run must find the ones it trained with), then the
    reward and the policy, seeded so that a run that reuses its stages is one that trained them."""
    run.trained = stages.prepare(run.recipe, run.out, run.state.device, train=run.saved is None)
    set_seed(run.recipe.run.seed)
    run.reward_fn = build_reward(run.trained.reward, run.state.device, run.trained.policy)
    run.policy = build_policy(run.trained.policy, run.state.device)


def start_records(run: Started, restore, evaluate_now=None) -> tuple[dict, list[dict], int, int, int]:
    """(evaluation, records, first step, skipped, bad in a row): a new run's, after the evaluation
    before training (only then is its directory written: a failing reward or sanity check leaves
    an old run whole; `evaluate_now(step, check)` makes it, run.held_out by default), or the
    checkpoint's, restored by `restore(state)`."""
    out, saved, main = run.out, run.saved, run.state.is_main_process
    if saved is None:
        before = (evaluate_now or run.held_out)(0, True)
        evaluation = {"recipe": run.trained.name, "before": before, "during": [], "after": None}
        if main:
            start_output_dir(out, run.recipe, replace=run.recipe.run.overwrite or run.resume)
            write_heldout(out, run.prompts.heldout)
        return evaluation, [], 0, 0, 0
    restore(saved.state)
    if main:
        start_output_dir(out, run.recipe, replace=False)  # records any change to run.steps
        write_metrics(out, saved.metrics)  # drops the steps after the checkpoint
    checkpoint.set_rng_state(checkpoint.rng_of(saved, run.state.process_index))  # last: building a trainer reseeds
    console.print(f"resuming from {saved.path} (step {saved.step})")
    return saved.state["evaluation"], saved.metrics, saved.step, saved.state["skipped"], saved.state["bad_in_row"]


def record_step(run: Started, stats: dict, records: list[dict], tracked, display) -> None:
    """A step's record: to metrics.jsonl, the trackers, the run's records and the display."""
    if run.state.is_main_process:
        append_jsonl(run.out / METRICS, stats)
    tracked.log(stats, stats["step"])
    records.append(stats)
    display.update(stats["step"], stats)


def evaluate_during(run: Started, record: dict, evaluation: dict, records: list[dict], tracked) -> None:
    """Keep a held-out evaluation made during training, and rewrite the report with it."""
    evaluation["during"].append(record)
    tracked.log_evaluation(record)
    if run.state.is_main_process:
        write_report(run.out, evaluation, records)


def checkpoint_or_stop(run: Started, done: int, steps: int, bad_in_row: int, stop: StopRequests, save, tracked,
                       fix: str) -> None:
    """Step 5 of both loops: `save(done)` a checkpoint every run.checkpoint_every steps, at the end,
    and before stopping early, on a signal or after run.max_bad_batches non-finite batches in a
    row (raising RunStopped; `fix` says what the user can do about those)."""
    cfg = run.recipe.run
    # read once (signals race), and agreed by all processes, which must stop at the same step
    failing, signalled = bad_in_row >= cfg.max_bad_batches, stop.signal_name
    signalled = distributed.any_process(signalled is not None) and (signalled or "a signal to another process")
    if failing or signalled or done % cfg.checkpoint_every == 0 or done == steps:
        path = save(done)
    if failing or signalled:
        tracked.finish()
    if failing:
        raise RunStopped(f"{bad_in_row} batches in a row had non-finite rewards or losses (to step {done}); "
                         f"the last good state is in {path}; {fix}", exit_code=1, checkpoint=path)
    if signalled:
        raise RunStopped(f"stopped by {signalled} after step {done}; checkpoint written to {path}",
                         exit_code=stop.exit_code or 143, checkpoint=path)


def finish(run: Started, evaluation: dict, records: list[dict], tracked, steps: int, skipped: int,
           last=None, evaluate_now=None) -> TrainResult:
    """Save the policy, show the last samples (`last`: prompts, responses, rewards), evaluate
    after training (with `evaluate_now(step, check)`, run.held_out by default) and write the report."""
    out, main, ppo = run.out, run.state.is_main_process, run.recipe.ppo is not None
    with run.trainable_whole():
        if main:
            save_policy(run.policy, run.tokenizer, out / MODEL, value_head=ppo)
        distributed.barrier()
    if last is not None:
        sample_table(f"samples at step {steps}", *last, run.recipe.run.sample_rows)
        tracked.log_samples(steps, *last)
    console.print(f"saved adapter{', value head' if ppo else ''} and tokenizer to {out / MODEL}")
    evaluation["after"] = (evaluate_now or run.held_out)(steps, False)
    tracked.log_evaluation(evaluation["after"])
    tracked.finish()
    if main:
        write_report(out, evaluation, records)
    console.print(f"held-out evaluation: {summary_line(evaluation)}; see {out / 'report.md'}", soft_wrap=True)
    return TrainResult(output_dir=out, metrics=records, skipped=skipped, evaluation=evaluation, policy=run.policy)
