"""Experiment trackers: TensorBoard's event files hold metrics.jsonl's per-step values, a resumed
run continues the same curves without repeating steps, and a missing tracker is one line."""
import importlib.util
import shutil

import pytest

from conftest import SMALL, local_overrides
from rlhf_recipes.runtime.rundir import read_metrics
from rlhf_recipes.run import main

tensorboard = pytest.importorskip("tensorboard")


def scalars(logdir):
    """{tag: [(step, value), ...]} over every event file TensorBoard would read, as it reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def args_for(tiny_dir, out, *extra):
    return ["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL, "ppo.learning_rate=1e-3",
            "run.report_to=tensorboard", "run.steps=3", "eval.every=2", f"run.output_dir={out}", *extra]


@pytest.mark.slow
def test_tensorboard_holds_every_step_and_resume_repeats_none(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert main(args_for(tiny_dir, out, "run.checkpoint_every=2")) == 0
    metrics = read_metrics(out)
    logged, acc = scalars(out / "trackers" / "imdb_positive")
    for key in ("objective/kl", "env/reward_mean", "ppo/loss/total", "objective/kl_coef"):
        assert [s for s, _ in logged[key]] == [1, 2, 3]
        assert [v for _, v in logged[key]] == pytest.approx([m[key] for m in metrics], rel=1e-6, abs=1e-7)
    assert [s for s, _ in logged["eval/reward"]] == [0, 2, 3]  # before, during, after
    assert "samples" in str(acc.Tags())

    # as if killed after step 3 was logged but before its checkpoint: resume from step 2
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    assert main(args_for(tiny_dir, out, "run.checkpoint_every=2", "--resume")) == 0
    logged, _ = scalars(out / "trackers" / "imdb_positive")
    assert [s for s, _ in logged["objective/kl"]] == [1, 2, 3]  # step 3 once, not twice
    assert [v for _, v in logged["objective/kl"]] == pytest.approx([m["objective/kl"] for m in read_metrics(out)],
                                                                    rel=1e-6, abs=1e-7)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_missing_tracker_package_is_one_line_naming_it(tiny_dir, tmp_path, capsys):
    assert main(args_for(tiny_dir, tmp_path / "run", "run.report_to=wandb")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install wandb" in err and not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb")
def test_wandb_offline_writes_its_run_files(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    assert main(args_for(tiny_dir, out, "run.report_to=wandb")) == 0
    assert list((out / "trackers" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_stages_pass_the_setting_to_their_trainer(tmp_path):
    from rlhf_recipes.reporting.trackers import trainer_settings

    assert trainer_settings(("none",), tmp_path, "sft")["report_to"] == "none"  # not None: every integration
    assert trainer_settings(("tensorboard",), tmp_path, "sft") == {
        "report_to": ["tensorboard"], "logging_dir": str(tmp_path / "trackers" / "sft"), "run_name": "sft"}
