"""Checkpoints: everything a PPO run needs to continue exactly where it stopped.

    OUTPUT_DIR/checkpoints/step-00000040/
        tensors.safetensors  trainable parameters (LoRA, value head), optimizer and RNG tensors
        metrics.jsonl        the per-step records up to this step
        state.json           the rest: step, KL coefficient, running reward moments, python and
                             numpy RNG (one set per process), skipped batches, evaluations so
                             far, and where each tensor belongs

A checkpoint is written into a hidden temporary directory and renamed into place, so a
directory named step-N is always complete; a crash mid-write leaves only the temporary
one, which is never read and is removed by the next write. The newest `keep` are kept.
Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config.sections import RecipeError
from ..reporting.console import console
from .rundir import RECIPE, atomic_dir, check_same_recipe, jsonl, read_jsonl

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"step-(\d{8})")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    """PPO steps done; training continues with step + 1."""
    state: dict
    """What save() was given, tensors included."""
    metrics: list[dict]


def save(out: Path, step: int, state: dict, metrics: list[dict], keep: int, rngs: list[dict] | None = None) -> Path:
    """Write `state` (a JSON-able dict that may hold tensors) as the checkpoint for `step`.

    rngs: each process's rng_state(), in rank order; by default this process's, captured
    now, so call this at the point the run resumes from.
    """
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tensors: dict[str, torch.Tensor] = {}
    layout = _split({**state, "rng": rngs or [rng_state()]}, "", tensors)
    final = root / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_file(tensors, tmp / "tensors.safetensors")
        (tmp / "metrics.jsonl").write_text(jsonl(metrics))
        (tmp / "state.json").write_text(json.dumps({"step": step, "state": layout}, allow_nan=True))
    for old in complete(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(out: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (temporary directories are not among them)."""
    root = out / CHECKPOINTS
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / "state.json").is_file()] \
        if root.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def latest(out: Path) -> Checkpoint | None:
    """The newest complete checkpoint of the run in `out`, or None if it has none."""
    paths = complete(out)
    if not paths:
        return None
    path = paths[-1]
    saved = json.loads((path / "state.json").read_text())
    state = _join(saved["state"], load_file(path / "tensors.safetensors"))
    return Checkpoint(path=path, step=saved["step"], state=state, metrics=read_jsonl(path / "metrics.jsonl"))


def resume_point(out: Path, recipe, processes: int, deepspeed: int) -> Checkpoint | None:
    """The checkpoint to resume from, after checking the recipe, the process count and the ZeRO
    stage (`deepspeed`: 0 without DeepSpeed; each stage splits the optimizer state its own way)
    are the run's."""
    if not (out / RECIPE).is_file():
        console.print(f"--resume: nothing to resume in {out}; starting a new run")
        return None
    check_same_recipe(out, recipe)
    saved = latest(out)
    if saved is None:
        console.print(f"--resume: the run in {out} has no checkpoint yet; starting it again from step 0")
    elif saved.state.get("processes", 1) != processes:
        raise RecipeError(f"--resume: the run in {str(out)!r} was trained by {saved.state.get('processes', 1)} "
                          f"process(es), not {processes}; resume it with as many (accelerate launch --num_processes "
                          "N), since each step's batch is split between them")
    elif zero_stage(saved) != deepspeed:
        how = lambda stage: f"DeepSpeed ZeRO-{stage}" if stage else "without DeepSpeed"  # noqa: E731
        raise RecipeError(f"--resume: the run in {str(out)!r} was trained {how(zero_stage(saved))}, not "
                          f"{how(deepspeed)}, which splits the optimizer state otherwise; resume it with the same "
                          "accelerate launch --config_file")
    return saved


def zero_stage(saved: Checkpoint) -> int:
    """The ZeRO stage a checkpoint was trained under (0: none); before ZeRO-3 ran, a flag, and
    DeepSpeed meant ZeRO-2."""
    stage = saved.state.get("deepspeed", False)
    return 2 if stage is True else int(stage)


def check_steps(saved: Checkpoint | None, steps: int, out: Path) -> None:
    """Refuse to resume a run that is already past the `steps` it is now asked to take."""
    if saved is not None and saved.step > steps:
        raise RecipeError(f"--resume: the run in {str(out)!r} is at step {saved.step}, past the {steps} steps "
                          f"asked for now; resume with run.steps>={saved.step}")


def rng_state() -> dict:
    """Python's, numpy's and torch's (CPU and CUDA) global generator states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def rng_of(saved: Checkpoint, rank: int) -> dict:
    """The RNG states process `rank` had when `saved` was written."""
    rngs = saved.state["rng"]
    return rngs[rank] if isinstance(rngs, list) else rngs  # a dict: written before there were processes


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able layout of `obj`, its tensors moved into `tensors` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    prefix = f"{prefix}/" if prefix else ""
    if isinstance(obj, dict):  # optimizer state is keyed by int: keep the key types
        return {"__items__": [[k, _split(v, f"{prefix}{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_split(v, f"{prefix}{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def _join(layout: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of _split."""
    if isinstance(layout, dict):
        if "__tensor__" in layout:
            return tensors[layout["__tensor__"]]
        if "__tuple__" in layout:
            return tuple(_join(v, tensors) for v in layout["__tuple__"])
        return {k: _join(v, tensors) for k, v in layout["__items__"]}
    if isinstance(layout, list):
        return [_join(v, tensors) for v in layout]
    return layout

