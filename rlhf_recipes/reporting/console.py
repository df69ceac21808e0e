"""What a run shows and records: a progress bar (or one line per step), sample tables, metrics.jsonl."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table

# under `accelerate launch` only the main process (rank 0) speaks
console = Console(highlight=False, quiet=os.environ.get("RANK", "0") != "0")
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # piped to a log: rich would wrap tables at 80 columns


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it, so a crash loses at most the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")


def step_summary(stats: dict[str, float]) -> str:
    """The figures a person watches: reward, KL, KL coefficient, loss and step time (PPO); DPO's
    loss, margin and pair accuracy."""
    parts = [("reward", "env/reward_mean"), ("kl", "objective/kl"), ("kl_coef", "objective/kl_coef"),
             ("loss", "ppo/loss/total"), ("loss", "loss"), ("margin", "rewards/margins"),
             ("accuracy", "rewards/accuracies")]
    text = " | ".join(f"{name} {stats[key] + 0.0:.4g}" for name, key in parts if key in stats)  # no "-0"
    return text + (f" | {stats['time/step']:.2f}s" if "time/step" in stats else "")


class StepDisplay:
    """A live progress bar on a terminal (steps, time, time left, the latest figures); lines when
    piped (logs, CI): one per update, or at most one every `every` seconds and the last one."""

    def __init__(self, total: int, start: int = 0, label: str = "PPO", every: float = 0.0):
        self.total, self.label, self.every, self.live = total, label, every, console.is_terminal
        self.last_line = -math.inf
        if self.live:
            self.bar = Progress(TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                TextColumn("{task.description}"), console=console)
            self.task = self.bar.add_task("", total=total, completed=start)

    def __enter__(self) -> "StepDisplay":
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.bar.stop()

    def update(self, step: int, stats: dict[str, float] | str = "") -> None:
        text = stats if isinstance(stats, str) else step_summary(stats)
        if self.live:
            self.bar.update(self.task, completed=step, description=escape(text))
            return
        now = time.monotonic()
        if now - self.last_line >= self.every or step >= self.total:
            self.last_line = now
            console.print(f"{self.label} {step}/{self.total}" if self.label != "PPO" else f"step {step}/{self.total}",
                          f"| {text}" if text else "", soft_wrap=True)


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
