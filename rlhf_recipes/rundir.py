"""The run directory: its layout, and the rules that keep a run from clobbering anything.

    OUTPUT_DIR/recipe.json     the resolved recipe, as run
    OUTPUT_DIR/metrics.jsonl   one line of TRL's metric keys per PPO step
    OUTPUT_DIR/model/          adapter (PEFT, safetensors), value_head.safetensors, tokenizer
    OUTPUT_DIR/heldout.jsonl   the held-out prompts' token ids, so a run re-evaluates without its data
    OUTPUT_DIR/eval.json       evaluation before, during and after training (rlhf_recipes.evaluation)
    OUTPUT_DIR/report.md       the before/after table and samples, with training.png and reward_hist.png
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .config import Recipe, RecipeError

RECIPE, METRICS, MODEL, VALUE_HEAD = "recipe.json", "metrics.jsonl", "model", "value_head.safetensors"
HELDOUT, EVAL, REPORT = "heldout.jsonl", "eval.json", "report.md"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, a directory the run must not touch."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"run.output_dir {str(out)!r} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RecipeError(f"run.output_dir {str(out)!r} is not empty; choose another directory, "
                              "or pass run.overwrite=true to replace the run in it")
        if not (out / RECIPE).is_file():
            raise RecipeError(f"run.output_dir {str(out)!r} holds files that are not a run's (no {RECIPE}); "
                              "run.overwrite only replaces runs, so choose another directory")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"run.output_dir {str(out)!r} cannot be written ({str(existing)!r} is not writable); "
                          "choose a writable directory")


def start_output_dir(out: Path, recipe: Recipe) -> None:
    """Create (or, with run.overwrite, empty) the run directory and record the resolved recipe."""
    if out.is_dir() and recipe.run.overwrite and (out / RECIPE).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")


def save_policy(model, tokenizer, directory: Path) -> None:
    """Adapter (loads with PeftModel.from_pretrained), value head and tokenizer, all safetensors/json."""
    directory.mkdir(parents=True, exist_ok=True)
    model.pretrained_model.save_pretrained(directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.v_head.state_dict().items()},
              directory / VALUE_HEAD)
    tokenizer.save_pretrained(directory)


def load_policy_weights(model, directory: Path) -> None:
    """Load a saved adapter and value head into a policy built from the same recipe."""
    result = set_peft_model_state_dict(model.pretrained_model, load_file(directory / "adapter_model.safetensors"))
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise RecipeError(f"{str(directory)!r}: the saved adapter does not fit policy.model "
                          f"(unexpected {unexpected[0]}); evaluate with the recipe the run was trained with")
    model.v_head.load_state_dict(load_file(directory / VALUE_HEAD))


def write_heldout(out: Path, queries: list[torch.Tensor]) -> None:
    (out / HELDOUT).write_text("".join(json.dumps(q.tolist()) + "\n" for q in queries))


def read_heldout(out: Path) -> list[torch.Tensor]:
    return [torch.tensor(json.loads(line), dtype=torch.long) for line in (out / HELDOUT).read_text().splitlines()]


def read_metrics(out: Path) -> list[dict]:
    """The per-step records of a run's metrics.jsonl."""
    path = out / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
