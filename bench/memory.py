"""Memory of one PPO step (generate, then TRL's step) for fp32 LoRA, 8-bit LoRA, 4-bit LoRA,
and full fine-tuning with a separate reference copy, with the ratios.

    python bench/memory.py --shape gpt2-small --batch 16

Each configuration runs in a fresh process. On a CPU two figures are taken, both less the
resident memory before anything was loaded: the resident memory once the models are built
(freed loading buffers returned to the system first; an 8-bit model is read in fp32 and
then quantized), and the peak during the step, sampled every 2 ms. On CUDA the figure is
torch.cuda.max_memory_allocated. Rewards are fixed numbers, so no classifier is counted.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import subprocess
import sys
import threading

from common import build_models, table, trl011_python, write_section

CONFIGS = ["none", "8bit", "4bit", "full"]
LABELS = {"none": "fp32 LoRA", "8bit": "8-bit LoRA", "4bit": "4-bit LoRA", "full": "full fine-tuning + reference copy"}


def one(config: str, shape: str, batch: int) -> dict:
    """Run in a child process: one PPO step in `config`; returns memory figures in MB."""
    import torch
    from accelerate import PartialState

    from rlhf_recipes import ppo
    from rlhf_recipes.components.policy import build_policy, load_tokenizer
    from rlhf_recipes.components.rollout import generate
    from throughput import recipe_for

    device = PartialState().device
    paths = build_models(shape)
    args = argparse.Namespace(batch=batch, epochs=1, min_tokens=16, max_tokens=16, warmup=0, steps=1)
    recipe = recipe_for(paths, args, "unused", mini_batch=batch // 4)
    tokenizer = load_tokenizer("policy.model", str(paths["policy"]))
    queries = [torch.randint(1, 500, (8,)) for _ in range(batch)]
    before = _rss_mb()
    if config == "full":
        model, trainer = _full_finetuning(recipe, tokenizer, paths)
    else:
        model = build_policy(dataclasses.replace(recipe.policy, quantization=config), device)
        trainer = ppo.make_trainer(recipe, model, tokenizer)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back the buffers loading freed
    loaded = _rss_mb()
    with _PeakRss() as peak:
        responses = generate(model, tokenizer, queries, [16] * batch, recipe.generation, device)
        if config == "full":  # TRL 0.11.4's step, in its own venv
            trainer.step([q.to(device) for q in queries], [r.to(device) for r in responses],
                         [torch.tensor(1.0, device=device) for _ in queries])
        else:
            ppo.ppo_step(trainer, queries, responses, [1.0] * len(queries))
    out = {"loaded_mb": loaded - before, "step_peak_mb": peak.mb - before}
    if torch.cuda.is_available():
        out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def _rss_mb() -> float:
    text = open("/proc/self/status").read()
    return int(text.split("VmRSS:")[1].split()[0]) / 1024


class _PeakRss:
    """The largest resident set seen while inside, sampled every 2 ms by a thread."""

    def __enter__(self) -> "_PeakRss":
        self.mb, self._done = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(0.002):
            self.mb = max(self.mb, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.mb = max(self.mb, _rss_mb())


def _full_finetuning(recipe, tokenizer, paths):
    """Every weight trained, and the reference a second full copy: how TRL's examples began.
    TRL 0.11.4's own trainer, so this runs in a venv with it (common.trl011_python)."""
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model

    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(paths["policy"]))
    ref = create_reference_model(model)
    ppo = recipe.ppo
    config = PPOConfig(learning_rate=ppo.learning_rate, batch_size=ppo.batch_size, mini_batch_size=ppo.mini_batch_size,
                       ppo_epochs=ppo.ppo_epochs, log_with=None)
    return model, PPOTrainer(config, model, ref_model=ref, tokenizer=tokenizer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="gpt2-small", choices=["tiny", "gpt2-small"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.shape, args.batch)))
        return
    build_models(args.shape)
    peaks = {}
    for config in CONFIGS:
        python = trl011_python() if config == "full" else [sys.executable]
        if python is None:
            print("full fine-tuning skipped: it runs TRL 0.11.4's trainer, and no venv with it was found "
                  "(bench/trl011_venv.sh makes one)")
            continue
        done = subprocess.run([*python, __file__, "--one", config, "--shape", args.shape,
                               "--batch", str(args.batch)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{config} failed:\n{done.stderr[-2000:]}")
        peaks[config] = json.loads(done.stdout.strip().splitlines()[-1])
    keys = ["cuda_mb"] if "cuda_mb" in peaks["none"] else ["loaded_mb", "step_peak_mb"]
    rows = [[LABELS[c], *(f"{peaks[c][k]:.0f} ({peaks[c][k] / peaks['none'][k]:.2f}x)" for k in keys)]
            for c in CONFIGS if c in peaks]
    head = ["configuration", "peak GPU MB"] if keys == ["cuda_mb"] else \
        ["configuration", "resident after loading, MB", "peak during the step, MB"]
    k = keys[-1]
    body = (f"Shape {args.shape}, one PPO step of batch {args.batch} (16 new tokens each); in brackets, the ratio "
            "to fp32 LoRA.\n\n" + table(rows, head)
            + f"\n- 8-bit LoRA / fp32 LoRA, peak: **{peaks['8bit'][k] / peaks['none'][k]:.2f}** (target: at most 0.4)\n"
            + (f"- full fine-tuning with a reference copy (TRL 0.11.4) / fp32 LoRA, peak: "
               f"**{peaks['full'][k] / peaks['none'][k]:.2f}**; the LoRA reference is the same weights with adapters "
               "off, so it costs no second copy\n" if "full" in peaks else ""))
    write_section(f"memory ({args.shape}, {'GPU' if keys == ['cuda_mb'] else 'CPU'})", body)
    print(body)


if __name__ == "__main__":
    main()
