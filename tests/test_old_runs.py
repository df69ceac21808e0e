"""Runs made by rlhf_recipes 0.2, on TRL 0.11.4: a PPO run of its classic trainer
(tests/fixtures/run_0_2: the tiny GPT-2 on the IMDb stand-in, 2 steps, a checkpoint at step 2)
and a DPO run of its DPOTrainer (tests/fixtures/dpo_run_0_2, the same size). Their adapter and
value head load into today's policy, they re-evaluate, and they resume from their checkpoints.

Its recipe names the tiny models where they were built (/tmp/t02) and its own place (/tmp/run02);
the test points them at this session's copies, which rlhf_recipes.tiny builds alike from the
same seed, and at the copied run."""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlhf_recipes.evaluation import evaluate_run, load_run
from rlhf_recipes.run import main
from rlhf_recipes.runtime.checkpoint import latest
from rlhf_recipes.runtime.rundir import read_metrics

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "run_0_2"
OVERRIDES = ["prompts.filter=none", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=2",
             "run.checkpoint_every=1", "eval.num_prompts=16", "run.sample_every=0", "generation.response_min_tokens=4",
             "generation.response_max_tokens=8", "reward.batch_size=4"]


def old_run(tiny_dir, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    for path in (out / "recipe.json", out / "model" / "adapter_config.json"):
        path.write_text(path.read_text().replace("/tmp/t02", str(tiny_dir)).replace("/tmp/run02", str(out)))
    return out


def test_a_0_2_runs_adapter_and_value_head_load_into_todays_policy(tiny_dir, tmp_path):
    out = old_run(tiny_dir, tmp_path)
    policy = load_run(out).policy
    head = load_file(out / "model" / "value_head.safetensors")
    assert set(head) == {"summary.weight", "summary.bias"}
    assert all(torch.equal(policy.v_head.state_dict()[k], v) for k, v in head.items())
    saved = latest(out)  # its trainer state names the parameters as today's policy does
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert set(saved.state["trainer"]["params"]) == trainable


def test_a_0_2_run_re_evaluates_and_resumes(tiny_dir, tmp_path):
    out = old_run(tiny_dir, tmp_path)
    again = evaluate_run(out)
    assert again["after"]["step"] == 2 and abs(again["after"]["policy"]["kl"]["mean"]) < 0.01  # barely moved
    args = ["imdb_positive", f"policy.model={tiny_dir / 'gpt2'}", f"reward.model={tiny_dir / 'distilbert-imdb'}",
            f"prompts.dataset={tiny_dir / 'imdb.jsonl'}", *OVERRIDES, f"run.output_dir={out}"]
    assert main([*args, "run.steps=3", "--resume"]) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["objective/kl_coef"] > 0
    assert json.loads((out / "eval.json").read_text())["after"]["step"] == 3


def test_a_0_2_dpo_run_re_evaluates_and_resumes(tiny_dir, prefs, tmp_path):
    from test_dpo import recipe_file

    path = recipe_file(tmp_path, tiny_dir, prefs)  # the recipe it was made with, pointed here
    out = tmp_path / "run"
    shutil.copytree(FIXTURES / "dpo_run_0_2", out)
    for saved in (out / "recipe.json", out / "model" / "adapter_config.json"):
        saved.write_text(saved.read_text().replace("/tmp/t02/pairs.jsonl", str(prefs / "pairs.jsonl"))
                         .replace("/tmp/t02", str(tiny_dir)).replace("/tmp/dpo02", str(out)))
    assert evaluate_run(out)["after"]["step"] == 2
    assert main([path, "--resume"]) == 0  # to its run.steps=4
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "rewards/margins" in records[-1]
