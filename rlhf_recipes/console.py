"""What a run shows and records: a progress bar (or one line per step), sample tables, metrics.jsonl."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.table import Table

# under `accelerate launch` only the main process (rank 0) speaks
console = Console(highlight=False, quiet=os.environ.get("RANK", "0") != "0")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it, so a crash loses at most the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")


def step_summary(stats: dict[str, float]) -> str:
    """The figures a person watches: reward, KL, KL coefficient, loss and step time."""
    parts = [("reward", "env/reward_mean"), ("kl", "objective/kl"), ("kl_coef", "objective/kl_coef"),
             ("loss", "ppo/loss/total")]
    text = " | ".join(f"{name} {stats[key]:.4g}" for name, key in parts if key in stats)
    return text + (f" | {stats['time/step']:.2f}s" if "time/step" in stats else "")


class StepDisplay:
    """A live progress bar on a terminal; one readable line per step otherwise (logs, CI)."""

    def __init__(self, total: int, start: int = 0):
        self.total, self.live = total, console.is_terminal
        if self.live:
            self.bar = Progress(TextColumn("[bold]PPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.description}"), console=console)
            self.task = self.bar.add_task("", total=total, completed=start)

    def __enter__(self) -> "StepDisplay":
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.bar.stop()

    def update(self, step: int, stats: dict[str, float]) -> None:
        if self.live:
            self.bar.update(self.task, completed=step, description=step_summary(stats))
        else:
            console.print(f"step {step}/{self.total} | {step_summary(stats)}", soft_wrap=True)


def sample_table(title: str, prompts: Sequence[str], responses: Sequence[str], rewards: Sequence[float],
                 rows: int) -> None:
    """Print the first `rows` samples as prompt | response | reward."""
    table = Table(title=title, show_lines=True)
    table.add_column("prompt", overflow="fold")
    table.add_column("response", overflow="fold")
    table.add_column("reward", justify="right")
    for p, r, x in list(zip(prompts, responses, rewards))[:rows]:
        table.add_row(escape(p), escape(r), "nan" if not math.isfinite(x) else f"{x:.3f}")  # texts are not markup
    console.print(table)
