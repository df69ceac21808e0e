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
    assert recipe.ppo.adap_kl_ctrl is True and recipe.eval.num_prompts >= 256
    module = importlib.import_module(f"rlhf_recipes.recipes.{name}")
    assert module.recipe == recipe


@pytest.mark.parametrize("name", NAMES)
def test_recipe_sets_every_ppo_hyperparameter_it_must(name):
    """The keywords written in the PPO(...) call, read from the source, cover every required field."""
    source = inspect.getsource(importlib.import_module(f"rlhf_recipes.recipes.{name}"))
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "PPO"]
    written = {kw.arg for kw in calls[0].keywords}
    required = {f.name for f in dataclasses.fields(PPO) if f.default is dataclasses.MISSING}
    assert required <= written
    lines = len(source.strip().splitlines())
    assert lines <= 60, f"{name} is {lines} lines; keep recipes short"


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_prints_the_resolved_recipe(name, capsys):
    assert main([name, "ppo.learning_rate=2e-5", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["name"] == name and printed["ppo"]["learning_rate"] == 2e-5


def test_recipe_file_by_path(capsys):
    path = importlib.import_module("rlhf_recipes.recipes.detoxify").__file__
    assert main([path, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["reward"]["label"] == "nothate"
