"""Run by tests/test_distributed.py under `accelerate launch`: train a recipe through the Python
API, then save this process's trainable parameters to DUMP_DIR/rank-R.safetensors (gathered whole
under ZeRO-3), the devices its policy's weights are on to DUMP_DIR/rank-R.json, and how many of the
frozen weights' elements it holds, of how many, to DUMP_DIR/rank-R.held.json (ZeRO-3: its share).

    accelerate launch ... tests/ddp_worker.py DUMP_DIR RECIPE [section.field=value ...] [--resume]
"""
import contextlib
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from rlhf_recipes.runtime import distributed
from rlhf_recipes.config.recipe import apply_overrides, load_recipe

def poison_pass(n: int) -> None:
    """Make the n-th training pass's DPO loss NaN (RLHF_TEST_NAN_AT_PASS): an update abandoned part way."""
    from rlhf_recipes.trl_backend import dpo

    original, calls = dpo.dpo_batch_loss, [0]

    def poisoned(trainer, rows, train=True):
        loss, metrics = original(trainer, rows, train)
        calls[0] += train
        return (loss * float("nan"), metrics) if train and calls[0] == n else (loss, metrics)

    dpo.dpo_batch_loss = poisoned


if __name__ == "__main__":
    if os.environ.get("RLHF_TEST_NAN_AT_PASS"):
        poison_pass(int(os.environ["RLHF_TEST_NAN_AT_PASS"]))
    dump, name, overrides = Path(sys.argv[1]), sys.argv[2], [a for a in sys.argv[3:] if a != "--resume"]
    distributed.init()  # before any model is loaded, as the command line does
    from rlhf_recipes.loops.training import train

    result = train(apply_overrides(load_recipe(name), overrides), resume="--resume" in sys.argv)
    rank, _ = distributed.world()
    params = list(result.policy.named_parameters())
    frozen = [p for _, p in params if not p.requires_grad]
    held = {"held": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in frozen),
            "total": sum(getattr(p, "ds_numel", p.numel()) for p in frozen)}
    (dump / f"rank-{rank}.held.json").write_text(json.dumps(held))
    trained = [(n, p) for n, p in params if p.requires_grad]
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in trained):  # ZeRO-3: each process holds a share
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in trained])
    with gathered:
        save_file({n: p.detach().cpu().contiguous() for n, p in trained}, dump / f"rank-{rank}.safetensors")
    (dump / f"rank-{rank}.json").write_text(json.dumps(sorted({str(p.device) for p in result.policy.parameters()})))
    distributed.shutdown()
