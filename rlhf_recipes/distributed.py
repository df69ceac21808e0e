"""Several processes under `accelerate launch`: who does what, and the few collectives the loop needs.

Every process holds the whole policy, generates and scores its own share of each batch,
and takes part in the PPO update, whose gradients DDP averages. Only the main process
writes files or prints. With one process every function here is the identity or a no-op,
so single-process runs pay nothing for it.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object


def init() -> PartialState:
    """This process's place in the run; call before any model is loaded.

    Without CUDA the state must be made for the CPU before anything else makes it:
    loading a model creates it in GPU mode, which then reports a world of one process.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=launched and not torch.cuda.is_available())


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


def barrier() -> None:
    if init().num_processes > 1:
        dist.barrier()
