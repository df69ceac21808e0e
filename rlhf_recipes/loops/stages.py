"""The stages before PPO: supervised fine-tuning, then a reward model trained on preference pairs.

    OUTPUT_DIR/stages/sft/            the fine-tuned causal LM (safetensors) and tokenizer, stage.json
    OUTPUT_DIR/stages/reward_model/   the one-output classifier (safetensors) and tokenizer, stage.json

The SFT output becomes the PPO policy and reference; the reward model's logit becomes the
reward. stage.json holds a fingerprint of everything the stage read (its section, the model
it started from, the data, the seed, the library versions) and what it measured. A later run
whose fingerprint matches reuses the output, so PPO can be re-tuned without redoing the stages.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          set_seed)

from .. import trl_backend
from ..components import seq2seq
from ..components.data import load_preferences, load_templated, no_progress_bars
from ..components.loading import load_pretrained
from ..components.policy import add_lora, load_tokenizer, lora_config
from ..components.reward import model_inputs
from ..components.rollout import evaluating
from ..config.sections import Recipe, RecipeError
from ..reporting.console import console
from ..reporting.trackers import trainer_settings
from ..runtime import distributed
from ..runtime.rundir import STAGES, atomic_dir
from .stage_models import Precision, for_saving, load_trainable

STAGE_FILE = "stage.json"


def prepare(recipe: Recipe, out: Path, device: torch.device, train: bool = True,
            until: str | None = None, processes: int | None = None) -> Recipe | None:
    """Run (or reuse) the recipe's stages in order, and return the recipe PPO runs: policy.model
    and reward.model pointed at their outputs, with the stages removed.

    train=False only reuses outputs (to re-evaluate a run); until='sft' stops after that stage
    and returns None. processes: how many trained the stages (by default, as many as run now).
    """
    processes = processes or distributed.world()[1]
    ppo_recipe = recipe
    for name, run_stage in (("sft", _sft), ("reward_model", _reward_model)):
        cfg = getattr(recipe, name)
        if cfg is not None:
            target = (out / STAGES / name).absolute()  # the adapter records its base: from anywhere
            base = (cfg.model or ppo_recipe.policy.model) if name == "reward_model" else recipe.policy.model
            fingerprint = _fingerprint(name, cfg, base, recipe, processes)
            if _cached(target) != fingerprint:
                if not train:
                    raise RecipeError(f"{target} is missing or was trained from other inputs; "
                                      "run the recipe again to rebuild it")
                if distributed.zero3():  # our stages merge and save whole models, which ZeRO-3 partitions
                    raise RecipeError(f"the {name} stage does not train under DeepSpeed ZeRO-3; train the stages "
                                      "first with as many processes under accelerate/zero2.yaml or ddp.yaml "
                                      "(--stage reward_model), and the ZeRO-3 run reuses them")
                _build(target, fingerprint, lambda tmp: run_stage(recipe, base, tmp, device, out))
            else:
                console.print(f"{name}: reusing {target} (its inputs are unchanged)")
            ppo_recipe = _use_output(ppo_recipe, name, target)
        if name == until:
            return None
    return dataclasses.replace(ppo_recipe, sft=None, reward_model=None)


def _use_output(recipe: Recipe, name: str, target: Path) -> Recipe:
    if name == "sft":
        return dataclasses.replace(recipe, policy=dataclasses.replace(recipe.policy, model=str(target)))
    reward = dataclasses.replace(recipe.reward, model=str(target), function=None, label=None, score="logit",
                                 max_length=recipe.reward.max_length or recipe.reward_model.max_length)  # as trained
    return dataclasses.replace(recipe, reward=reward, reward_model=None)


# ---------------------------------------------------------------------------- the two stages
def _sft(recipe: Recipe, base: str, tmp: Path | None, device: torch.device, out: Path) -> dict:
    cfg, policy = recipe.sft, recipe.policy
    tokenizer = load_tokenizer("policy.model", base, policy.trust_remote_code)
    config = load_pretrained("policy.model", AutoConfig.from_pretrained, base, trust_remote_code=policy.trust_remote_code)
    encoder_decoder = seq2seq.is_encoder_decoder(config)
    if encoder_decoder and cfg.target_column is None:
        raise RecipeError("sft.target_column is required for an encoder-decoder policy: the column it learns "
                          "to write from the source (sft.template or sft.text_column), e.g. summary")
    extra = {"target_column": cfg.target_column} if encoder_decoder else None
    rows = load_templated("sft", cfg.dataset, cfg.split, None, cfg.template, cfg.text_column, extra)
    held, train = split(rows if encoder_decoder else [r[0] for r in rows], cfg.heldout, recipe.run.seed, "sft")
    set_seed(recipe.run.seed)
    auto = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    precision = Precision(policy.dtype, policy.quantization, cfg.method, cfg.gradient_checkpointing)
    if cfg.init == "random":  # method full: fp32 master weights
        model = auto.from_config(config, dtype=torch.float32).to(device)
    else:
        model = load_trainable("policy.model", auto, base, precision, device, None,
                               trust_remote_code=policy.trust_remote_code)
    if cfg.method == "lora":
        model = add_lora(model, policy)
    measure, fit = ((seq2seq_heldout_loss, trl_backend.train_seq2seq_sft) if encoder_decoder else
                    (heldout_loss, trl_backend.train_sft))
    fitted = _fit(tmp, lambda: measure(model, tokenizer, held, cfg.max_length),
                  lambda work: fit(model, tokenizer, train, cfg, recipe.run.seed, work,
                                   trainer_settings(recipe.run.report_to, out, "sft"), precision.trainer_args()))
    if fitted is None:
        return {}
    before, after, losses = fitted
    # PPO adds fresh adapters on top of the merged weights
    model = for_saving(model, precision, "policy.model", auto, base, trust_remote_code=policy.trust_remote_code)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    console.print(f"sft: {len(train)} texts, held-out loss {before:.3f} -> {after:.3f} ({len(held)} texts)")
    return {"texts": len(train), "heldout_loss_before": before, "heldout_loss_after": after, "train_losses": losses}


def _reward_model(recipe: Recipe, base: str, tmp: Path | None, device: torch.device, out: Path) -> dict:
    cfg = recipe.reward_model
    tokenizer = load_tokenizer("reward_model.model", base)
    held, train = (flatten(g) for g in split(load_preferences("reward_model", cfg), cfg.heldout, recipe.run.seed,
                                             "reward_model"))
    set_seed(recipe.run.seed)
    precision = reward_model_precision(recipe)
    config = load_pretrained("reward_model.model", AutoConfig.from_pretrained, base, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id  # GPT-style classifiers read the last non-pad token
    # the policy's adapters where the classifier is the policy (after SFT, if any); PEFT's default otherwise
    targets = recipe.policy.lora_target_modules if cfg.model is None else None
    with _quiet_transformers():  # the new score head is "newly initialized": that is the point
        if cfg.init == "random":  # method full: fp32 master weights
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).to(device)
        else:
            model = load_trainable("reward_model.model", AutoModelForSequenceClassification, base, precision, device,
                                   lora_config(recipe.policy, "SEQ_CLS", targets) if cfg.method == "lora" else None,
                                   config=config)
    fitted = _fit(tmp, lambda: pair_accuracy(model, tokenizer, held, cfg.max_length),
                  lambda work: trl_backend.train_reward_model(model, tokenizer, train, cfg, recipe.run.seed, work,
                                                              trainer_settings(recipe.run.report_to, out,
                                                                               "reward_model"),
                                                              precision.trainer_args()))
    if fitted is None:
        return {}
    before, after, losses = fitted
    with _quiet_transformers():
        model = for_saving(model, precision, "reward_model.model", AutoModelForSequenceClassification, base,
                           config=config)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    console.print(f"reward_model: {len(train)} pairs, held-out accuracy {before:.1%} -> {after:.1%} "
                  f"({len(held)} pairs)")
    return {"pairs": len(train), "heldout_accuracy_before": before, "heldout_accuracy_after": after,
            "train_losses": losses}


def reward_model_precision(recipe: Recipe) -> Precision:
    """How the reward_model stage loads and trains: its own dtype and quantization, or the policy's
    (quantized only with method=lora)."""
    cfg, policy = recipe.reward_model, recipe.policy
    quantization = cfg.quantization or (policy.quantization if cfg.method == "lora" else "none")
    return Precision(cfg.dtype or policy.dtype, quantization, cfg.method, cfg.gradient_checkpointing)


def _fit(tmp: Path | None, measure, train) -> tuple[float, float, list[float]] | None:
    """(measure before, measure after, losses) of `train(work_dir)`; None on the other processes
    of a launch (tmp None), which only train their share while the main one measures.

    The Trainer writes nothing we keep into work_dir: beside the output, or (on the other
    processes, where it writes nothing at all) a scratch path.
    """
    before = measure() if tmp is not None else None
    work = tmp / "trainer" if tmp is not None else Path(tempfile.gettempdir()) / f"rlhf_recipes-trainer-{os.getpid()}"
    with no_progress_bars():
        losses = train(work)
    return None if tmp is None else (before, measure(), losses)


# ---------------------------------------------------------------------------- measures
def heldout_loss(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over the tokens of `texts`, each ending in EOS."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, len(texts), batch_size):
            batch = model_inputs(tokenizer([t + tokenizer.eos_token for t in texts[start:start + batch_size]],
                                           padding=True, truncation=True, max_length=max_length, return_tensors="pt"),
                                 device)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(**batch, labels=labels).loss) * n
            count += n
    return total / max(count, 1)


def seq2seq_heldout_loss(model, tokenizer, pairs: list[tuple[str, str]], max_length: int, batch_size: int = 64) -> float:
    """Mean cross-entropy (nats) over the target tokens of (source, target) pairs, each target ending in EOS."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            batch = seq2seq.batch(tokenizer, pairs[start:start + batch_size], max_length)
            n = int((batch["labels"] != -100).sum())
            total += float(model(**{k: v.to(device) for k, v in batch.items()}).loss) * n
            count += n
    return total / max(count, 1)


def pair_accuracy(model, tokenizer, pairs: list[tuple[str, str]], max_length: int, batch_size: int = 64) -> float:
    """Share of pairs whose chosen text the one-output classifier scores above the rejected one."""
    device = next(model.parameters()).device
    wins = []
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            scores = [model(**model_inputs(tokenizer([p[i] for p in chunk], padding=True, truncation=True,
                                                     max_length=max_length, return_tensors="pt"), device)).logits[:, 0]
                      for i in (0, 1)]
            wins.append(scores[0] > scores[1])
    return float(torch.cat(wins).float().mean()) if wins else float("nan")


# ---------------------------------------------------------------------------- caching
def _build(target: Path, fingerprint: str, run) -> None:
    """Run a stage into a temporary directory and rename it into place with its stage.json.

    Under `accelerate launch` every process trains (the Trainer shards the data and averages
    the gradients); the main one measures and writes (the others get tmp=None) while they wait.
    """
    if not distributed.is_main():
        run(None)  # its share of the training; the main process measures and saves
        distributed.barrier()
        return
    try:
        with atomic_dir(target) as tmp:
            t0 = time.perf_counter()
            measured = run(tmp)
            shutil.rmtree(tmp / "trainer", ignore_errors=True)
            record = {"fingerprint": fingerprint, "seconds": round(time.perf_counter() - t0, 1),
                      "processes": distributed.world()[1], **measured}
            (tmp / STAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    finally:
        for empty in (target.parent, target.parent.parent):  # a failed first stage leaves no trace
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()
    distributed.barrier()


def _cached(target: Path) -> str | None:
    try:
        return json.loads((target / STAGE_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def _fingerprint(name: str, cfg, base: str, recipe: Recipe, processes: int) -> str:
    """A hash of everything a stage's output depends on."""
    inputs = {"stage": name, "section": recipe.to_dict()[name], "seed": recipe.run.seed, "base": _identity(base),
              "data": _identity(cfg.dataset), "versions": [version(p) for p in ("trl", "transformers", "torch")]}
    if processes > 1:  # batch_size is per process: N processes train another model
        inputs["processes"] = processes
    lora = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules") if cfg.method == "lora" else ()
    if name == "sft":  # what of the policy section SFT uses (PPO's LoRA settings and quantization only for LoRA SFT)
        used = ("dtype", "trust_remote_code") + lora + (("quantization",) if lora else ())
        inputs["policy"] = {k: recipe.to_dict()["policy"][k] for k in used}
    else:
        inputs["precision"] = dataclasses.asdict(reward_model_precision(recipe))
        inputs["policy"] = {k: recipe.to_dict()["policy"][k] for k in lora}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _identity(name: str) -> object:
    """Local files (a file, a directory or a glob) by their contents (by size and mtime above
    64 MB); anything else, a Hub id, by its name."""
    roots = [Path(m) for m in sorted(glob.glob(str(Path(name).expanduser())))]
    files = [(root, f) for root in roots for f in ([root] if root.is_file() else sorted(root.rglob("*")))
             if f.is_file()]
    out = []
    for root, f in files:
        st = f.stat()
        digest = hashlib.sha256(f.read_bytes()).hexdigest() if st.st_size < 2 ** 26 else st.st_mtime_ns
        out.append([f.name if f == root else str(f.relative_to(root)), st.st_size, digest])
    return out or name


def flatten(groups: list[list]) -> list:
    return [item for group in groups for item in group]


def split(rows: list, heldout: int, seed: int, section: str) -> tuple[list, list]:
    """A seeded shuffle: the first `heldout` rows measure the stage, the rest train it."""
    if len(rows) <= heldout:
        raise RecipeError(f"{section}.dataset has {len(rows)} usable rows, but {section}.heldout={heldout} are "
                          f"held out; lower {section}.heldout or use more data")
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    return rows[:heldout], rows[heldout:]


@contextlib.contextmanager
def _quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
