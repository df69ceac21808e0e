"""Several processes under `accelerate launch`: who does what, and the few collectives the loop needs.

Every process holds the whole policy, generates and scores its own share of each batch,
and takes part in the PPO update, whose gradients DDP averages. Only the main process
writes files or prints; on several machines the output directory must be shared storage,
which every process checks at start-up (check_shared). With one process every function here
is the identity or a no-op, so single-process runs pay nothing for it.
"""
from __future__ import annotations

import functools
import os
import secrets
import socket
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

if TYPE_CHECKING:
    from accelerate.utils import DeepSpeedPlugin

# DeepSpeed settings the recipe's method section decides (see deepspeed_plugin)
_FROM_RECIPE = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                "train_batch_size")

# How long a process waits in a collective: the others wait while the main one evaluates or
# saves a stage alone, which can take longer than NCCL's default of 10 minutes
TIMEOUT = timedelta(hours=1)


def init() -> PartialState:
    """This process's place in the run; call before any model is loaded.

    Without CUDA the state must be made for the CPU before anything else makes it:
    loading a model creates it in GPU mode, which then reports a world of one process.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=launched and not torch.cuda.is_available(), timeout=TIMEOUT)


def check_shared(out: Path) -> None:
    """Stop every process, with the same line, unless all of them see the same `out`.

    Each process decides from the output directory what to resume and which stages to reuse, and
    reads the stages and checkpoints the main process writes there: on one machine they all see
    the same files, across machines only on shared storage. The main process writes a token file
    into `out` (made if missing), the others read it after a barrier, and it is removed again
    (with `out`, if it was made for it), so a refusal leaves nothing behind."""
    state = init()
    if state.num_processes == 1:
        return
    token = from_main(secrets.token_hex(8) if state.is_main_process else None)
    main_out = from_main(str(out.absolute()) if state.is_main_process else None)
    probe, made = out / f".rlhf_recipes-shared-{token}", False
    if state.is_main_process:
        made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    barrier()
    sees = probe.is_file() and probe.read_text() == token
    seen = gather([(state.process_index, socket.gethostname(), sees)])
    barrier()  # everyone has looked
    if state.is_main_process:
        probe.unlink()
        if made and not any(out.iterdir()):
            out.rmdir()
    blind = [f"{rank} on {host}" for rank, host, ok in seen if not ok]
    if blind:
        from ..config.sections import RecipeError

        raise RecipeError(f"run.output_dir must be on storage that all machines share: process "
                          f"{', '.join(blind)} does not see the files the main process writes in {main_out}; "
                          "put it on a filesystem every machine mounts, at the same path")


def world() -> tuple[int, int]:
    """(this process's rank, number of processes)."""
    state = init()
    return state.process_index, state.num_processes


def is_main() -> bool:
    return init().is_main_process


def gather(values: list) -> list:
    """Every process's `values`, concatenated in rank order, on every process."""
    return gather_object(values) if init().num_processes > 1 else list(values)


def from_main(value):
    """The main process's `value`, on every process (the others pass None and wait for it)."""
    if init().num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any: decisions that change which collectives
    run next (stop now, skip this batch) must be the same everywhere, or the processes hang."""
    if init().num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=init().device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def average(tensors: list[torch.Tensor]) -> None:
    """Each tensor replaced, in place, by its mean over the processes (identical on every one of
    them afterwards); nothing to do with one process. One collective for all of them."""
    processes = init().num_processes
    if processes == 1 or not tensors:
        return
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    flat = torch.cat([t.detach().reshape(-1).to(init().device, dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= processes
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def shutdown() -> None:
    """Leave the process group at the end of a launched run, all processes together: torch
    otherwise tears its communication threads down at interpreter exit, where one could abort
    ("terminate called without an active exception") after the run itself had finished."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if init().num_processes > 1:
        dist.barrier()


def engine() -> str | None:
    """The engine `accelerate launch` was told to run under: "deepspeed", "fsdp", or None (DDP)."""
    for name in ("DEEPSPEED", "FSDP"):
        if os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true":
            return name.lower()
    return None


def deepspeed_plugin(recipe) -> DeepSpeedPlugin | None:
    """None unless launched with DeepSpeed; then its plugin, with the recipe's method section
    filling what the config leaves "auto" and refusing what contradicts it, or what cannot run.

    Our loops hand DeepSpeed no dataloader, so it cannot infer its micro batch; and under
    DeepSpeed clipping is DeepSpeed's gradient_clipping, not the section's max_grad_norm.
    FSDP is refused for every method, ZeRO-3 for PPO (see _NOT_ZERO3) and for a quantized policy.
    """
    from ..config.sections import RecipeError

    method = recipe.method
    if engine() == "fsdp":
        instead = ("accelerate/ddp.yaml or zero2.yaml (PPO samples with the whole policy on every process)"
                   if method == "ppo" else "accelerate/zero3.yaml (DeepSpeed ZeRO-3), which partitions the weights "
                   "the same way")
        raise RecipeError(f"FSDP is not supported for {method.upper()}: accelerate runs FSDP on GPUs only, so it is "
                          f"untested here; use {instead}")
    if engine() != "deepspeed":
        return None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    if int(plugin.zero_stage) == 3:
        if method == "ppo":
            raise RecipeError(_NOT_ZERO3)
        if recipe.policy.quantization != "none":
            raise RecipeError(f"DeepSpeed ZeRO-3 cannot partition policy.quantization={recipe.policy.quantization}'s "
                              "bitsandbytes weights; use accelerate/zero2.yaml or ddp.yaml for a quantized policy, or "
                              "policy.quantization=none with ZeRO-3")
    cfg, processes = getattr(recipe, method), world()[1]
    passes = cfg.gradient_accumulation_steps
    if method == "ppo":  # its batch is per process, its minibatch one pass
        micro = cfg.mini_batch_size
    else:  # a step's pairs or samples, shared by the processes, each share in `passes`
        micro = (cfg.batch_size if method == "dpo" else cfg.batch_size * cfg.num_generations) // (processes * passes)
    wanted = {"train_micro_batch_size_per_gpu": (f"{method}'s micro batch", micro),
              "gradient_accumulation_steps": (f"{method}.gradient_accumulation_steps", passes),
              "gradient_clipping": (f"{method}.max_grad_norm", cfg.max_grad_norm or 0.0),  # 0: DeepSpeed does not clip
              "train_batch_size": (f"{method}'s micro batch x {method}.gradient_accumulation_steps x processes",
                                   micro * passes * processes)}
    for key, (field, value) in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif float(given) != float(value):
            raise RecipeError(f"the DeepSpeed config sets {key}={given} but {field}={value}; set it to \"auto\" "
                              f"in the DeepSpeed config, and the recipe's {field} applies")
    return plugin


# why our PPO does not run partitioned: it samples and scores with the whole policy on every
# process at every step, and its rollback of a non-finite step copies the trainable weights and
# optimizer state as tensors of their own
_NOT_ZERO3 = ("DeepSpeed ZeRO-3 is not supported for PPO: every process samples with the whole policy at each step; "
              "use accelerate/ddp.yaml or accelerate/zero2.yaml, and policy.quantization=8bit or 4bit for a model "
              "that does not fit one GPU (DPO, GRPO and RLOO run under accelerate/zero3.yaml)")


def zero_stage(accelerator) -> int:
    """The ZeRO stage `accelerator` runs (0 without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def zero3() -> bool:
    """Whether this launch runs DeepSpeed ZeRO-3, which partitions the weights between processes."""
    if engine() != "deepspeed":
        return False
    from accelerate.utils import DeepSpeedPlugin

    return int(DeepSpeedPlugin().zero_stage) == 3


def live_deepspeed(plugin: DeepSpeedPlugin | None) -> DeepSpeedPlugin | None:
    """The plugin to hand a new Accelerator: `plugin`, or None once the recipe's settings are
    copied into the plugin an earlier Accelerator (a stage's Trainer) made, which accelerate keeps."""
    from accelerate.state import AcceleratorState

    if plugin is None or AcceleratorState._shared_state == {} or AcceleratorState().deepspeed_plugin is None:
        return plugin
    AcceleratorState().deepspeed_plugin.deepspeed_config.update({k: plugin.deepspeed_config[k] for k in _FROM_RECIPE})
    return None
