"""How rlhf_recipes' PPO step time grows with batch size (8 to 128) and response length
(16 to 128 tokens), with the exponent of a power law fitted to each.

    python bench/scaling.py --shape tiny

An exponent of 1 means linear cost. Below 1, fixed per-step costs (Python, kernel launches,
small matrices) still dominate; above 1, something grows faster than the work.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np

from common import build_models, table, write_section
from throughput import ours

BATCHES = [8, 16, 32, 64, 128]
LENGTHS = [16, 32, 64, 128]


def step_time(paths: dict, shape_args, batch: int, length: int) -> float:
    args = argparse.Namespace(batch=batch, epochs=shape_args.epochs, min_tokens=length, max_tokens=length,
                              steps=shape_args.steps, warmup=1)
    return statistics.median(s["wall"] for s in ours(paths, args, min(batch, 16)))


def exponent(xs: list[int], ys: list[float]) -> float:
    """The slope of log(y) against log(x): y grows as x ** slope."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "gpt2-small"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="measured steps per point, after one warm-up")
    args = p.parse_args()
    paths = build_models(args.shape)
    by_batch = [step_time(paths, args, b, 32) for b in BATCHES]
    by_length = [step_time(paths, args, 32, n) for n in LENGTHS]
    body = (f"Shape {args.shape}, {args.epochs} PPO epochs, mini-batch min(batch, 16); median step time in "
            f"seconds over {args.steps} steps after one warm-up.\n\n"
            + table([[str(b), f"{t:.3f}"] for b, t in zip(BATCHES, by_batch)], ["batch (32 new tokens)", "step s"])
            + f"\nfitted exponent against batch size: **{exponent(BATCHES, by_batch):.2f}**\n\n"
            + table([[str(n), f"{t:.3f}"] for n, t in zip(LENGTHS, by_length)], ["new tokens (batch 32)", "step s"])
            + f"\nfitted exponent against response length: **{exponent(LENGTHS, by_length):.2f}**\n")
    write_section(f"scaling ({args.shape})", body)
    print(body)


if __name__ == "__main__":
    main()
