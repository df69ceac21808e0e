"""What ZeRO-3 saves each process, against ZeRO-2 and DDP: a DPO run on two CPU processes under
`accelerate launch` with accelerate/ddp.yaml's setting, accelerate/zero2.yaml and accelerate/zero3.yaml.

    python bench/sharding.py --shape gpt2-small --steps 3 [--record]

The model is `--shape`'s random GPT-2 with LoRA on its attention (gpt2-small: 124M frozen
parameters against 0.6M trainable), so its frozen weights are nearly all of its memory. Each
process reports, after training: the bytes of the policy's weights it holds (ZeRO-3: its share),
of the trainable weights' optimizer state, its resident memory at the end and at its peak, and
the median step time. Peak memory counts the whole model each process loads before DeepSpeed
partitions it (zero3_init_flag is off), and the weights gathered whole for the main process's
evaluation: ZeRO-3 lowers what a process keeps, not what it passes through.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import HERE, build_models, table, write_section

ROOT = HERE.parent
ENGINES = {"DDP": ("--multi_gpu",), "ZeRO-2": ("--config_file", str(ROOT / "accelerate" / "zero2.yaml")),
           "ZeRO-3": ("--config_file", str(ROOT / "accelerate" / "zero3.yaml"))}


def overrides(paths: dict, steps: int, out: Path) -> list[str]:
    """The worker's arguments: quickstart_dpo on `paths`' policy and reward, its stages left out, 8
    pairs a step shared by two processes."""
    return [str(paths["reward"]), f"policy.model={paths['policy']}", "policy.lora_target_modules=c_attn",
            f"prompts.dataset={paths['prompts']}", "prompts.text_column=text", "prompts.filter=none",
            "dpo.batch_size=8", "dpo.heldout=16", "eval.num_prompts=8", "eval.every=0", f"run.steps={steps}",
            f"run.checkpoint_every={steps}", "run.sample_every=0", f"run.output_dir={out}"]


def worker(report: Path, argv: list[str]) -> None:
    """One process of a launched run: train, then append what it holds to `report`. argv: the
    reward classifier's path, then overrides of quickstart_dpo, whose stages are left out."""
    import dataclasses

    from rlhf_recipes import Reward
    from rlhf_recipes.config.recipe import apply_overrides, load_recipe
    from rlhf_recipes.loops.training import train
    from rlhf_recipes.runtime import distributed
    from rlhf_recipes.trl_backend import driven

    distributed.init()
    kept = []  # the trainer, kept past train() to read its optimizer state
    ready = driven.ready
    driven.ready = lambda trainer, *a, **k: (kept.append(trainer), ready(trainer, *a, **k))[1]
    recipe = dataclasses.replace(load_recipe("quickstart_dpo"), sft=None, reward_model=None,
                                 reward=Reward(model=argv[0], label="POSITIVE", score="logit"))
    result = train(apply_overrides(recipe, argv[1:]))
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
               for p in result.policy.parameters())
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    row = {"rank": distributed.world()[0], "weights": held, "rss": rss,
           "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "step": statistics.median(m["time/step"] for m in result.metrics)}
    row["optimizer"] = sum(t.numel() * t.element_size() for t in _optimizer_tensors(kept[0].optimizer))
    with report.open("a") as f:
        f.write(json.dumps(row) + "\n")
    distributed.shutdown()


def _optimizer_tensors(optimizer) -> list:
    """The optimizer state this process holds (under ZeRO, its share): Adam's moments, and
    DeepSpeed's fp32 copy of its partition of the trainable weights."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    torch_optimizer = getattr(inner, "optimizer", inner)  # DeepSpeed's ZeRO optimizer
    out = [v for state in torch_optimizer.state.values() for v in state.values()
           if isinstance(v, torch.Tensor) and v.dim() > 0]
    if torch_optimizer is not inner:
        out += [p for group in torch_optimizer.param_groups for p in group["params"]]  # the fp32 partition
    return out


def launch(engine: str, paths: dict, steps: int, work: Path) -> list[dict]:
    report = work / f"{engine}.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", *ENGINES[engine], "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(Path(__file__).resolve()), "--worker", str(report),
               *overrides(paths, steps, work / engine)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{engine} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return sorted((json.loads(line) for line in report.read_text().splitlines()), key=lambda r: r["rank"])


def main() -> None:
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        worker(Path(sys.argv[i + 1]), sys.argv[i + 2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--shape", default="gpt2-small", choices=["tiny", "gpt2-small"])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    paths = build_models(args.shape)
    mb = lambda n: f"{n / 2 ** 20:.1f}"  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="sharding-") as tmp:
        for engine in ENGINES:
            for r in launch(engine, paths, args.steps, Path(tmp)):
                rows.append([engine, str(r["rank"]), mb(r["weights"]), mb(r["optimizer"]), mb(r["rss"]), mb(r["peak"]),
                             f"{r['step']:.2f}"])
    body = (f"DPO on `{args.shape}` (LoRA r=16 on c_attn), two CPU processes over gloo, {args.steps} steps of 8 "
            "pairs. MB per process.\n\n"
            + table(rows, ["engine", "process", "policy weights held", "optimizer state held", "resident at end",
                           "resident at peak", "median step, s"]))
    write_section(f"sharding ({args.shape})", body)


if __name__ == "__main__":
    main()
