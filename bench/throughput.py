"""PPO step time of rlhf_recipes against the hand-written TRL 0.11.4 loop, as whole-step wall
time (from one step's prompt selection to the next's) and phase by phase, with the ratios.
The TRL loops run in a venv with trl==0.11.4 (bench/trl011_venv.sh; common.trl011_python).

    python bench/throughput.py --shape tiny --batch 64 --mini-batch 64,16 --steps 10 --warmup 3 --rounds 3
    python bench/throughput.py --shape gpt2-small --batch 64 --mini-batch 64,16 --steps 2 --warmup 1 --rounds 3

The plain loop is written the way TRL's gpt2-sentiment example is (a LoRA policy with a
value head, the reference by switching adapters off, a text-classification pipeline with
batch 16, per-sample response lengths of 4-16 tokens), except that it generates the whole
batch in one `generate` call and cuts each response to its own length: the fair hand-written
loop. --per-prompt adds the example's own loop, one `generate` call per prompt. Every loop
uses the same models, prompts, response lengths, batch, PPO settings and seeds. Our phases
are timed from outside by bench/phases.py, so the code measured is the code users run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import build_models, table, trl011_python, write_section
from phases import ORDER, STEP_PHASES, profiled


def recipe_for(paths: dict, args, out: Path, mini_batch: int, extra: tuple[str, ...] = ()):
    from rlhf_recipes import apply_overrides, load_recipe

    return apply_overrides(load_recipe("imdb_positive"), [
        f"policy.model={paths['policy']}", f"reward.model={paths['reward']}", f"prompts.dataset={paths['prompts']}",
        "prompts.filter=none", f"ppo.batch_size={args.batch}", f"ppo.mini_batch_size={mini_batch}",
        f"ppo.ppo_epochs={args.epochs}", f"generation.response_min_tokens={args.min_tokens}",
        f"generation.response_max_tokens={args.max_tokens}", "reward.batch_size=16", "eval.num_prompts=8",
        "eval.batch_size=8", f"run.steps={args.warmup + args.steps}", "run.sample_every=0",
        f"run.checkpoint_every={args.warmup + args.steps}", f"run.output_dir={out}", *extra])


def ours(paths: dict, args, mini_batch: int, extra: tuple[str, ...] = ()) -> list[dict]:
    from rlhf_recipes.loops.training import train

    with tempfile.TemporaryDirectory() as tmp, profiled() as prof:
        train(recipe_for(paths, args, Path(tmp) / "run", mini_batch, extra))
    return prof.steps[args.warmup:]


def plain(paths: dict, args, mini_batch: int, batched: bool) -> list[dict]:
    """TRL's example loop, batched or per prompt, on the same prompts and response lengths as ours."""
    from peft import LoraConfig
    from transformers import AutoTokenizer, pipeline, set_seed
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    from rlhf_recipes.components.data import batch_indices, load_prompts

    recipe = recipe_for(paths, args, Path("unused"), mini_batch)
    tokenizer = AutoTokenizer.from_pretrained(str(paths["policy"]))
    tokenizer.pad_token = tokenizer.eos_token
    prompts = load_prompts(recipe.prompts, tokenizer, recipe.eval.num_prompts, recipe.run.seed)
    set_seed(recipe.run.seed)
    config = PPOConfig(learning_rate=recipe.ppo.learning_rate, batch_size=args.batch, mini_batch_size=mini_batch,
                       ppo_epochs=args.epochs, adap_kl_ctrl=True, init_kl_coef=0.2, target=6.0, horizon=10000.0,
                       seed=recipe.run.seed, log_with=None)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(paths["policy"]), peft_config=lora)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)
    pipe = pipeline("sentiment-analysis", model=str(paths["reward"]), device=trainer.accelerator.device)
    gen_kwargs = {"min_length": -1, "top_k": 0, "top_p": 1.0, "do_sample": True, "pad_token_id": tokenizer.eos_token_id}
    steps = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        queries = [prompts.train[i] for i in batch_indices(len(prompts.train), args.batch, step, recipe.run.seed)]
        lengths = np.random.default_rng([recipe.run.seed, step]).integers(
            args.min_tokens, args.max_tokens + 1, size=len(queries)).tolist()
        t1 = time.perf_counter()
        if batched:
            out = trainer.generate(queries, batch_size=args.batch, return_prompt=False,
                                   max_new_tokens=max(lengths), **gen_kwargs)
            responses = [r[:n] for r, n in zip(out, lengths)]
        else:
            responses = [trainer.generate(q, max_new_tokens=n, **gen_kwargs).squeeze()[-n:]
                         for q, n in zip(queries, lengths)]
        t2 = time.perf_counter()
        texts = [tokenizer.decode(q) + tokenizer.decode(r) for q, r in zip(queries, responses)]
        t3 = time.perf_counter()
        scored = pipe(texts, top_k=None, function_to_apply="none", batch_size=16, truncation=True)
        rewards = [torch.tensor(next(s["score"] for s in row if s["label"] == "POSITIVE")) for row in scored]
        t4 = time.perf_counter()
        stats = trainer.step(queries, responses, rewards)
        t5 = time.perf_counter()
        if step >= args.warmup:
            steps.append({"prompt selection": t1 - t0, "generate (all)": t2 - t1, "decoding": t3 - t2,
                          "reward": t4 - t3, "PPO step (all)": t5 - t4, "wall": t5 - t0,
                          **{name: float(stats[key]) for key, name in STEP_PHASES.items()}})
    return steps


def plain_elsewhere(args, mini_batch: int, batched: bool) -> list[dict]:
    """plain() in the TRL 0.11.4 venv, its steps back as JSON."""
    python = trl011_python()
    if python is None:
        raise SystemExit("the plain TRL loop needs a venv with trl==0.11.4: run bash bench/trl011_venv.sh, "
                         "or set RLHF_RECIPES_TRL011_PYTHON")
    argv = [*python, __file__, "--shape", args.shape, "--batch", str(args.batch), "--epochs", str(args.epochs),
            "--min-tokens", str(args.min_tokens), "--max-tokens", str(args.max_tokens), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--plain", "batched" if batched else "per-prompt", "--mini-batch",
            str(mini_batch)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the plain TRL loop failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(steps: list[dict], phase: str) -> float:
    return statistics.median(s.get(phase, 0.0) for s in steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="gpt2-small", choices=["tiny", "gpt2-small"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mini-batch", default="64,16", help="comma-separated: one comparison each")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--min-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="measured steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every loop this many times, each round in a rotated order, and pool the steps")
    p.add_argument("--per-prompt", action="store_true", help="also TRL's example loop, one generate call a prompt")
    p.add_argument("--target", type=float, help="the whole-step ratio to meet, for the summary line")
    p.add_argument("--also", action="append", default=[], metavar="OVERRIDE",
                   help="also rlhf_recipes with this override (e.g. ppo.pack_rows=false); repeatable")
    p.add_argument("--plain", choices=["batched", "per-prompt"], help=argparse.SUPPRESS)  # in the TRL 0.11.4 venv
    args = p.parse_args()
    paths = build_models(args.shape)
    if args.plain:
        print(json.dumps(plain(paths, args, int(args.mini_batch), args.plain == "batched")))
        return
    rows, profiles, ratios = [], {}, []
    for mini in (int(m) for m in args.mini_batch.split(",")):
        loops = {"rlhf_recipes": lambda: ours(paths, args, mini),
                 "plain TRL, one generate call": lambda: plain_elsewhere(args, mini, True)}
        for override in args.also:
            loops[f"rlhf_recipes, {override}"] = lambda override=override: ours(paths, args, mini, (override,))
        if args.per_prompt:
            loops["plain TRL, per prompt"] = lambda: plain_elsewhere(args, mini, False)
        names, runs = list(loops), {name: [] for name in loops}
        # a shared machine drifts within minutes, and a process's first run is slower: each round
        # starts with another loop, so that no loop always goes first
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                runs[name] += loops[name]()
        base = median(runs["plain TRL, one generate call"], "wall")
        mine = median(runs["rlhf_recipes"], "wall")
        ratios += [(mini, name, median(steps, "wall") / base) for name, steps in runs.items()
                   if name.startswith("rlhf_recipes")]
        for name, steps in runs.items():
            rows.append([str(mini), name, *(f"{median(steps, k):.3f}" for k in
                                            ("generate (all)", "reward", "PPO step (all)", "wall")),
                         f"{median(steps, 'wall') / base:.3f}", f"{statistics.fmean(s['wall'] for s in steps):.3f}"])
        if args.per_prompt:
            rows.append([str(mini), "per prompt / rlhf_recipes", "", "", "", "",
                         f"**{median(runs['plain TRL, per prompt'], 'wall') / mine:.2f}x**", ""])
        profiles[mini] = runs
    head = ["mini-batch", "loop", "generate", "reward", "PPO step", "whole step", "/ plain", "mean whole step"]
    body = (f"Shape {args.shape}, batch {args.batch}, {args.epochs} PPO epochs, responses of {args.min_tokens}-"
            f"{args.max_tokens} tokens; medians of {args.steps} steps after {args.warmup} warm-up"
            + (f", pooled over {args.rounds} rounds, each starting with another loop" if args.rounds > 1 else "")
            + ", in seconds. "
            "The whole step is wall time from one step's prompt selection to the next's, everything included "
            "(for rlhf_recipes: decoding, the rollback snapshot, the finiteness check, logging, the display).\n\n"
            + table(rows, head) + "\n"
            + "".join(f"- whole step, {name} / plain, mini-batch {m}: **{r:.3f}**"
                      + (f" (target: at most {args.target})" if args.target else "") + "\n" for m, name, r in ratios))
    prof_rows = []
    for phase in ORDER + ["wall"]:
        row = [phase.replace("  ", "- ") if phase != "wall" else "**whole step**"]
        for runs in profiles.values():
            row += [f"{1000 * median(runs['rlhf_recipes'], phase):.1f}",
                    f"{1000 * median(runs['plain TRL, one generate call'], phase):.1f}"
                    if any(phase in s for s in runs["plain TRL, one generate call"]) else ""]
        prof_rows.append(row)
    prof_head = ["phase"] + [h for m in profiles for h in (f"ours, mb {m}, ms", f"plain, mb {m}, ms")]
    body += ("\nPhase by phase (medians; a phase's parts, indented, are inside it; a blank plain cell is work "
             "the plain loop does not do):\n\n" + table(prof_rows, prof_head))
    write_section(f"throughput ({args.shape}, batch {args.batch})", body)


if __name__ == "__main__":
    main()
