"""The quickstart, shortened, end to end through the CLI from nothing but the shipped corpus:
SFT, reward model, PPO. It must learn: reward up significantly, more positive reviews, KL bounded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHORT_QUICKSTART, run_dir_with_stages
from rlhf_recipes.reporting.report import reward_gain
from rlhf_recipes.run import main

@pytest.mark.slow
def test_a_short_quickstart_learns_and_holds_the_kl(tmp_path, quickstart_stages):
    out = run_dir_with_stages(tmp_path / "quickstart", quickstart_stages)
    assert main(["quickstart", *SHORT_QUICKSTART, f"run.output_dir={out}"]) == 0
    result = json.loads((out / "eval.json").read_text())
    before, after = result["before"], result["after"]
    assert after["reward_improvement"]["ci95"][0] > 0  # significant, paired by prompt
    assert reward_gain(result) >= 1.5  # in reference standard deviations
    assert after["policy"]["judged"]["mean"] >= before["policy"]["judged"]["mean"] + 0.3  # more positive reviews
    target = json.loads((out / "recipe.json").read_text())["ppo"]["target"]
    assert 0 < after["policy"]["kl"]["mean"] <= 2 * target
    stages = {s: json.loads((out / "stages" / s / "stage.json").read_text()) for s in ("sft", "reward_model")}
    assert stages["sft"]["heldout_loss_after"] < stages["sft"]["heldout_loss_before"]
    assert stages["reward_model"]["heldout_accuracy_after"] >= 0.9
    # the README's figures are formatted from a run like this one (named quickstart), by this script
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "docs" / "figures.py"),
                           "--runs", str(out.parent), "--print"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    quickstart_block = done.stdout.split("<!-- figures:quickstart -->")[1].split("<!-- figures:")[0]
    assert f"{after['policy']['judged']['mean']:.1%}" in quickstart_block
    assert f"{after['policy']['kl']['mean']:.2f} ±" in quickstart_block and "reference standard deviations" in quickstart_block
