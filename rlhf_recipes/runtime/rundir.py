"""The run directory: its layout, and the rules that keep a run from clobbering anything.

    OUTPUT_DIR/recipe.json     the resolved recipe, as run
    OUTPUT_DIR/metrics.jsonl   one line of TRL's metric keys per PPO step
    OUTPUT_DIR/model/          adapter (PEFT, safetensors), value_head.safetensors (PPO), tokenizer
    OUTPUT_DIR/heldout.jsonl   the held-out prompts' token ids, so a run re-evaluates without its data
    OUTPUT_DIR/eval.json       evaluation before, during and after training (rlhf_recipes.evaluation)
    OUTPUT_DIR/report.md       the before/after table and samples, with training.png and reward_hist.png
    OUTPUT_DIR/checkpoints/    the newest checkpoints, to resume from (rlhf_recipes.runtime.checkpoint)
    OUTPUT_DIR/stages/         SFT and reward-model outputs, reused while their inputs are unchanged (rlhf_recipes.loops.stages)
    OUTPUT_DIR/interpret/      what training changed inside the model, when asked (rlhf_recipes.interpret)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ..components.compat import no_progress_bars
from ..config.sections import SECTIONS, Recipe, RecipeError

RECIPE, METRICS, MODEL, VALUE_HEAD = "recipe.json", "metrics.jsonl", "model", "value_head.safetensors"
HELDOUT, EVAL, REPORT, STAGES = "heldout.jsonl", "eval.json", "report.md", "stages"


def check_output_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse, before anything is loaded or written, a directory the run must not touch
    (with `resume`, `overwrite` is ignored: the run in it continues)."""
    overwrite = overwrite and not resume
    if out.exists() and not out.is_dir():
        raise RecipeError(f"run.output_dir {str(out)!r} is a file; choose a directory")
    if out.is_dir() and any(p.name != STAGES for p in out.iterdir()):  # stages/ alone is a cache
        if not (overwrite or resume):
            raise RecipeError(f"run.output_dir {str(out)!r} is not empty; choose another directory, "
                              "pass --resume to continue the run in it, or run.overwrite=true to replace it")
        if not (out / RECIPE).is_file():
            raise RecipeError(f"run.output_dir {str(out)!r} holds files that are not a run's (no {RECIPE}); "
                              "choose another directory")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"run.output_dir {str(out)!r} cannot be written ({str(existing)!r} is not writable); "
                          "choose a writable directory")


# Fields a resumed run may change: they decide how long to run and what to show, not what is learned.
RESUMABLE_CHANGES = frozenset({"run.steps", "run.sample_every", "run.sample_rows", "run.overwrite",
                               "run.checkpoint_every", "run.keep_checkpoints", "run.max_bad_batches", "eval.every",
                               "run.report_to", "run.run_name"})


def check_same_recipe(out: Path, recipe: Recipe) -> None:
    """A run resumes only with the recipe it was started with (up to RESUMABLE_CHANGES)."""
    try:
        saved = _dotted(json.loads((out / RECIPE).read_text()))
    except ValueError:
        raise RecipeError(f"--resume: {str(out / RECIPE)!r} is damaged; it cannot be resumed, "
                          "so start a new run in another directory") from None
    now = _dotted(recipe.to_dict())
    for key in sorted(set(saved) | set(now)):
        if key not in saved and _added_since(key, saved, now[key]):
            continue
        if saved.get(key) != now.get(key) and key not in RESUMABLE_CHANGES:
            raise RecipeError(f"--resume: {key} is {now.get(key)!r} but the run in {str(out)!r} used "
                              f"{saved.get(key)!r}; resume with the same recipe and overrides")


def _added_since(key: str, saved: dict, value) -> bool:
    """Whether `key` is a field that a later release added to a section the saved run has, and is
    at its default, which keeps what the run did before (dpo.gradient_checkpointing=false)."""
    section, _, name = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else {}
    had_section = any(k.startswith(section + ".") for k in saved)
    return had_section and name in fields and fields[name].default == value


def _dotted(recipe: dict) -> dict:
    return {f"{section}.{k}" if isinstance(fields, dict) else section: v
            for section, fields in recipe.items()
            for k, v in (fields.items() if isinstance(fields, dict) else [(None, fields)])}


def start_output_dir(out: Path, recipe: Recipe, replace: bool) -> None:
    """Create the run directory (emptied first if `replace` and it holds a run; the stages'
    outputs stay, to be reused while their inputs are unchanged) and record the recipe."""
    if replace and (out / RECIPE).is_file():
        for old in sorted(out.iterdir(), key=lambda p: p.name == RECIPE):  # recipe.json last: it marks a run
            if old.name != STAGES:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RECIPE, json.dumps(recipe.to_dict(), indent=2) + "\n")


def save_policy(model, tokenizer, directory: Path, value_head: bool = True) -> None:
    """Adapter (loads with PeftModel.from_pretrained), value head (PPO's; value_head=False for the
    methods that train none) and tokenizer, all safetensors/json.

    Written beside `directory` and renamed into place: an interrupted save leaves the old one.
    """
    with atomic_dir(directory) as tmp:
        model.pretrained_model.save_pretrained(tmp)
        if value_head:
            save_file({k: v.detach().contiguous().cpu() for k, v in model.v_head.state_dict().items()},
                      tmp / VALUE_HEAD)
        tokenizer.save_pretrained(tmp)


@contextlib.contextmanager
def atomic_dir(target: Path):
    """A fresh directory to fill, which replaces `target` (synced to disk, in one rename) when
    the block ends, and is removed if it fails: a crash never leaves a half-written `target`.
    Temporaries left beside `target` by a killed process are removed first."""
    for stale in [*target.parent.glob(f".tmp-{target.name}-*"), *target.parent.glob(f".old-{target.name}-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp, old = (target.with_name(f".{kind}-{target.name}-{os.getpid()}") for kind in ("tmp", "old"))
    tmp.mkdir(parents=True)
    try:
        with no_progress_bars():  # transformers 5.x draws one per model saved
            yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """Replace the file at `path` with `text` in one rename."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)


def write_metrics(out: Path, records: list[dict]) -> None:
    """Replace metrics.jsonl with `records` in one rename (resuming drops steps after the checkpoint)."""
    write_atomic(out / METRICS, jsonl(records))


def load_policy_weights(model, directory: Path) -> None:
    """Load a saved adapter, and value head where there is one (PPO's), into a policy built from the same recipe."""
    result = set_peft_model_state_dict(model.pretrained_model, load_file(directory / "adapter_model.safetensors"))
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise RecipeError(f"{str(directory)!r}: the saved adapter does not fit policy.model "
                          f"(unexpected {unexpected[0]}); evaluate with the recipe the run was trained with")
    if (directory / VALUE_HEAD).is_file():  # DPO, GRPO and RLOO train none (runs before 0.4 saved an untrained one)
        model.v_head.load_state_dict(load_file(directory / VALUE_HEAD))


def write_heldout(out: Path, queries: list[torch.Tensor]) -> None:
    (out / HELDOUT).write_text("".join(json.dumps(q.tolist()) + "\n" for q in queries))


def read_heldout(out: Path) -> list[torch.Tensor]:
    return [torch.tensor(json.loads(line), dtype=torch.long) for line in (out / HELDOUT).read_text().splitlines()]


def read_metrics(out: Path) -> list[dict]:
    """The per-step records of a run's metrics.jsonl."""
    return read_jsonl(out / METRICS)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (none if it is missing), dropping a last line torn by a crash."""
    lines = path.read_text().splitlines() if path.exists() else []
    if lines and not lines[-1].endswith("}"):
        lines.pop()
    return [json.loads(line) for line in lines if line.strip()]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
