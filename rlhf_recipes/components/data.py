"""Prompts from `datasets`: load, filter, hold out an evaluation split, cut to query lengths.

Training batches are a pure function of (seed, step), so any step's batch can be
recomputed after a restart without replaying the ones before it.
"""
from __future__ import annotations

import contextlib
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.recipe import resolve_callable
from ..config.section import template_columns
from ..config.sections import Prompts, RecipeError
from .loading import describe_missing, first_line

_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_CHARS_PER_TOKEN_BOUND = 32  # cut texts before tokenizing: no real token is this long


@dataclass(frozen=True)
class PromptSet:
    """Query token ids: `train` for PPO, `heldout` (never trained on) for evaluation."""

    train: list[torch.Tensor]
    heldout: list[torch.Tensor]
    duplicates: int = 0
    """Queries dropped because an earlier one had the same token ids (short prompts repeat:
    IMDB's "This movie" is many reviews' first two tokens)."""
    heldout_texts: tuple[str, ...] = ()
    """The held-out prompts as texts, before any chat template (what DPO's pairs are kept apart from)."""


def load_texts(cfg: Prompts) -> list[str]:
    """The prompt texts, after the recipe's filter: prompts.template filled from each row's
    columns, or prompts.text_column."""
    return [t for (t,) in load_templated("prompts", cfg.dataset, cfg.split, cfg.subset, cfg.template,
                                         cfg.text_column, keep=cfg.filter)]


def load_templated(section: str, dataset: str, split: str, subset: str | None, template: str | None,
                   text_column: str, extra: dict[str, str] | None = None, keep: Any = None) -> list[tuple[str, ...]]:
    """Rows of (text, *extra columns): the text is `template` filled from the row's columns, or
    the `text_column`; `extra` ({field: column}) adds columns as they are."""
    fields = template_columns(template) if template else []
    columns = {f"template:{f}": f for f in fields} if template else {"text_column": text_column}
    rows = load_columns(section, dataset, split, subset, {**columns, **(extra or {})}, keep)
    if not template:
        return rows
    n = len(fields)
    return [(template.format(**dict(zip(fields, row[:n]))), *row[n:]) for row in rows]


def load_columns(section: str, dataset: str, split: str, subset: str | None, columns: dict[str, str],
                 keep: Any = None, ranked: str | None = None) -> list[tuple]:
    """Rows of the named text columns ({field: column path}) of a dataset, after the filter `keep`.

    Rows where any of them is not a non-empty string are dropped; the field `ranked`, if
    given, holds a list of such strings instead (a tuple, kept when it has two or more).
    Errors name `section`'s fields.
    """
    with no_progress_bars():
        ds = _load_dataset(section, dataset, split, subset)
        for name, path in columns.items():
            if path.split(".")[0] not in ds.column_names:
                what = (f"{section}.template names column {{{path}}}, which" if name.startswith("template:")
                        else f"{section}.{name} {path!r}")
                raise RecipeError(f"{what} is not in {dataset!r}; its columns: {', '.join(ds.column_names)}")
        if keep is not None:
            ds = ds.filter(resolve_callable(keep, f"{section}.filter"), load_from_cache_file=False)
        else:
            ds = ds.select_columns(sorted({path.split(".")[0] for path in columns.values()}))
        rows = [tuple(_field(row, path) for path in columns.values()) for row in ds]
    if ranked is not None:
        at = list(columns).index(ranked)
        if rows and not any(isinstance(r[at], (list, tuple)) for r in rows):
            raise RecipeError(f"{section}.{ranked} {columns[ranked]!r} holds {type(rows[0][at]).__name__}, not "
                              "lists of texts (best first); name a column of lists, or use chosen and rejected columns")
        rows = [(*r[:at], tuple(t for t in r[at] if isinstance(t, str) and t.strip()), *r[at + 1:])
                for r in rows if isinstance(r[at], (list, tuple))]
    return [r for r in rows if all(len(v) >= 2 if isinstance(v, tuple) else isinstance(v, str) and v.strip()
                                   for v in r)]


def load_preferences(section: str, cfg, prompt_column: str | None = None) -> list[list[tuple[str, ...]]]:
    """Preference pairs from a reward_model or dpo section, one group per dataset row:
    [(prompt, chosen, rejected)] (without the prompt if prompt_column is None), or a ranking's
    K(K-1)/2 pairs, each better answer before each worse one. Groups keep a row's pairs together,
    so a held-out share never shares a prompt with training."""
    answers = ({"ranking_column": cfg.ranking_column} if cfg.ranking_column else
               {"chosen_column": cfg.chosen_column, "rejected_column": cfg.rejected_column})
    columns = {**({"prompt_column": prompt_column} if prompt_column else {}), **answers}
    rows = load_columns(section, cfg.dataset, cfg.split, getattr(cfg, "subset", None), columns,
                        ranked="ranking_column" if cfg.ranking_column else None)
    lead = 1 if prompt_column else 0
    if not cfg.ranking_column:
        return [[row] for row in rows]
    return [[(*row[:lead], best, worse) for i, best in enumerate(row[lead]) for worse in row[lead][i + 1:]]
            for row in rows]


@contextlib.contextmanager
def no_progress_bars():
    """Hide `datasets`' bars (one per split, filter and map, for seconds of work) while inside."""
    from datasets import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    shown = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            enable_progress_bars()


def _load_dataset(section: str, dataset: str, split: str, subset: str | None):
    from datasets import load_dataset  # heavy: imported only when data is loaded
    from datasets.exceptions import DatasetGenerationError

    key = f"{section}.dataset"
    matches = sorted(glob.glob(str(Path(dataset).expanduser())))
    files = bool(matches) and Path(matches[0]).is_file()
    builder = _BUILDERS.get(Path(matches[0]).suffix) if files else None
    if files and builder is None:
        raise RecipeError(f"{key} {dataset!r}: unsupported file type; "
                          f"use {', '.join(_BUILDERS)} files or a Hub dataset id")
    if files and all(Path(m).stat().st_size == 0 for m in matches):
        raise RecipeError(f"{key} {dataset!r} is empty; give a file with data in it")
    try:
        if files:
            return load_dataset(builder, data_files=matches, split="train")
        return load_dataset(matches[0] if matches else dataset, subset, split=split)
    except DatasetGenerationError as err:
        raise RecipeError(f"{key} {dataset!r} cannot be parsed: {first_line(err.__cause__ or err)}; "
                          "fix the file") from None
    except (FileNotFoundError, ConnectionError, OSError) as err:
        if matches:
            raise RecipeError(f"{key} {dataset!r} does not load: {first_line(err)}") from None
        if dataset.startswith((".", "/", "~")) or Path(dataset).suffix in _BUILDERS:
            raise RecipeError(f"{key}: local file {dataset!r} does not exist; fix the path") from None
        raise RecipeError(describe_missing(key, dataset)) from None
    except ValueError as err:  # e.g. a split that does not exist
        has_subset = subset is not None or section == "prompts"  # the stages' sections have no subset
        fields = f"{section}.split and {section}.subset" if has_subset else f"{section}.split"
        raise RecipeError(f"{section}: {first_line(err)}; check {fields}") from None


def _field(row: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def load_prompts(cfg: Prompts, tokenizer, heldout: int, seed: int, seq2seq: bool = False) -> PromptSet:
    """Shuffle (seeded), cut each text to a sampled query length, drop repeated queries, and
    hold out the first `heldout`.

    A query's length counts the text's tokens: a BOS token the tokenizer adds (Llama, Mistral)
    comes on top, once, at the start. For an encoder-decoder policy (seq2seq) a query is the
    whole text, cut to prompts.max_source_tokens with the EOS its tokenizer appends kept.
    """
    if seq2seq and cfg.chat_template:
        raise RecipeError("prompts.chat_template is for causal instruct models; an encoder-decoder policy reads "
                          "the text as it is: set prompts.chat_template=false")
    texts = load_texts(cfg)
    if len(texts) <= heldout:
        raise RecipeError(f"prompts: {cfg.dataset!r} has {len(texts)} usable texts after filtering, "
                          f"but eval.num_prompts={heldout} are held out; lower eval.num_prompts or use more data")
    rng = np.random.default_rng(seed)
    texts = [texts[i] for i in rng.permutation(len(texts))]
    lengths = rng.integers(cfg.query_min_tokens, cfg.query_max_tokens + 1, size=len(texts))
    if seq2seq:
        ids = tokenizer(texts, truncation=True, max_length=cfg.max_source_tokens)["input_ids"]
        lengths = [len(x) for x in ids]  # whole: never cut to a sampled length
    else:
        limit = cfg.query_max_tokens * _CHARS_PER_TOKEN_BOUND
        ids = tokenizer([t[:limit] for t in texts])["input_ids"]
    bos = tokenizer.bos_token_id
    seen: dict[tuple[int, ...], str] = {}
    candidates = 0
    for x, n in zip(ids, lengths):
        lead = 1 if bos is not None and x and x[0] == bos and len(x) > 1 else 0
        query = tuple(x[:lead + n])
        if len(query) > lead:
            text = tokenizer.decode(query[lead:], skip_special_tokens=True)
            if cfg.chat_template:
                query = tuple(encode_prompt(cfg, tokenizer, text))
            candidates += 1
            seen.setdefault(query, text)
    queries = [torch.tensor(q, dtype=torch.long) for q in seen]
    if len(queries) <= heldout:
        raise RecipeError(f"prompts: {cfg.dataset!r} has {len(queries)} distinct prompts after filtering, "
                          f"but eval.num_prompts={heldout} are held out; lower eval.num_prompts or use more data")
    train = queries[heldout:]
    if cfg.max_prompts is not None:
        train = train[:cfg.max_prompts]
    return PromptSet(train=train, heldout=queries[:heldout], duplicates=candidates - len(queries),
                     heldout_texts=tuple(list(seen.values())[:heldout]))


def encode_prompt(cfg: Prompts, tokenizer, text: str) -> list[int]:
    """`text`'s token ids as a prompt: as they are, or (prompts.chat_template) render_prompt's
    text tokenized without added specials: a template that writes its own BOS (Llama 3, Gemma)
    would otherwise get a second one."""
    if not cfg.chat_template:
        return tokenizer(text)["input_ids"]
    return tokenizer(render_prompt(cfg, tokenizer, text), add_special_tokens=False)["input_ids"]


def render_prompt(cfg: Prompts, tokenizer, text: str) -> str:
    """`text` as the user's turn in the tokenizer's chat template, after prompts.system if set,
    with the assistant's turn opened. A text cut inside a multi-byte character ends in a
    replacement character, dropped here."""
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError("prompts.chat_template=true, but policy.model's tokenizer has no chat template (a base "
                          "model?); use an instruct model, or set prompts.chat_template=false")
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
        {"role": "user", "content": text.rstrip("\ufffd").strip()}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def turn_end_id(tokenizer, ends: list[int]) -> int:
    """The token that ends an assistant's turn in the tokenizer's chat template: the last of `ends`
    (end_ids) in a rendered conversation that ends with a reply. DPO's chat answers end in it, as
    sampled ones do."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    return next((i for i in reversed(ids) if i in ends), ends[0])


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices into n prompts for PPO step `step` (0-based).

    The stream is one seeded permutation of range(n) per epoch, laid end to end;
    step s takes items [s * batch_size, (s + 1) * batch_size) of it.
    """
    out, start = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return out
