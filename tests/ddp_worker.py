"""Run by tests/test_distributed.py under `accelerate launch`: train a recipe through the Python
API, then save this process's trainable parameters to DUMP_DIR/rank-R.safetensors, and the
devices its policy's weights are on to DUMP_DIR/rank-R.json.

    accelerate launch ... tests/ddp_worker.py DUMP_DIR RECIPE [section.field=value ...]
"""
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from rlhf_recipes.runtime import distributed
from rlhf_recipes.config.recipe import apply_overrides, load_recipe

if __name__ == "__main__":
    dump, name, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    distributed.init()  # before any model is loaded, as the command line does
    from rlhf_recipes.loops.training import train

    result = train(apply_overrides(load_recipe(name), overrides))
    rank, _ = distributed.world()
    save_file({n: p.detach().cpu().contiguous() for n, p in result.policy.named_parameters() if p.requires_grad},
              dump / f"rank-{rank}.safetensors")
    (dump / f"rank-{rank}.json").write_text(json.dumps(sorted({str(p.device) for p in result.policy.parameters()})))
    distributed.shutdown()
