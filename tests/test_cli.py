"""End to end through the real CLI: each shipped recipe, pointed at tiny local models, trains
two PPO (or DPO, GRPO, RLOO) steps in fp32, 8-bit and 4-bit; an existing run is never clobbered."""
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import SMALL, local_overrides
from rlhf_recipes import load_recipe, shipped_recipes
from rlhf_recipes.runtime.rundir import read_metrics
from rlhf_recipes.run import main

TRL_KEYS = {"objective/kl", "objective/kl_coef", "objective/entropy", "ppo/loss/total", "ppo/loss/policy",
            "ppo/loss/value", "ppo/policy/approxkl", "ppo/mean_scores", "env/reward_mean", "env/reward_std"}


PPO_RECIPES = [n for n in shipped_recipes() if load_recipe(n).ppo is not None]
DPO_RECIPES = [n for n in shipped_recipes() if load_recipe(n).dpo is not None]
CRITIC_FREE_RECIPES = [n for n in shipped_recipes() if load_recipe(n).method in ("grpo", "rloo")]


@pytest.mark.parametrize("name", CRITIC_FREE_RECIPES)
def test_shipped_grpo_and_rloo_recipes_train_two_steps(name, tiny_dir, tmp_path, capsys):
    out, method = tmp_path / "run", load_recipe(name).method
    argv = [name, *local_overrides(name, tiny_dir), "run.steps=2", f"{method}.batch_size=4", "eval.num_prompts=16",
            "eval.batch_size=16", "eval.every=0", "run.sample_every=1", f"run.output_dir={out}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{method.upper()} 2/2" in printed and "samples at step 1" in printed
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["objective/kl"] == 0.0  # the reference, at first
    assert metrics[0]["env/batch_size"] == 4 * getattr(load_recipe(name), method).num_generations
    adapter = load_file(out / "model" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
@pytest.mark.parametrize("name", DPO_RECIPES)
def test_shipped_dpo_recipe_trains_two_steps(name, quantization, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [name, *local_overrides(name, tiny_dir), "run.steps=2", "dpo.batch_size=8", "dpo.heldout=16",
            "eval.num_prompts=16", "eval.batch_size=16", "eval.every=0", f"policy.quantization={quantization}",
            f"run.output_dir={out}"]
    assert main(argv) == 0
    assert "DPO 2/2" in capsys.readouterr().out
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2] and {"loss", "rewards/margins", "rewards/accuracies"} <= set(metrics[0])
    assert metrics[0]["rewards/margins"] == 0  # before any update the policy is its reference
    adapter = load_file(out / "model" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
@pytest.mark.parametrize("name", PPO_RECIPES)
def test_shipped_recipe_trains_two_steps(name, quantization, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [name, *local_overrides(name, tiny_dir), *SMALL, f"policy.quantization={quantization}",
            "ppo.learning_rate=1e-3", f"run.output_dir={out}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "step 2/2" in printed and "reward" in printed and "samples at step 1" in printed

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert TRL_KEYS <= set(metrics[0])
    assert abs(metrics[0]["objective/kl"]) < 1e-6  # before any update the policy is its reference
    assert abs(metrics[1]["objective/kl"]) > 1e-6  # after one, it is not
    assert metrics[0]["objective/kl_coef"] == pytest.approx(load_recipe(name).ppo.init_kl_coef)

    saved = json.loads((out / "recipe.json").read_text())
    assert saved["policy"]["quantization"] == quantization and saved["run"]["output_dir"] == str(out)
    model_dir = out / "model"
    assert load_file(model_dir / "value_head.safetensors")["summary.weight"].dtype == torch.float32
    adapter = load_file(model_dir / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # the adapters trained
    assert (model_dir / "tokenizer_config.json").exists()


def test_saved_adapter_loads_with_peft_after_a_run(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL,
                 "ppo.learning_rate=1e-3", f"run.output_dir={out}"]) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "gpt2")
    tuned = PeftModel.from_pretrained(base, out / "model").eval()
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        with tuned.disable_adapter():
            ref = tuned(input_ids=ids).logits
        assert not torch.allclose(tuned(input_ids=ids).logits, ref)


def run_cli(*args, cwd=None, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rlhf_recipes.run", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_python_dash_m_runs_a_recipe(tiny_dir, tmp_path):
    out = tmp_path / "run"
    secret = "hf_" + "Zq7" * 12  # a token in the environment must not reach any log or file
    done = run_cli("imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL, f"run.output_dir={out}",
                   env={"HF_TOKEN": secret})
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    assert not [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert "step 2/2" in done.stdout and len(read_metrics(out)) == 2
    noise = [line for line in done.stderr.splitlines()
             if "Warning" in line or "deprecated" in line or "publisher trust" in line or "attention_mask" in line]
    assert not noise, noise  # TRL, PEFT, bitsandbytes and kernels chatter is silenced, and advice for padded rows


def test_help_lists_the_shipped_recipes():
    done = run_cli("--help")
    assert done.returncode == 0 and all(name in done.stdout for name in shipped_recipes())


def test_a_non_empty_output_dir_is_refused_and_kept(tiny_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL, f"run.output_dir={out}"]
    assert main(argv) == 2
    assert main(argv + ["run.overwrite=true"]) == 2  # overwrite replaces runs, never other files
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_at_start(tiny_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL, f"run.output_dir={out}"]
    assert main(argv) == 0
    before = (out / "metrics.jsonl").read_text()
    # a reward function that returns one number instead of a list fails at the first evaluation
    assert main(argv + ["run.overwrite=true", "reward.model=", "reward.function=builtins:len"]) == 2
    assert (out / "metrics.jsonl").read_text() == before and (out / "model" / "adapter_model.safetensors").exists()


def test_options_go_anywhere_among_the_overrides(capsys):
    assert main(["imdb_positive", "--dry-run", "ppo.learning_rate=2e-5", "run.steps=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ppo"]["learning_rate"] == 2e-5 and printed["run"]["steps"] == 3


def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens, so the Hub is unreachable
    done = subprocess.run([sys.executable, "-m", "rlhf_recipes.run", "imdb_positive", f"run.output_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot be reached" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr and "policy.model" in done.stderr
    assert not (tmp_path / "r").exists()


def test_a_dry_run_piped_into_head_ends_quietly():
    done = subprocess.run(f"{sys.executable} -m rlhf_recipes.run quickstart_grpo --dry-run | head -1", shell=True,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.stdout == "{\n" and "Error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
