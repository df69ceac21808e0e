"""Experiment trackers (TensorBoard, Weights & Biases, trackio), the ecosystem's way: one setting,
`run.report_to`, as in transformers' TrainingArguments, and logs under OUTPUT_DIR/trackers.

PPO logs each step's scalars under TRL's keys (the values metrics.jsonl holds), each held-out
evaluation under eval/, and the sample tables; the SFT and reward-model stages pass the same
setting to their Trainer. Only the main process logs. Nothing is sent anywhere unless asked:
trackio logs locally, W&B goes where the user's own W&B settings say (WANDB_MODE=offline keeps
it on disk). A resumed run continues the same curves: TensorBoard drops what an interrupted run
logged after its checkpoint, and W&B resumes the same run id.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..config.sections import RecipeError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
"""run.report_to name -> the pip package it needs."""
TRACKER_DIR = "trackers"


def requested(report_to: tuple[str, ...]) -> list[str]:
    return [n for n in report_to if n != "none"]


def check_installed(report_to: tuple[str, ...]) -> None:
    """A one-line error at start-up for a tracker whose package is missing (accelerate drops it silently)."""
    for name in requested(report_to):
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise RecipeError(f"run.report_to names {name}, but its package is not installed; "
                              f"pip install {TRACKERS[name]}, or drop it from run.report_to")


def trainer_settings(report_to: tuple[str, ...], out: Path, stage: str) -> dict:
    """What a stage's TrainingArguments take: report_to ('none' explicitly: None would mean every
    installed integration) and a logging directory of its own."""
    names = requested(report_to)
    return {"report_to": names or "none", "logging_dir": str(out / TRACKER_DIR / stage), "run_name": stage}


class Trackers:
    """The trackers of one PPO run, on the main process (elsewhere, and with none asked for, a no-op)."""

    def __init__(self, report_to: tuple[str, ...], run_name: str, out: Path, start_step: int, main: bool):
        self.trackers = []
        if not main or not requested(report_to):
            return
        from accelerate import tracking

        logs = out / TRACKER_DIR
        logs.mkdir(parents=True, exist_ok=True)
        for name in requested(report_to):
            if name == "tensorboard":  # purge_step: what a killed run logged after its checkpoint goes
                tracker = tracking.TensorBoardTracker(run_name, logs, purge_step=start_step + 1)
            elif name == "wandb":
                tracker = tracking.WandBTracker(run_name, dir=str(logs), resume="allow", id=_run_id(logs, "wandb"))
            else:  # trackio: a local project, never a Space unless the user's own settings say so
                tracker = tracking.TrackioTracker(run_name, space_id=None, resume="allow")
            tracker.start()
            self.trackers.append((name, tracker))

    def log(self, values: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        for _, tracker in self.trackers:
            tracker.log(scalars, step=step)

    def log_evaluation(self, record: dict) -> None:
        values = {f"eval/{k}": v["mean"] for k, v in record["policy"].items()}
        values["eval/win_rate"] = record["win_rate"]["mean"]
        values["eval/reward_improvement"] = record["reward_improvement"]["mean"]
        self.log(values, record["step"])

    def log_samples(self, step: int, prompts, responses, rewards) -> None:
        rows = [[p, r, float(x)] for p, r, x in zip(prompts, responses, rewards)]
        for name, tracker in self.trackers:
            if name == "tensorboard":
                table = "| prompt | response | reward |\n|---|---|---|\n" + "".join(
                    f"| {p.replace('|', '/')} | {r.replace('|', '/')} | {x:.3f} |\n" for p, r, x in rows)
                tracker.writer.add_text("samples", table, global_step=step)
            elif hasattr(tracker, "log_table"):
                tracker.log_table("samples", columns=["prompt", "response", "reward"], data=rows, step=step)

    def finish(self) -> None:
        for _, tracker in self.trackers:
            tracker.finish()


def _run_id(logs: Path, name: str) -> str:
    """A run id kept in the run directory, so that a resumed run continues the same tracker run."""
    path = logs / f"{name}_id.json"
    if path.exists():
        return json.loads(path.read_text())["id"]
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(json.dumps({"id": run_id}))
    return run_id
