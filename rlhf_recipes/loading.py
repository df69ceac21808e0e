"""Loading models, tokenizers and datasets, with errors that name the recipe field to fix.

A missing local path and an unreachable Hub both surface from transformers and datasets
as long tracebacks; here they become one RecipeError that says which field and why.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .config import RecipeError


def describe_missing(key: str, name: str) -> str:
    """The message for a model or dataset that cannot be found."""
    where = ("the Hub is switched off (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1"
             else "the Hugging Face Hub has no such repo or cannot be reached")
    return (f"{key}: cannot load {name!r}: it is not a local directory or file, and {where}; "
            f"fix the path, or set {key}=<local directory>")


def load_pretrained(key: str, loader: Callable[..., Any], name: str, **kwargs: Any) -> Any:
    """`loader(name, **kwargs)` (a from_pretrained), turning load failures into a RecipeError naming `key`."""
    path = Path(name).expanduser()
    if path.exists():
        try:
            return loader(str(path), **kwargs)
        except (OSError, ValueError) as err:  # ValueError: e.g. a classifier where a causal LM belongs
            raise RecipeError(f"{key}: {name!r} exists but does not load: {_explain(err)}") from None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an org/name Hub id
        raise RecipeError(f"{key}: local path {name!r} does not exist; fix the path or give a Hub id")
    try:
        return loader(name, **kwargs)
    except OSError:
        raise RecipeError(describe_missing(key, name)) from None


def _explain(err: BaseException) -> str:
    """The loader's first line, with our safety rules spelled out where one of them refused."""
    text = first_line(err)
    if "custom code" in text:
        return text + " It runs only if the recipe sets policy.trust_remote_code=true (for code you trust)"
    if "pytorch checkpoint" in text:  # transformers reads .bin files with torch.load(weights_only=True)
        return ("its pickled weights (.bin) hold more than tensors, and pickled code is never run; "
                "use a safetensors copy of the model")
    return text


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
