"""What a run checks and says before it loads anything heavy: settings that work but cost
something the user should know about, and hardware that cannot run what the recipe asks for."""
from __future__ import annotations

import os

import torch

from ..config.sections import Generation, Recipe, RecipeError, Run

KL_REACH_WARNING = 2.0
"""Warn when adaptive KL cannot move its coefficient by at least this factor over the run."""


BUSY_LOAD = 0.75
"""Warn when other work keeps at least this many CPUs busy: the machine's 1-minute load before the
run starts, less one CPU for each of this run's processes on it (which were starting up)."""


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's limit), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(run: Run, local_processes: int = 1) -> str | None:
    """Set torch's CPU threads from run.threads, else OMP_NUM_THREADS, else the usable CPUs shared
    by this machine's processes; a warning to print when the machine is already busy."""
    cpus = usable_cpus()
    given = run.threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit()
                            else None)
    threads = given or max(1, cpus // local_processes)
    torch.set_num_threads(threads)
    others = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0) - local_processes
    if others < BUSY_LOAD or given:
        return None
    return (f"this machine is already busy (other work keeps about {others:.1f} of its {cpus} usable CPUs busy): "
            f"a run on {threads} threads competes with it, and a small model's threads then spin at barriers, "
            f"which can make a run many times slower; set run.threads to the CPUs left free (e.g. run.threads="
            f"{max(1, cpus - round(others))}), or run one job at a time")


def sampling_note(gen: Generation) -> str | None:
    """Why the sampled KL is biased, if the recipe's sampling is not plain (top_k 0, top_p 1, temperature 1)."""
    changed = [f"{k}={v}" for k, v, plain in (("top_k", gen.top_k, 0), ("top_p", gen.top_p, 1.0),
                                              ("temperature", gen.temperature, 1.0)) if v != plain]
    if not changed:
        return None
    return (f"generation samples with {', '.join(changed)}, not from the policy itself: the KL measured on "
            "those samples is biased (as with min_new_tokens), and PPO's ratio is taken against the policy")


def notices(recipe: Recipe, processes: int, device: torch.device) -> list[tuple[str, str]]:
    """(level, text) lines to print at start-up; level is 'note' or 'warning'."""
    out = []
    ppo, steps = recipe.ppo, recipe.run.steps
    if ppo.adap_kl_ctrl:
        reach = ppo.kl_coef_reach(steps, processes)
        text = (f"adaptive KL can move its coefficient (now {ppo.init_kl_coef:g}) by at most x{reach:.3g} over "
                f"{steps} steps of {ppo.batch_size * processes} samples (horizon {ppo.horizon:g})")
        if reach < KL_REACH_WARNING:
            out.append(("warning", text + "; it cannot steer the KL towards ppo.target in this run: lower "
                                          "ppo.horizon (it counts samples) or run more steps"))
        else:
            out.append(("note", text))
    note = sampling_note(recipe.generation)
    if note:
        out.append(("warning", note))
    if recipe.generation.compile and recipe.policy.quantization != "none":
        out.append(("note", f"generation.compile is off for this policy: transformers cannot compile "
                            f"bitsandbytes' {recipe.policy.quantization} layers, so it samples as usual"))
    if recipe.policy.quantization != "none" and device.type == "cpu":
        out.append(("note", f"policy.quantization={recipe.policy.quantization} on a CPU runs bitsandbytes' CPU "
                            "kernels, 10 to 30 times slower than float32: for testing; train on a GPU"))
    return out


def check_device(recipe: Recipe, device: torch.device) -> None:
    """Refuse a dtype the device cannot compute in, with what to use instead."""
    # including_emulation=False: by default torch counts a GPU that only emulates bf16 (T4, V100,
    # RTX 20xx) as supporting it, and the run would be accepted and crawl
    if (device.type == "cuda" and recipe.policy.dtype == "bfloat16"
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        name = torch.cuda.get_device_name(device)
        fix = ("policy.dtype=float16 with policy.quantization=8bit or 4bit" if recipe.policy.quantization != "none"
               else "policy.dtype=float32")
        raise RecipeError(f"policy.dtype=bfloat16 needs a GPU with bfloat16 (Ampere or newer); {name} has none; "
                          f"use {fix}")
