"""Evaluation: KL 0 before and > 0 after, figures equal a direct computation, intervals narrow
with more samples, report files, and re-evaluation of a saved run."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from conftest import SMALL, local_overrides
from rlhf_recipes import apply_overrides, load_recipe, quiet
from rlhf_recipes.evaluation import SanityCheckError, evaluate, main as evaluation_main, score_responses
from rlhf_recipes.reporting.metrics import distinct_n, summarize, t_quantile, win_rate
from rlhf_recipes.components.policy import build_policy, load_tokenizer
from rlhf_recipes.runtime.rundir import read_heldout
from rlhf_recipes.loops.training import train

CPU = torch.device("cpu")


def stub_reward(texts):
    """A reward whose answer is known: the number of 'e' characters in each text."""
    return [float(t.count("e")) for t in texts]


def small_recipe(tiny_dir, tmp_path, *extra, stub=True):
    recipe = apply_overrides(load_recipe("imdb_positive"), [
        *local_overrides("imdb_positive", tiny_dir), *SMALL, "ppo.learning_rate=1e-3", "run.steps=3",
        "eval.batch_size=8", f"run.output_dir={tmp_path / 'run'}", *extra])
    if not stub:
        return recipe
    return dataclasses.replace(recipe, reward=dataclasses.replace(recipe.reward, model="", function=stub_reward,
                                                                  input="response"))


def moved_policy(tiny_dir, move):
    """The tiny GPT-2 policy with its LoRA B matrices moved off zero by `move` (in place)."""
    policy = build_policy(dataclasses.replace(load_recipe("imdb_positive").policy, model=str(tiny_dir / "gpt2")), CPU)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                move(p)
    return policy


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    quiet.install()  # module fixtures run before the per-test one in conftest
    return train(small_recipe(tiny_dir, tmp_path_factory.mktemp("eval"), "eval.every=2"))


def test_kl_is_exactly_zero_before_and_positive_after(trained):
    before, after = trained.evaluation["before"], trained.evaluation["after"]
    assert before["per_sample"]["kl"] == [0.0] * before["num_prompts"]
    assert before["reward_improvement"]["mean"] == 0.0 and before["win_rate"]["mean"] == 0.5  # identical samples
    # after 3 small steps the true KL is ~0.01 nats, below the noise of a 16-sample estimate (held-out
    # prompts are now never training prompts): the samples' KL is no longer 0, and consistent with > 0
    assert any(k != 0 for k in after["per_sample"]["kl"]) and after["policy"]["kl"]["ci95"][1] > 0
    assert [e["step"] for e in trained.evaluation["during"]] == [2] and after["step"] == 3


def test_figures_equal_a_direct_computation(trained):
    after = trained.evaluation["after"]
    ref, pol = (np.array(after["per_sample"][k]) for k in ("reference_reward", "policy_reward"))
    for s in after["samples"]:  # each listed sample's reward is the stub's answer for its response
        assert s["reference_reward"] == s["reference"].count("e") and s["policy_reward"] == s["policy"].count("e")
    assert after["policy"]["reward"]["mean"] == pytest.approx(pol.mean())
    assert after["policy"]["reward"]["std"] == pytest.approx(pol.std(ddof=1))
    diff = pol - ref
    half = t_quantile(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    assert after["reward_improvement"]["ci95"] == pytest.approx([diff.mean() - half, diff.mean() + half])
    assert after["win_rate"]["mean"] == pytest.approx(np.mean((pol > ref) + 0.5 * (pol == ref)))
    assert after["policy"]["kl"]["mean"] == pytest.approx(np.mean(after["per_sample"]["kl"]))


def test_batched_kl_and_entropy_equal_per_sample_computation(tiny_dir):
    policy = moved_policy(tiny_dir, lambda p: p.normal_(std=0.2))
    queries = [torch.tensor([5, 17, 42, 8, 99]), torch.tensor([7, 9]), torch.tensor([3, 4, 5])]
    responses = [torch.tensor([11, 12]), torch.tensor([21, 22, 23, 24]), torch.tensor([0])]
    kl, ent, ref_ent = score_responses(policy, queries, responses, pad_id=0, device=CPU, batch_size=2)
    peft_model = policy.pretrained_model
    for i, (q, r) in enumerate(zip(queries, responses)):
        seq = torch.cat([q, r])[None]
        with torch.no_grad():
            logp = torch.log_softmax(peft_model(input_ids=seq).logits[0, :-1], -1)
            with peft_model.disable_adapter():
                ref_logp = torch.log_softmax(peft_model(input_ids=seq).logits[0, :-1], -1)
        rows, tokens = slice(len(q) - 1, len(q) + len(r) - 1), seq[0, len(q):]
        expected_kl = (logp[rows].gather(-1, tokens[:, None]) - ref_logp[rows].gather(-1, tokens[:, None])).sum()
        assert kl[i] == pytest.approx(float(expected_kl), abs=1e-4)
        assert ent[i] == pytest.approx(float(-(logp[rows].exp() * logp[rows]).sum(-1).mean()), abs=1e-4)
        assert ref_ent[i] == pytest.approx(float(-(ref_logp[rows].exp() * ref_logp[rows]).sum(-1).mean()), abs=1e-4)
    assert kl[0] != 0


def test_sanity_check_stops_a_policy_that_is_not_its_reference(tiny_dir):
    recipe = load_recipe("imdb_positive")
    policy = moved_policy(tiny_dir, lambda p: p.fill_(0.01))
    tok = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    with pytest.raises(SanityCheckError, match=r"KL\(policy \|\| reference\) before any update is .*not 0"):
        evaluate(policy, tok, stub_reward, [torch.tensor([5, 17])] * 4, recipe, CPU, step=0, check_reference=True)


def test_confidence_interval_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    widths = []
    for n in (16, 64, 256, 1024):
        ci = summarize(rng.normal(1.0, 2.0, size=n).tolist())["ci95"]
        widths.append(ci[1] - ci[0])
    assert widths == sorted(widths, reverse=True)
    assert widths[0] / widths[-1] == pytest.approx(8, rel=0.35)  # ~ sqrt(1024 / 16)


def test_t_quantile_matches_tables():
    for dof, t in ((3, 3.182), (9, 2.262), (30, 2.042), (1000, 1.962)):
        assert t_quantile(0.975, dof) == pytest.approx(t, rel=0.01)


def test_distinct_n_and_win_rate():
    assert distinct_n([[1, 1, 1, 1]], 1) == 0.25 and distinct_n([[1, 2], [1, 2]], 2) == 0.5
    assert math.isnan(distinct_n([[1]], 2))
    assert win_rate([2.0, 1.0, 0.0], [1.0, 1.0, 1.0])["mean"] == 0.5


def test_report_files_hold_the_before_after_table(trained):
    out = trained.output_dir
    report = (out / "report.md").read_text()
    assert "| metric | reference | policy before | policy after | change |" in report
    assert "| reward |" in report and "| win rate over reference |" in report and "## Samples after training" in report
    for png in ("training.png", "reward_hist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved) == {"recipe", "before", "during", "after"}
    assert set(saved["after"]["policy"]) == {"reward", "kl", "length", "distinct_1", "distinct_2", "entropy"}


def test_standalone_command_recreates_eval_json(tiny_dir, tmp_path, capsys):
    recipe = small_recipe(tiny_dir, tmp_path, stub=False)  # a classifier reward, rebuilt from recipe.json
    result = train(recipe)
    out = result.output_dir
    original = json.loads((out / "eval.json").read_text())
    for name in ("eval.json", "report.md", "training.png"):
        (out / name).unlink()
    assert len(read_heldout(out)) == recipe.eval.num_prompts
    assert evaluation_main([str(out)]) == 0
    assert "held-out prompts" in capsys.readouterr().out
    again = json.loads((out / "eval.json").read_text())
    for when in ("before", "after"):
        for key in ("reference_reward", "policy_reward", "kl"):
            assert again[when]["per_sample"][key] == pytest.approx(original[when]["per_sample"][key], abs=1e-5)
    assert (out / "report.md").exists() and (out / "training.png").exists()
    assert evaluation_main([str(tmp_path / "nothing")]) == 2
