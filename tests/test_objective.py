"""The PPO objective, term by term, against the formulas written out here: the clipped policy
loss, the clipped value loss and the entropy bonus (L = L_clip + vf_coef L_value - c2 H)."""
import dataclasses

import pytest
import torch

from conftest import SMALL, local_overrides
from rlhf_recipes import apply_overrides, load_recipe, quiet
from rlhf_recipes.components.policy import build_policy
from rlhf_recipes.ppo import maths


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


@pytest.fixture(scope="module")
def batch(tiny_dir):
    """A fixed minibatch: logits of the tiny GPT-2 on 4 sequences of 7 tokens, and PPO's other inputs,
    with ratios well inside and outside the clip range on both sides."""
    quiet.install()  # module fixtures run before conftest's per-test one
    torch.manual_seed(0)
    recipe = apply_overrides(load_recipe("imdb_positive"), [*local_overrides("imdb_positive", tiny_dir), *SMALL])
    policy = build_policy(recipe.policy, torch.device("cpu"))
    ids = torch.randint(1, 200, (4, 7))
    with torch.no_grad():
        logits = policy.pretrained_model(input_ids=ids).logits[:, :-1]
    targets = ids[:, 1:]
    shape = targets.shape
    mask = torch.ones(shape)
    mask[0, :2] = 0  # a query token, not scored
    mask[3, 4:] = 0  # padding
    return {"recipe": recipe, "policy": policy, "logits": logits, "targets": targets, "mask": mask,
            "old_shift": torch.empty(shape).uniform_(-0.6, 0.6), "values": torch.randn(shape),
            "vpred_shift": torch.empty(shape).uniform_(-0.5, 0.5), "advantages": torch.randn(shape),
            "returns": torch.randn(shape)}


def terms(batch, entropy_coef, **ppo):
    """(ppo_losses' loss, its stats, our direct terms, and the logits leaf) for one minibatch."""
    recipe = batch["recipe"]
    recipe = dataclasses.replace(recipe, ppo=dataclasses.replace(recipe.ppo, entropy_coef=entropy_coef, **ppo))
    cfg = recipe.ppo
    logits = batch["logits"].clone().requires_grad_(True)
    logprobs = torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    old = logprobs.detach() + batch["old_shift"]
    values = batch["values"]
    vpreds = (values + batch["vpred_shift"]).requires_grad_(True)
    mask, adv, ret = batch["mask"], batch["advantages"], batch["returns"]
    losses = maths.ppo_losses(old, values, maths.entropy(logits), vpreds, logprobs, mask, adv, ret, cfg.cliprange,
                              cfg.cliprange_value, cfg.vf_coef, cfg.ratio_threshold, cfg.entropy_coef)
    pg, vf_term, stats = losses.policy, losses.value, losses.stats

    eps, eps_v, c1 = recipe.ppo.cliprange, recipe.ppo.cliprange_value, recipe.ppo.vf_coef
    ratio = torch.exp(logprobs - old)
    assert (ratio < 1 - eps).any() and (ratio > 1 + eps).any()  # both sides of the clip are exercised
    policy_loss = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)), mask)
    clipped = torch.min(torch.max(vpreds, values - eps_v), values + eps_v)
    value_loss = 0.5 * masked_mean(torch.max((vpreds - ret) ** 2, (clipped - ret) ** 2), mask)
    logp = torch.log_softmax(logits, -1)
    entropy = masked_mean(-(logp.exp() * logp).sum(-1), mask)
    direct = {"policy": policy_loss, "value": value_loss, "entropy": -entropy_coef * entropy,
              "total": policy_loss + c1 * value_loss - entropy_coef * entropy}
    return pg + vf_term, stats, direct, logits, vpreds


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_each_term_and_the_total_equal_the_ppo_formulas(batch, entropy_coef):
    loss, stats, direct, _, _ = terms(batch, entropy_coef)
    assert loss.item() == pytest.approx(direct["total"].item(), abs=1e-6)  # what backward() sees
    assert float(stats["loss/total"]) == pytest.approx(float(direct["total"]), abs=1e-6)
    assert float(stats["loss/policy"]) == pytest.approx(float(direct["policy"]), abs=1e-6)
    assert float(stats["loss/value"]) == pytest.approx(float(direct["value"]), abs=1e-6)
    if entropy_coef:
        assert float(stats["loss/entropy"]) == pytest.approx(float(direct["entropy"]), abs=1e-7)
        assert float(stats["loss/entropy"]) < 0
    else:
        assert "loss/entropy" not in stats  # TRL 0.11.4's statistics, unchanged


def test_the_bonus_changes_the_gradient_by_exactly_the_entropy_terms_gradient(batch):
    loss0, _, _, logits0, vpreds0 = terms(batch, 0.0)
    loss1, _, direct, logits1, vpreds1 = terms(batch, 0.05)
    g0 = torch.autograd.grad(loss0, [logits0, vpreds0])
    g1 = torch.autograd.grad(loss1, [logits1, vpreds1])
    g_term = torch.autograd.grad(direct["entropy"], [logits1])[0]
    assert g_term.abs().max() > 1e-6
    torch.testing.assert_close(g1[0] - g0[0], g_term, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(g1[1], g0[1])  # the value head's gradient is untouched


def test_the_ratio_threshold_skip_zeroes_the_bonus_too(batch):
    loss, stats, _, _, _ = terms(batch, 0.05, ratio_threshold=1e-3)
    assert loss.item() == 0.0 and float(stats["loss/total"]) == 0.0 and float(stats["loss/entropy"]) == 0.0
