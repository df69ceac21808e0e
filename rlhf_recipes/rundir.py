"""The run directory: its layout, and the rules that keep a run from clobbering anything.

    OUTPUT_DIR/recipe.json     the resolved recipe, as run
    OUTPUT_DIR/metrics.jsonl   one line of TRL's metric keys per PPO step
    OUTPUT_DIR/model/          adapter (PEFT, safetensors), value_head.safetensors, tokenizer
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from .config import Recipe, RecipeError

RECIPE, METRICS, MODEL, VALUE_HEAD = "recipe.json", "metrics.jsonl", "model", "value_head.safetensors"


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


def read_metrics(out: Path) -> list[dict]:
    """The per-step records of a run's metrics.jsonl."""
    path = out / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
