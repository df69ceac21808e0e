"""Opt-in GPU tests: the same CLI runs on CUDA, 8-bit and 4-bit included.

Run with RLHF_RECIPES_GPU_TESTS=1 on a machine with a CUDA GPU; skipped everywhere else.
"""
import json
import os

import pytest
import torch

from conftest import SMALL, local_overrides
from test_distributed import TESTS, launch, trainable
from rlhf_recipes.runtime.rundir import read_metrics
from rlhf_recipes.run import main

OPTED_IN = os.environ.get("RLHF_RECIPES_GPU_TESTS") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not OPTED_IN, reason="opt-in: set RLHF_RECIPES_GPU_TESTS=1 on a CUDA machine"),
              pytest.mark.skipif(OPTED_IN and not torch.cuda.is_available(),
                                 reason="RLHF_RECIPES_GPU_TESTS=1 is set, but torch finds no CUDA GPU here")]


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_recipe_trains_on_cuda(quantization, tiny_dir, tmp_path):
    out = tmp_path / "run"
    torch.cuda.reset_peak_memory_stats()
    assert main(["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL, "ppo.learning_rate=1e-3",
                 f"policy.quantization={quantization}", f"run.output_dir={out}"]) == 0
    metrics = read_metrics(out)
    assert abs(metrics[0]["objective/kl"]) < 1e-6 < abs(metrics[1]["objective/kl"])
    assert torch.cuda.max_memory_allocated() > 0  # the work really ran on the GPU


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_hold_identical_8bit_policies_each_on_its_own_gpu(tiny_dir, tmp_path):
    launch(str(TESTS / "ddp_worker.py"), str(tmp_path), "imdb_positive", *local_overrides("imdb_positive", tiny_dir),
           *SMALL, "ppo.learning_rate=1e-3", "policy.quantization=8bit", f"run.output_dir={tmp_path / 'run'}",
           env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)] == [["cuda:0"], ["cuda:1"]]
    ranks = [trainable(tmp_path / f"rank-{r}.safetensors") for r in (0, 1)]
    assert ranks[0] and all(torch.equal(v, ranks[1][k]) for k, v in ranks[0].items())


@pytest.mark.parametrize("method, quantization", [("grpo", "8bit"), ("rloo", "4bit")])
def test_grpo_and_rloo_train_on_cuda_from_kl_0(method, quantization, tiny_dir, tmp_path):
    from test_critic_free import recipe_file

    assert main([recipe_file(tmp_path, tiny_dir, method), f"policy.quantization={quantization}", "run.steps=2"]) == 0
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["objective/kl"] == 0.0 and metrics[1]["objective/kl"] != 0.0


@pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"), reason="needs vLLM (pip install vllm)")
def test_grpo_samples_with_vllm_in_colocate_mode(tiny_dir, tmp_path):
    from test_critic_free import recipe_file

    assert main([recipe_file(tmp_path, tiny_dir, "grpo"), "grpo.use_vllm=true", "run.steps=2"]) == 0
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2] and "grpo/sampling/sampling_logp_difference/mean" in metrics[0]
