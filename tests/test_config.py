"""Unit tests: sections validate themselves, overrides parse to field types, recipes load."""
import dataclasses
import json

import pytest

from rlhf_recipes import PPO, Generation, Policy, Prompts, RecipeError, Reward, apply_overrides, load_recipe
from rlhf_recipes.config.recipe import parse_value, valid_keys
from rlhf_recipes.config import Eval, Run
from typing import Literal, Optional, Union
from collections.abc import Callable
from pathlib import Path

PARITY_REFERENCE = Path(__file__).parent / "parity" / "trl011_reference.pt"

BASE = load_recipe("imdb_positive")


@pytest.mark.parametrize("build, field", [
    (lambda: Policy(model=""), "policy.model"),
    (lambda: Policy(model="m", lora_r=0), "policy.lora_r"),
    (lambda: Policy(model="m", quantization="3bit"), "policy.quantization"),
    (lambda: Policy(model="m", lora_dropout=1.0), "policy.lora_dropout"),
    (lambda: Policy(model="m", lora_dropout=0.1), "policy.lora_dropout"),  # inert in PPO's gradient pass
    (lambda: Policy(model="m", dtype="float16"), "policy.dtype"),  # no loss scaling without quantization
    (lambda: dataclasses.replace(BASE.ppo, use_score_norm=True), "ppo.use_score_norm"),  # inert in TRL 0.11.4
    (lambda: dataclasses.replace(BASE.ppo, entropy_coef=-0.1), "ppo.entropy_coef"),
    (lambda: Policy(model="m", lora_target_modules=()), "policy.lora_target_modules"),
    (lambda: Policy(model="m", lora_r="8"), "policy.lora_r"),
    (lambda: Reward(model="m", batch_size=0), "reward.batch_size"),
    (lambda: Reward(model="m", function=len), "reward.function"),
    (lambda: Reward(model="m", scale=0.0), "reward.scale"),
    (lambda: Reward(model="m", score="rank"), "reward.score"),
    (lambda: Prompts(dataset="d", query_min_tokens=5, query_max_tokens=2), "prompts.query_max_tokens"),
    (lambda: Generation(response_min_tokens=4, response_max_tokens=16, top_p=0.0), "generation.top_p"),
    (lambda: Generation(response_min_tokens=0, response_max_tokens=16), "generation.response_min_tokens"),
    (lambda: dataclasses.replace(BASE.ppo, batch_size=100), "ppo.batch_size"),
    (lambda: dataclasses.replace(BASE.ppo, gamma=1.5), "ppo.gamma"),
    (lambda: dataclasses.replace(BASE.ppo, adap_kl_ctrl="yes"), "ppo.adap_kl_ctrl"),
    (lambda: Eval(num_prompts=0), "eval.num_prompts"),
    (lambda: Run(output_dir="o", steps=0), "run.steps"),
    (lambda: Run(output_dir="o", steps=1, seed=-1), "run.seed"),
    (lambda: Eval(seed=2 ** 32), "eval.seed"),
    (lambda: dataclasses.replace(BASE.ppo, vf_coef=float("inf")), "ppo.vf_coef"),
    (lambda: dataclasses.replace(BASE.ppo, init_kl_coef=float("inf")), "ppo.init_kl_coef"),
])
def test_section_errors_name_the_field(build, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        build()


def test_ppo_fields_are_trl_0_11_4s_ppoconfig_fields():
    """TRL 0.11.4's PPOConfig field names, as tests/parity/trl011_reference.py recorded them."""
    import torch

    trl_fields = set(torch.load(PARITY_REFERENCE, weights_only=True)["ppo_config_fields"])
    ours = {f.name for f in dataclasses.fields(PPO)} - {"entropy_coef", "length_buckets", "pack_rows"}  # ours, not TRL 0.11.4's
    assert ours <= trl_fields, ours - trl_fields


def test_ppo_hyperparameters_have_no_default():
    required = {f.name for f in dataclasses.fields(PPO) if f.default is dataclasses.MISSING}
    assert {"learning_rate", "batch_size", "mini_batch_size", "adap_kl_ctrl", "init_kl_coef", "target",
            "horizon"} <= required
    with pytest.raises(TypeError):
        PPO(learning_rate=1e-5)


def test_ints_become_floats_and_lists_tuples():
    p = Policy(model="m", lora_dropout=0, lora_target_modules=["q", "v"])
    assert p.lora_dropout == 0.0 and isinstance(p.lora_dropout, float)
    assert p.lora_target_modules == ("q", "v")


@pytest.mark.parametrize("text, tp, expected", [
    ("1e-5", float, 1e-5), ("3", float, 3.0), ("64", int, 64), ("true", bool, True), ("Off", bool, False),
    ("none", Optional[int], None), ("12", Optional[int], 12), ("q_proj, v_proj", Optional[tuple[str, ...]],
                                                                  ("q_proj", "v_proj")),
    ("8bit", Literal["none", "8bit"], "8bit"), ("pkg.mod:fn", Union[str, Callable, None], "pkg.mod:fn"),
])
def test_parse_value(text, tp, expected):
    assert parse_value(text, tp) == expected


@pytest.mark.parametrize("text, tp", [("abc", int), ("1.5", int), ("maybe", bool), ("16bit", Literal["none", "8bit"]),
                                      ("", float)])
def test_parse_value_rejects(text, tp):
    with pytest.raises(RecipeError, match="expects"):
        parse_value(text, tp, "x.y")


def test_overrides_apply_and_revalidate():
    r = apply_overrides(BASE, ["ppo.learning_rate=1e-5", "ppo.batch_size=64", "ppo.mini_batch_size=16",
                               "policy.quantization=8bit", "policy.lora_target_modules=c_attn",
                               "prompts.filter=none", "run.output_dir=/tmp/x"])
    assert (r.ppo.learning_rate, r.ppo.batch_size, r.ppo.mini_batch_size) == (1e-5, 64, 16)
    assert r.policy.quantization == "8bit" and r.policy.lora_target_modules == ("c_attn",)
    assert r.prompts.filter is None and BASE.prompts.filter is not None  # the original is untouched
    with pytest.raises(RecipeError, match="multiple of"):
        apply_overrides(BASE, ["ppo.batch_size=64"])  # 64 is no multiple of the recipe's mini-batch 128


@pytest.mark.parametrize("item, message", [
    ("ppo.lr=1", "unknown override key 'ppo.lr'; did you mean ppo.learning_rate? valid keys: ppo.learning_rate"),
    ("ppo.kl_coef=1", "did you mean ppo.init_kl_coef?"),
    ("ppo.learning_rat=1", "did you mean ppo.learning_rate?"),
    ("rewards.model=x", "unknown override section 'rewards' in 'rewards.model=x'; did you mean reward?"),
    ("optim.lr=1", "unknown override section 'optim'"),
    ("learning_rate=1", "must look like section.field=value"),
    ("ppo.learning_rate", "must look like section.field=value"),
    ("ppo.batch_size=abc", "ppo.batch_size expects int, got 'abc'"),
    ("policy.quantization=2bit", "policy.quantization expects one of"),
])
def test_override_errors(item, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(".", r"\.").replace("?", r"\?")):
        apply_overrides(BASE, [item])


def test_none_unsets_and_a_double_reward_says_what_to_type():
    with pytest.raises(RecipeError, match="also set reward.model=none"):
        apply_overrides(BASE, ["reward.function=builtins:len"])
    recipe = apply_overrides(BASE, ["reward.function=builtins:len", "reward.model=none"])
    assert recipe.reward.model is None and recipe.reward.function == "builtins:len"


def test_every_field_is_a_valid_key():
    keys = valid_keys()
    assert "policy.model" in keys and "reward.model" in keys and "prompts.dataset" in keys
    assert len(keys) == len(set(keys))


def test_to_dict_is_json(tmp_path):
    d = json.loads(json.dumps(BASE.to_dict()))
    assert d["ppo"]["init_kl_coef"] == 0.2 and d["prompts"]["filter"].endswith("long_review")


def test_load_recipe_by_path_and_errors(tmp_path):
    good = tmp_path / "mine.py"
    good.write_text("from rlhf_recipes.recipes.imdb_positive import recipe as base\n"
                    "import dataclasses\nrecipe = dataclasses.replace(base, name='mine')\n")
    assert load_recipe(good).name == "mine"
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(RecipeError, match="module-level `recipe"):
        load_recipe(empty)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.py")
    with pytest.raises(RecipeError, match="shipped recipes: detoxify"):
        load_recipe("no_such_recipe")
    bad = tmp_path / "bad.py"
    bad.write_text("from rlhf_recipes import Policy\nrecipe = Policy(model='m', lora_r=-1)\n")
    with pytest.raises(RecipeError, match="bad.py: policy.lora_r"):
        load_recipe(bad)
    typo = tmp_path / "typo.py"
    typo.write_text("from rlhf_recipes import Policy\nrecipe = Policy(modle='m')\n")
    with pytest.raises(RecipeError, match="typo.py: policy.modle is not a field of Policy; its fields: model,"):
        load_recipe(typo)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(RecipeError, match="not a Python file"):
        load_recipe(text)
