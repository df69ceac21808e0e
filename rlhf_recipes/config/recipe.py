"""Finding recipes and changing them from the command line.

`load_recipe` takes a recipe file's path or the name of a shipped recipe;
`apply_overrides` applies `section.field=value` strings, parsed to each field's type.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib
import importlib.util
import pkgutil
import re
import sys
import traceback
import typing
from pathlib import Path
from typing import Any, Literal, Union

from ..components.loading import first_line
from .section import conforms, type_name
from .sections import PATH_FIELDS, SECTIONS, Recipe, RecipeError


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with the package (`rlhf_recipes.recipes.<name>`)."""
    from .. import recipes

    return sorted(m.name for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_"))


def load_recipe(path_or_name: str | Path) -> Recipe:
    """The module-level `recipe` of a recipe file, given its path or a shipped recipe's name."""
    text = str(path_or_name)
    path = Path(text)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {text!r} does not exist; give a path to a .py file "
                              f"or a shipped recipe name ({', '.join(shipped_recipes())})")
        name = f"_rlhf_recipe_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None:
            raise RecipeError(f"recipe file {text!r} is not a Python file; give a .py recipe")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except RecipeError as err:
            raise RecipeError(f"{text}: {err}") from None
        except TypeError as err:  # most often a misspelled or missing section field
            raise RecipeError(f"{text}: {_explain(err)}") from None
        except SyntaxError as err:
            raise RecipeError(f"{text}: syntax error at line {err.lineno}: {err.msg}; fix the recipe file") from None
        except Exception as err:  # the recipe's own code failed: say where, in one line
            frames = traceback.extract_tb(err.__traceback__)
            lines = [f.lineno for f in frames if Path(f.filename).resolve() == path.resolve()]
            where = f" line {lines[-1]}" if lines else ""
            raise RecipeError(f"{text}{where}: {type(err).__name__}: {first_line(err)}; fix the recipe file") from None
    elif text in shipped_recipes():
        module = importlib.import_module(f"rlhf_recipes.recipes.{text}")
    else:
        raise RecipeError(f"no recipe file or shipped recipe named {text!r}; "
                          f"shipped recipes: {', '.join(shipped_recipes())}")
    recipe = getattr(module, "recipe", None)
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"{text} must define a module-level `recipe = Recipe(...)`, "
                          f"found {type(recipe).__name__ if recipe is not None else 'none'}")
    return recipe


def _explain(err: TypeError) -> str:
    """A dataclass's TypeError, with the fields the section does have."""
    found = re.match(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(err))
    section = next((s for s in SECTIONS.values() if found and s.__name__ == found[1]), None)
    if section is None:
        return f"{first_line(err)}; fix the recipe file"
    names = [f.name for f in dataclasses.fields(section)]
    return f"{section.section}.{found[2]} is not a field of {found[1]}; its fields: {', '.join(names)}"


def valid_keys() -> list[str]:
    """Every `section.field` that an override may name."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def suggest(name: str, fields: list[str]) -> list[str]:
    """The fields a mistyped `name` most likely meant: by initials (lr: learning_rate), by
    containment (kl_coef: init_kl_coef), else by spelling."""
    initials = [f for f in fields if "_" in f and "".join(w[0] for w in f.split("_")) == name]
    contained = [f for f in fields if len(name) >= 3 and (name in f or f in name)]
    return (initials or contained or difflib.get_close_matches(name, fields, n=2, cutoff=0.75))[:2]


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """A copy of `recipe` with each `section.field=value` applied, type-checked and re-validated."""
    changes: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise RecipeError(f"override {item!r} must look like section.field=value, e.g. ppo.learning_rate=1e-5")
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise RecipeError(f"unknown override section {section!r} in {item!r}; {hint}"
                              f"valid sections: {', '.join(SECTIONS)}")
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        if name not in fields:
            keys = [k for k in valid_keys() if k.startswith(section + ".")]
            close = [f"{section}.{f}" for f in suggest(name, [f.name for f in dataclasses.fields(SECTIONS[section])])]
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise RecipeError(f"unknown override key {key!r}; {hint}valid keys: {', '.join(keys)}")
        tp = typing.get_type_hints(SECTIONS[section])[name]
        changes.setdefault(section, {})[name] = parse_value(text.strip(), tp, key)
    absent = [s for s in changes if getattr(recipe, s) is None]
    if absent:
        raise RecipeError(f"{absent[0]}.{next(iter(changes[absent[0]]))}: recipe {recipe.name!r} has no "
                          f"{absent[0]} stage; add one to the recipe file to configure it")
    updated = {s: dataclasses.replace(getattr(recipe, s), **kw) for s, kw in changes.items()}
    return dataclasses.replace(recipe, **updated)


def absolute_paths(recipe: Recipe) -> Recipe:
    """`recipe` with each local path in PATH_FIELDS made absolute (a glob stays a glob), so that
    what a run records (recipe.json, the adapter's base model) holds from any directory."""
    changes = {}
    for section, names in PATH_FIELDS.items():
        cfg = getattr(recipe, section)
        if cfg is None:
            continue
        local = {n: str(Path(v).expanduser().absolute()) for n in names
                 if (v := getattr(cfg, n)) and glob.glob(str(Path(v).expanduser()))}
        if local:
            changes[section] = dataclasses.replace(cfg, **local)
    return dataclasses.replace(recipe, **changes)


_TRUE, _FALSE, _NONE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}, {"none", "null"}


def parse_value(text: str, tp: Any, key: str = "value") -> Any:
    """Parse a command-line string to the annotated type `tp`, or raise a RecipeError naming `key`."""
    value = _parse(text, tp)
    if value is _BAD or not conforms(value, tp):
        raise RecipeError(f"{key} expects {type_name(tp)}, got {text!r}")
    return value


_BAD = object()


def _parse(text: str, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or (origin is not None and type(None) in args):
        if text.lower() in _NONE and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):  # first type that parses wins
            value = _parse(text, arg)
            if value is not _BAD and conforms(value, arg):
                return value
        return _BAD
    if origin is Literal:
        return text if text in args else _BAD
    if origin is tuple:  # each item parsed to the item type: 1,2 is (1.0, 2.0) for tuple[float, ...]
        items = tuple(_parse(part.strip(), args[0]) for part in text.split(",") if part.strip())
        return _BAD if _BAD in items else items
    if tp is bool:
        low = text.lower()
        return True if low in _TRUE else False if low in _FALSE else _BAD
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            return _BAD
    return text if tp is str else _BAD  # a callable is given as a 'module:function' str


def resolve_callable(spec: Any, key: str) -> Any:
    """A callable given directly or as 'package.module:function'."""
    if callable(spec):
        return spec
    module_name, _, attr = str(spec).partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"{key}: cannot import {spec!r} ({err}); "
                          "give 'package.module:function' importable from this environment") from None
    if not callable(target):
        raise RecipeError(f"{key}: {spec!r} is not callable")
    return target
