"""The same numbers on both supported stacks: the shortened quickstart's per-step metrics are
identical under transformers 4.57 and 5.x for the same seed. Runs when RLHF_RECIPES_OTHER_STACK
names the other stack's python (.ci/run sets it)."""
import json
import os
import subprocess
import sys

import pytest

OTHER = os.environ.get("RLHF_RECIPES_OTHER_STACK")
SHORT = ["sft.epochs=0.2", "reward_model.epochs=0.2", "ppo.batch_size=32", "ppo.mini_batch_size=16", "run.steps=3",
         "eval.num_prompts=32", "eval.every=0", "run.sample_every=0"]


def quickstart(python, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, "-m", "rlhf_recipes.run", "quickstart", *SHORT, f"run.output_dir={out}"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    version = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return version, [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.slow
@pytest.mark.skipif(not OTHER, reason="set RLHF_RECIPES_OTHER_STACK to the other stack's python")
def test_the_shortened_quickstart_gives_identical_metrics_on_both_stacks(tmp_path):
    (ours, here), (theirs, there) = quickstart(sys.executable, tmp_path / "here"), quickstart(OTHER, tmp_path / "there")
    assert ours.split(".")[0] != theirs.split(".")[0], (ours, theirs)  # one 4.x, one 5.x
    assert here == there
