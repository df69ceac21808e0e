"""Reliability: checkpoints, resume after SIGKILL, SIGINT/SIGTERM, non-finite batches, safe loading."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL, local_overrides
from rlhf_recipes.runtime import checkpoint
from rlhf_recipes.config import Policy, RecipeError
from rlhf_recipes.components.policy import build_policy
from rlhf_recipes.runtime.rundir import read_metrics
from rlhf_recipes.run import main


def args_for(tiny_dir, out, *extra, name="imdb_positive"):
    seq2seq = ["prompts.filter=none", "eval.every=0"] if name == "flan_t5_detox" else []
    return [name, *local_overrides(name, tiny_dir), *SMALL, *seq2seq, "ppo.learning_rate=1e-3",
            "ppo.entropy_coef=0.01", "run.sample_every=0", f"run.output_dir={out}", *extra]  # with the bonus on


def start(argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlhf_recipes.run", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_steps(proc, out, n, timeout=240):
    """Block until the run in `out` has logged n steps; the process must still be running then."""
    deadline = time.monotonic() + timeout
    while len(read_metrics(out)) < n:
        assert proc.poll() is None, f"the run ended before step {n}: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def learned(records):
    """Per-step metrics without wall-clock timings."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("imdb_positive", ()), ("flan_t5_detox", ()),  # and encoder-decoder after SFT
                                        ("imdb_positive", ("generation.compile=true",))],  # compiled sampling
                         ids=["causal", "encoder-decoder", "compiled-sampling"])
def test_sigkill_then_resume_gives_the_same_steps_as_an_uninterrupted_run(name, extra, tiny_dir, tmp_path):
    steps = ["run.steps=6", "run.checkpoint_every=2", "run.keep_checkpoints=2", *extra]
    assert main(args_for(tiny_dir, tmp_path / "whole", *steps, name=name)) == 0

    out = tmp_path / "killed"
    proc = start(args_for(tiny_dir, out, *steps, name=name))
    wait_for_steps(proc, out, 3)  # step 3 done: past the step-2 checkpoint, before the end
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert len(read_metrics(out)) < 6

    assert main(args_for(tiny_dir, out, *steps, "--resume", name=name)) == 0
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert learned(resumed) == learned(whole)  # exactly: rewards, KL, KL coefficient, losses
    a, b = (load_file(d / "model" / "adapter_model.safetensors") for d in (tmp_path / "whole", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    after = [json.loads((d / "eval.json").read_text())["after"] for d in (tmp_path / "whole", out)]
    assert after[0]["policy"] == after[1]["policy"]
    assert [p.name for p in checkpoint.complete(out)] == ["step-00000004", "step-00000006"]  # the newest 2


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_exits_non_zero_and_says_how_to_resume(sig, tiny_dir, tmp_path):
    out = tmp_path / "run"
    argv = args_for(tiny_dir, out, "run.steps=50", "run.checkpoint_every=100")
    proc = start(argv)
    wait_for_steps(proc, out, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by") and last.endswith("--resume") and str(out) in last, err
    done = len(read_metrics(out))
    assert 1 <= done < 50 and [p.name for p in checkpoint.complete(out)] == [f"step-{done:08d}"]
    assert not (out / "model").exists()  # only a finished run saves its final model

    assert main(argv[:-2] + [f"run.steps={done + 2}", "run.checkpoint_every=100", "--resume"]) == 0  # go on
    assert [m["step"] for m in read_metrics(out)] == list(range(1, done + 3))


def test_a_finished_run_resumes_to_its_end_and_refuses_fewer_steps(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = args_for(tiny_dir, out, "run.steps=3", "run.checkpoint_every=2")
    assert main(argv) == 0
    before = read_metrics(out)
    (out / "eval.json").unlink()  # as if killed during the final evaluation
    assert main(argv + ["--resume"]) == 0  # nothing left to train: save and evaluate again
    assert read_metrics(out) == before and json.loads((out / "eval.json").read_text())["after"]["step"] == 3
    assert main(args_for(tiny_dir, out, "run.steps=2", "run.checkpoint_every=2", "--resume")) == 2
    assert "is at step 3, past the 2 steps asked for now" in capsys.readouterr().err


def test_a_run_started_with_overwrite_resumes_with_the_same_arguments_plus_resume(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = args_for(tiny_dir, out, "run.checkpoint_every=2", "run.overwrite=true")  # two steps (SMALL)
    assert main(argv) == 0
    first = read_metrics(out)
    assert main([*argv, "run.steps=3", "--resume"]) == 0  # as the README says: the same arguments plus --resume
    assert "run.overwrite=true is ignored" in capsys.readouterr().out
    assert read_metrics(out)[:2] == first and [m["step"] for m in read_metrics(out)] == [1, 2, 3]  # continued, kept


def test_the_resume_command_drops_overwrite():
    from rlhf_recipes.run import resume_command

    assert resume_command(["quickstart", "run.overwrite=true", "ppo.learning_rate=1e-4"]) == \
        "python -m rlhf_recipes.run quickstart ppo.learning_rate=1e-4 --resume"


def test_non_finite_rewards_are_skipped_then_stop_the_run_with_a_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(args_for(tiny_dir, out, "reward.model=", "reward.function=rewards:nan_reward",
                         "run.steps=10", "run.max_bad_batches=2"))
    err = capsys.readouterr()
    assert code == 1 and "2 batches in a row had non-finite rewards or losses (to step 2)" in err.err
    assert "non-finite reward, batch skipped" in err.out
    saved = checkpoint.latest(out)
    assert saved.step == 2 and saved.state["skipped"] == 2 and read_metrics(out) == []


def test_non_finite_losses_are_rolled_back_and_stop_after_k_in_a_row(tiny_dir, tmp_path, monkeypatch, capsys):
    from rlhf_recipes import ppo

    real_step, calls = ppo.ppo_step, []

    def corrupting_step(trainer, queries, responses, rewards):
        stats = real_step(trainer, queries, responses, rewards)
        calls.append(1)
        if len(calls) >= 2:  # every update after the first blows up
            next(p for p in trainer.model.parameters() if p.requires_grad).data.fill_(float("nan"))
            stats["ppo/loss/total"] = float("nan")
        return stats

    monkeypatch.setattr(ppo, "ppo_step", corrupting_step)
    out = tmp_path / "run"
    assert main(args_for(tiny_dir, out, "run.steps=10", "run.max_bad_batches=3", "run.checkpoint_every=1",
                         "run.keep_checkpoints=10")) == 1
    err = capsys.readouterr().err
    assert "3 batches in a row had non-finite" in err and "--resume" in err
    assert [m["step"] for m in read_metrics(out)] == [1]
    saved = checkpoint.latest(out)
    assert saved.step == 4 and saved.state["skipped"] == 3
    first = checkpoint.complete(out)[0]
    assert first.name == "step-00000001"
    step_1 = load_file(first / "tensors.safetensors")
    now = load_file(saved.path / "tensors.safetensors")
    trained = [k for k in now if k.startswith(("trainer/params/", "trainer/optimizer/"))]
    assert trained and all(torch.equal(now[k], step_1[k]) for k in trained)  # rolled back to the good state
    assert not (out / "model").exists()


def test_a_half_written_checkpoint_is_never_used(tmp_path):
    params = {"params": {"w": torch.arange(4.0)}, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}},
                                                               "param_groups": [{"betas": (0.9, 0.999)}]}}
    checkpoint.save(tmp_path, 2, {"trainer": params}, [{"step": 1}, {"step": 2}], keep=2)
    crashed = tmp_path / "checkpoints" / ".tmp-step-00000004-999"  # a crash before the rename
    crashed.mkdir()
    (crashed / "state.json").write_text("{")
    (tmp_path / "checkpoints" / "step-00000006").mkdir()  # no state.json: never complete
    saved = checkpoint.latest(tmp_path)
    assert saved.step == 2 and saved.metrics == [{"step": 1}, {"step": 2}]
    assert torch.equal(saved.state["trainer"]["params"]["w"], torch.arange(4.0))
    assert saved.state["trainer"]["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # keys and tuples kept
    assert list(saved.state["trainer"]["optimizer"]["state"]) == [0]
    checkpoint.save(tmp_path, 4, {"trainer": params}, [], keep=1)
    assert not crashed.exists() and [p.name for p in checkpoint.complete(tmp_path)] == ["step-00000004"]


def test_rng_states_survive_a_trip_through_json_and_safetensors(tmp_path):
    checkpoint.save(tmp_path, 1, {}, [], keep=1)
    draws = lambda: (torch.rand(3).tolist(), np.random.rand(), random.random())  # noqa: E731
    expected = draws()
    checkpoint.set_rng_state(checkpoint.rng_of(checkpoint.latest(tmp_path), 0))
    assert draws() == expected


def test_pickled_weights_are_never_unpickled(tiny_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in (tiny_dir / "gpt2").iterdir():
        if f.suffix != ".safetensors":
            (model / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (type(marker).touch, (marker,))

    torch.save({"transformer.wte.weight": Payload()}, model / "pytorch_model.bin")
    with pytest.raises(RecipeError, match="pickled code is never run"):
        build_policy(Policy(model=str(model)), torch.device("cpu"))
    assert not marker.exists()


def test_remote_code_is_not_run_unless_the_recipe_allows_it(tiny_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in (tiny_dir / "gpt2").iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom", auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"})
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code_ran"
    (model / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    assert Policy(model=str(model)).trust_remote_code is False
    with pytest.raises(RecipeError, match="policy.trust_remote_code=true"):
        build_policy(Policy(model=str(model)), torch.device("cpu"))
    assert not marker.exists()
