"""Every shipped recipe loads, validates, imports as a package module and dry-runs."""
import ast
import dataclasses
import importlib
import inspect
import json

import pytest

from rlhf_recipes import PPO, Recipe, load_recipe, shipped_recipes
from rlhf_recipes.run import main

NAMES = shipped_recipes()


def test_the_four_recipes_ship():
    assert {"imdb_positive", "detoxify", "imdb_positive_7b_8bit", "quickstart"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_loads_and_validates(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe) and recipe.name == name
    assert (recipe.ppo is None or recipe.ppo.adap_kl_ctrl is True) and recipe.eval.num_prompts >= 256
    module = importlib.import_module(f"rlhf_recipes.recipes.{name}")
    assert module.recipe == recipe


@pytest.mark.parametrize("name", NAMES)
def test_recipe_sets_every_ppo_hyperparameter_it_must(name):
    """The keywords written in the PPO(...) call, read from the source, cover every required field;
    a DPO, GRPO or RLOO call writes every hyperparameter out (all but where its data comes from)."""
    source = inspect.getsource(importlib.import_module(f"rlhf_recipes.recipes.{name}"))
    recipe = load_recipe(name)
    method = type(getattr(recipe, recipe.method))
    calls = [n for n in ast.walk(ast.parse(source))
             if isinstance(n, ast.Call) and getattr(n.func, "id", "") == method.__name__]
    written = {kw.arg for kw in calls[0].keywords}
    data = {"split", "subset", "prompt_column", "chosen_column", "rejected_column", "ranking_column", "heldout"}
    required = {f.name for f in dataclasses.fields(method) if f.default is dataclasses.MISSING or
                (method is not PPO and f.name not in data)}
    assert required <= written
    lines = len(source.strip().splitlines())
    assert lines <= 60, f"{name} is {lines} lines; keep recipes short"


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_prints_the_resolved_recipe(name, capsys):
    method = load_recipe(name).method
    assert main([name, f"{method}.learning_rate=2e-5", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["name"] == name and printed[method]["learning_rate"] == 2e-5


def test_recipe_file_by_path(capsys):
    path = importlib.import_module("rlhf_recipes.recipes.detoxify").__file__
    assert main([path, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["reward"]["label"] == "nothate"
