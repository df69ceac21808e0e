"""The same numbers on both supported stacks: the shortened quickstart's per-step metrics are
identical under transformers 4.57 and 5.x for the same seed. Runs when RLHF_RECIPES_OTHER_STACK
names the other stack's python (.ci/run sets it)."""
import json
import os
import subprocess
import sys

import pytest
import torch

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


SCORE = """
import json, sys, torch
from rlhf_recipes import Policy, Reward
from rlhf_recipes.components.reward import build_reward
reward = build_reward(Reward(model=sys.argv[1], label="POSITIVE"), torch.device("cpu"), Policy(model="unused"))
print(json.dumps([str(reward.model.dtype), reward(["the acting was superb", "the plot was dull and flat"])]))
"""


@pytest.mark.skipif(not OTHER, reason="set RLHF_RECIPES_OTHER_STACK to the other stack's python")
def test_a_bf16_classifier_checkpoint_scores_the_same_on_both_stacks(tiny_dir, tmp_path):
    """transformers 4.57 loads a checkpoint in fp32 and 5.x in its own dtype: the reward states its dtype
    (the policy's, float32 here), so a classifier saved in bf16 scores alike on both."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(tiny_dir / "distilbert-imdb").to(torch.bfloat16).save_pretrained(
        tmp_path / "bf16")
    AutoTokenizer.from_pretrained(tiny_dir / "distilbert-imdb").save_pretrained(tmp_path / "bf16")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    here, there = (json.loads(subprocess.run([python, "-c", SCORE, str(tmp_path / "bf16")], capture_output=True,
                                             text=True, env=env, check=True).stdout.strip().splitlines()[-1])
                   for python in (sys.executable, OTHER))
    assert here[0] == there[0] == "torch.float32" and here[1] == there[1]
