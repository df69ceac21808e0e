"""Loading models, tokenizers and datasets, with errors that name the recipe field to fix.

A missing local path and an unreachable Hub both surface from transformers and datasets
as long tracebacks; here they become one RecipeError that says which field and why.
"""
from __future__ import annotations

import glob
import os
import socket
from pathlib import Path
from urllib.parse import urlparse
from typing import Any, Callable

from ..config.sections import PATH_FIELDS, RecipeError


def describe_missing(key: str, name: str) -> str:
    """The message for a model or dataset that cannot be found."""
    where = ("the Hub is switched off (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1"
             else "the Hugging Face Hub has no such repo or cannot be reached")
    return (f"{key}: cannot load {name!r}: it is not a local directory or file, and {where}; "
            f"fix the path, or set {key}=<local directory>")


def load_pretrained(key: str, loader: Callable[..., Any], name: str, **kwargs: Any) -> Any:
    """`loader(name, **kwargs)` (a from_pretrained), turning load failures into a RecipeError naming `key`."""
    import pickle

    from .compat import no_progress_bars

    path = Path(name).expanduser()
    if path.exists():
        try:
            with no_progress_bars():
                return loader(str(path), **kwargs)
        except pickle.UnpicklingError:  # transformers 5.x lets torch's refusal through
            raise RecipeError(f"{key}: {name!r} exists but does not load: {_PICKLED}") from None
        except (OSError, ValueError) as err:  # ValueError: e.g. a classifier where a causal LM belongs
            raise RecipeError(f"{key}: {name!r} exists but does not load: {_explain(err)}") from None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an org/name Hub id
        raise RecipeError(f"{key}: local path {name!r} does not exist; fix the path or give a Hub id")
    try:
        with no_progress_bars():
            return loader(name, **kwargs)
    except OSError:
        raise RecipeError(describe_missing(key, name)) from None


_PICKLED = ("its pickled weights (.bin) hold more than tensors, and pickled code is never run; "
            "use a safetensors copy of the model")


def _explain(err: BaseException) -> str:
    """The loader's first line, with our safety rules spelled out where one of them refused."""
    text = first_line(err)
    if "custom code" in text:
        return text + " It runs only if the recipe sets policy.trust_remote_code=true (for code you trust)"
    if "pytorch checkpoint" in text:  # transformers reads .bin files with torch.load(weights_only=True)
        return _PICKLED
    return text


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def hub_names(recipe) -> list[tuple[str, str]]:
    """(field, value) of each model or dataset field that names no local path: a Hub id."""
    fields = [(f"{s}.{n}", getattr(getattr(recipe, s), n)) for s, names in PATH_FIELDS.items()
              if getattr(recipe, s) is not None for n in names]
    return [(k, v) for k, v in fields if isinstance(v, str) and v and not glob.glob(str(Path(v).expanduser()))]


def check_hub(recipe, timeout: float = 5.0) -> None:
    """With the Hub switched on and a recipe that needs it, fail in one line at once if it cannot
    be reached, instead of after a minute of transformers' and datasets' retries."""
    needed = hub_names(recipe)
    if not needed or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as err:
        key, name = needed[0]
        raise RecipeError(f"the Hugging Face Hub ({url.hostname}) cannot be reached ({err.strerror or err}), and "
                          f"{key} {name!r} is a Hub id: connect to the network, or set HF_HUB_OFFLINE=1 to use "
                          f"what is already in the Hugging Face cache, or set {key}=<local path>") from None
