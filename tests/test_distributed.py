"""Two CPU processes over gloo under the real `accelerate launch`: DDP as it runs on several GPUs,
and on several machines (two machines of one process each, on the loopback address).

Each launch costs about 35 s (two processes importing TRL on two cores), so the runs are
shared: one quickstart run through the Python API (tests/ddp_worker.py, which dumps each
process's trainable parameters), the same run stopped and resumed through the command line,
and an 8-bit run that logs what each process scored.
"""
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.utils import is_deepspeed_available
from safetensors.torch import load_file

from conftest import local_overrides
from rlhf_recipes.runtime import distributed
from rlhf_recipes.runtime.checkpoint import latest, resume_point
from rlhf_recipes.components.data import batch_indices, load_prompts
from rlhf_recipes.evaluation import evaluate_run
from rlhf_recipes.components.policy import load_tokenizer
from rlhf_recipes.config.recipe import apply_overrides, load_recipe
from rlhf_recipes.components.rollout import decode_pairs
from rlhf_recipes.run import main
from rlhf_recipes.config.section import RecipeError

TESTS = Path(__file__).parent
ROOT = TESTS.parent
PER_PROCESS = 8
# the quickstart with its stages cut to seconds, three PPO steps of 2 x 8, a checkpoint each step
QUICKSTART = ["sft.epochs=0.1", "sft.heldout=50", "reward_model.epochs=0.1", "reward_model.heldout=50",
              f"ppo.batch_size={PER_PROCESS}", "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", "eval.num_prompts=16",
              "eval.every=2", "run.checkpoint_every=1", "run.sample_every=0", "ppo.entropy_coef=0.01"]


def launch(*args: str, env: dict | None = None, launcher: tuple = ("--multi_gpu",),
           succeeds: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch` with two CPU processes: the multi-GPU launcher is the one that starts
    both without MPI; rlhf_recipes.runtime.distributed makes them CPU processes over gloo."""
    with socket.socket() as s:  # a free port, so a lingering launch cannot collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",  # CPU, gloo
                "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600, cwd=ROOT)
    assert (done.returncode == 0) == succeeds, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def machines(args_for: list[list[str]]) -> list[subprocess.Popen]:
    """Two machines of one process each, on the loopback address: a launcher a machine, started
    together (`--num_machines 2 --machine_rank R --main_process_ip 127.0.0.1`); args_for[R] is
    machine R's command after the launcher's options. What several machines add to several
    processes: each launcher has its own command line, and its own view of the filesystem."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--mixed_precision", "no", "--dynamo_backend", "no", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for rank, args in enumerate(args_for)]


def on_two_machines(*args: str, succeeds: bool = True) -> list[str]:
    """`args` on both machines of `machines`, waited for; each launcher's stdout + stderr."""
    procs = machines([list(args), list(args)])
    done = [(p.returncode, out + err) for p in procs for out, err in [p.communicate(timeout=600)]]
    assert all((code == 0) == succeeds for code, _ in done), done[0][1][-3000:] + done[1][1][-3000:]
    return [text for _, text in done]


def trainable(path: Path) -> dict[str, torch.Tensor]:
    """LoRA and value-head tensors, named as the saved adapter names them."""
    return {k.removeprefix("pretrained_model.").replace(".default", ""): v for k, v in load_file(path).items()}


def identical_trained_copies(root: Path) -> bool:
    """Whether both processes' dumped parameters are equal, and their LoRA moved from its start."""
    ranks = [trainable(root / f"rank-{r}.safetensors") for r in (0, 1)]
    return ranks[0].keys() == ranks[1].keys() and all(torch.equal(v, ranks[1][k]) for k, v in ranks[0].items()) \
        and any(bool(v.abs().sum()) for k, v in ranks[0].items() if "lora_B" in k)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def worker_run(tmp_path_factory, name: str, overrides: list[str], launcher=None) -> tuple[Path, Path]:
    """(dump directory, run directory) of recipe `name` trained for 3 steps through train() by
    tests/ddp_worker.py, which dumps each rank's parameters; on two machines of one process each
    (which is also two processes), or with `launcher` (`launch`: two processes on one machine)."""
    root = tmp_path_factory.mktemp(f"ddp_{name}")
    out = root / "run"
    (launcher or on_two_machines)(str(TESTS / "ddp_worker.py"), str(root), name, *overrides, "run.steps=3",
                                  f"run.output_dir={out}")
    return root, out


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """The shortened quickstart on two machines."""
    return worker_run(tmp_path_factory, "quickstart", QUICKSTART)


def test_processes_hold_identical_policies_that_trained(api_run):
    root, out = api_run
    ranks = [trainable(root / f"rank-{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and any("lora_B" in k for k in ranks[0])
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"{name} differs between the processes"
    assert any(v.abs().sum() > 0 for k, v in ranks[0].items() if "lora_B" in k)  # LoRA B starts at 0: it learned
    saved = load_file(out / "model" / "adapter_model.safetensors")
    for name, value in saved.items():
        assert torch.equal(value, ranks[0][name])


def test_a_run_trained_on_two_processes_is_re_evaluated_in_one(api_run, tmp_path):
    _, trained = api_run
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    again = evaluate_run(out)  # its stages are found: they were trained by 2 processes, as its checkpoint says
    assert again["after"]["policy"]["reward"] == json.loads((trained / "eval.json").read_text())["after"]["policy"]["reward"]


def test_the_batch_is_split_and_only_the_main_process_writes(api_run):
    _, out = api_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer: no line twice
    assert all(r["env/batch_size"] == 2 * PER_PROCESS for r in rows)  # effective batch = per process x 2
    for stage in ("sft", "reward_model"):  # both processes trained each stage together; one wrote it
        assert json.loads((out / "stages" / stage / "stage.json").read_text())["processes"] == 2
    saved = latest(out)
    assert saved.step == 3 and saved.state["processes"] == 2
    rngs = saved.state["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # each samples its own
    evaluation = json.loads((out / "eval.json").read_text())
    assert [e["step"] for e in evaluation["during"]] == [2] and evaluation["after"]["step"] == 3
    assert not list(out.rglob(".tmp-*"))


def test_resume_on_two_machines_continues_the_run_exactly(api_run, tmp_path):
    _, uninterrupted = api_run
    out = tmp_path / "run"
    shutil.copytree(uninterrupted / "stages", out / "stages")  # the same inputs: reused, not retrained
    args = ["-m", "rlhf_recipes.run", "quickstart", *QUICKSTART, f"run.output_dir={out}"]
    first = on_two_machines(*args, "run.steps=2")
    assert "sft: reusing" in first[0] and "reward_model: reusing" in first[0]
    on_two_machines(*args, "run.steps=3", "--resume")

    assert trainable(out / "model" / "adapter_model.safetensors").keys()
    for name, value in load_file(out / "model" / "adapter_model.safetensors").items():
        assert torch.equal(value, load_file(uninterrupted / "model" / "adapter_model.safetensors")[name]), name
    timeless = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert timeless(metrics(out)) == timeless(metrics(uninterrupted))

    # a different number of processes would split the batches differently: refused, nothing touched
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["quickstart", *QUICKSTART, f"run.output_dir={out}", "run.steps=4", "--resume"]) == 2
    assert (out / "metrics.jsonl").read_bytes() == before
    recipe = apply_overrides(load_recipe("quickstart"), [*QUICKSTART, f"run.output_dir={out}", "run.steps=4"])
    with pytest.raises(RecipeError, match="trained without DeepSpeed, not DeepSpeed ZeRO-2"):  # its state is whole
        resume_point(out, recipe, processes=2, deepspeed=2)


@pytest.mark.parametrize("flag, stage", [(False, 0), (True, 2), (2, 2), (3, 3)])
def test_a_checkpoint_knows_its_zero_stage(flag, stage):
    """Each ZeRO stage splits the optimizer state its own way, so a resume must find its own; the
    checkpoints of releases before ZeRO-3 ran hold a flag, which meant ZeRO-2."""
    from rlhf_recipes.runtime.checkpoint import Checkpoint, zero_stage

    assert zero_stage(Checkpoint(Path("."), 1, {"deepspeed": flag}, [])) == stage


def test_a_batch_non_finite_on_one_process_is_skipped_by_all(tiny_dir, tmp_path):
    out = tmp_path / "run"
    done = launch("-m", "rlhf_recipes.run", "imdb_positive", *local_overrides("imdb_positive", tiny_dir),
                  "reward.model=", "reward.function=rewards:nan_on_rank_1", "ppo.batch_size=4", "ppo.mini_batch_size=2",
                  "run.steps=5", "run.max_bad_batches=2", "eval.num_prompts=8", f"run.output_dir={out}", succeeds=False)
    assert done.stderr.count("2 batches in a row had non-finite rewards") == 1, done.stderr[-3000:]
    saved = latest(out)
    assert saved.step == 2 and saved.state["skipped"] == 2 and saved.metrics == []  # no step was learned from


def test_sigterm_to_one_machines_launcher_stops_every_process_after_the_same_step(tiny_dir, tmp_path):
    out = tmp_path / "run"
    procs = machines([["-m", "rlhf_recipes.run", "imdb_positive", *local_overrides("imdb_positive", tiny_dir),
                       "ppo.batch_size=4", "ppo.mini_batch_size=2", "run.steps=500", "run.checkpoint_every=1000",
                       "eval.num_prompts=8", f"run.output_dir={out}"]] * 2)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or len(metrics(out)) < 2:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, procs[0].communicate()
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # what a scheduler sends to one machine; Ctrl-C sends SIGINT the same way
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    said = [line for err in errs for line in err.splitlines() if "error: stopped by" in line]
    assert len(said) == 1 and "on every machine, the accelerate launch command" in said[0], errs  # the main one speaks
    assert said[0].endswith("--resume") and "stopped by a signal to another process" in said[0]
    done = len(metrics(out))
    saved = latest(out)
    assert 2 <= done < 500 and saved.step == done and len(saved.state["rng"]) == 2  # both processes at the same step


def test_machines_that_do_not_share_the_output_directory_are_refused_with_nothing_written(tmp_path):
    here, there = tmp_path / "machine0" / "run", tmp_path / "machine1" / "run"
    command = ["-m", "rlhf_recipes.run", "quickstart", *QUICKSTART, "run.steps=1"]
    procs = machines([[*command, f"run.output_dir={here}"], [*command, f"run.output_dir={there}"]])
    expected = ("error: run.output_dir must be on storage that all machines share: process 1 on "
                f"{socket.gethostname()} does not see the files the main process writes in {here}")
    for p in procs:
        _, err = p.communicate(timeout=300)
        # each machine's process says it in one line (the launcher then reports its exit code)
        assert p.returncode != 0 and [line for line in err.splitlines() if "run.output_dir must be" in line] and \
            expected in err, err[-3000:]
    assert not here.exists() and not there.exists()  # nothing written, on either machine
    assert not (tmp_path / "machine0").exists() or not any((tmp_path / "machine0").iterdir())


def test_8bit_policy_on_each_process_scores_its_own_share_of_the_batch(tiny_dir, tmp_path):
    log, steps = tmp_path / "rewards", 2
    overrides = [*local_overrides("imdb_positive", tiny_dir), "policy.quantization=8bit", "reward.model=",
                 "reward.function=rewards:logged_length_reward", "ppo.batch_size=4", "ppo.mini_batch_size=2",
                 "ppo.ppo_epochs=2", f"run.steps={steps}", "eval.num_prompts=8", "generation.response_min_tokens=4",
                 "generation.response_max_tokens=8", f"run.output_dir={tmp_path / 'run'}"]
    launch(str(TESTS / "ddp_worker.py"), str(tmp_path), "imdb_positive", *overrides, env={"REWARD_LOG": str(log)})

    calls = [[json.loads(line) for line in Path(f"{log}.rank-{r}").read_text().splitlines()] for r in (0, 1)]
    assert len(calls[1]) == steps  # evaluations (the main process's other calls) run on the main process only
    training = [[texts for texts in c if len(texts) == 4] for c in calls]
    # rank r scored prompts [4r, 4r + 4) of each step's batch of 8
    recipe = apply_overrides(load_recipe("imdb_positive"), overrides)
    tokenizer = load_tokenizer("policy.model", recipe.policy.model)
    prompts = load_prompts(recipe.prompts, tokenizer, recipe.eval.num_prompts, recipe.run.seed)
    for step in range(steps):
        batch = batch_indices(len(prompts.train), 8, step, recipe.run.seed)
        for rank in (0, 1):
            queries = [prompts.train[i] for i in batch[4 * rank:4 * rank + 4]]
            expected, _ = decode_pairs(tokenizer, queries, queries)
            assert all(t.startswith(q) for t, q in zip(training[rank][step], expected))
    ranks = [trainable(tmp_path / f"rank-{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(v, ranks[1][k]) for k, v in ranks[0].items())


@pytest.mark.parametrize("name, overrides, config, error", [
    ("quickstart", [], {"zero_optimization": {"stage": 3}}, "DeepSpeed ZeRO-3 is not supported for PPO"),
    ("quickstart", [], {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5},
     'the DeepSpeed config sets gradient_clipping=0.5 but ppo.max_grad_norm=1.0; set it to "auto"'),
    ("quickstart_dpo", ["policy.quantization=8bit"], {"zero_optimization": {"stage": 3}},
     "DeepSpeed ZeRO-3 cannot partition policy.quantization=8bit's bitsandbytes weights"),
    ("quickstart_grpo", [], {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 2},
     'the DeepSpeed config sets gradient_accumulation_steps=2 but grpo.gradient_accumulation_steps=1'),
])
def test_deepspeed_settings_that_cannot_run_are_refused(name, overrides, config, error, tmp_path, monkeypatch):
    recipe = apply_overrides(load_recipe(name), overrides)
    distributed.init()  # made before DeepSpeed's variables are set, as a launch would have it
    (tmp_path / "ds.json").write_text(json.dumps(config))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    with pytest.raises(RecipeError, match=error):
        distributed.deepspeed_plugin(recipe)


@pytest.mark.parametrize("name", ["quickstart", "quickstart_dpo", "quickstart_grpo", "quickstart_rloo"])
def test_fsdp_is_refused_before_anything_is_written(name, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match="FSDP is not supported"):
        distributed.deepspeed_plugin(load_recipe(name))
    assert main([name, f"run.output_dir={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()


def test_a_stage_is_not_trained_under_zero3_and_nothing_is_written(monkeypatch, tmp_path, capsys):
    distributed.init()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "accelerate" / "zero3.json"))
    assert main(["quickstart_dpo", f"run.output_dir={tmp_path / 'run'}"]) == 2
    assert "the sft stage does not train under DeepSpeed ZeRO-3; train the stages first" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.safetensors"))


@pytest.mark.parametrize("name, overrides, micro, passes", [
    ("quickstart", [], 32, 1),  # ppo.mini_batch_size
    ("quickstart_dpo", ["dpo.gradient_accumulation_steps=2"], 16, 2),  # 32 pairs in 2 passes
    ("quickstart_grpo", [], 128, 1),  # 16 prompts x 8 responses
])
def test_deepspeed_takes_batch_accumulation_and_clipping_from_the_recipe(name, overrides, micro, passes, monkeypatch):
    recipe = apply_overrides(load_recipe(name), overrides)
    distributed.init()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for stage in ("zero2", "zero3") if name != "quickstart" else ("zero2",):
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "accelerate" / f"{stage}.json"))
        config = distributed.deepspeed_plugin(recipe).deepspeed_config
        assert config["zero_optimization"]["stage"] == int(stage[-1])
        clip = getattr(recipe, recipe.method).max_grad_norm
        assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
                config["gradient_clipping"], config["train_batch_size"]) == (micro, passes, clip, micro * passes)
    section = getattr(recipe, recipe.method)
    unclipped = dataclasses.replace(recipe, **{recipe.method: dataclasses.replace(section, max_grad_norm=None)})
    assert distributed.deepspeed_plugin(unclipped).deepspeed_config["gradient_clipping"] == 0.0  # DeepSpeed's "none"


@pytest.mark.skipif(not is_deepspeed_available(), reason="DeepSpeed is not installed (pip install deepspeed)")
def test_zero2_resumes_exactly_and_matches_ddp(api_run, tmp_path):
    """accelerate/zero2.yaml as shipped, on two CPU processes: optimizer state split between them."""
    _, ddp = api_run
    out = tmp_path / "run"
    shutil.copytree(ddp / "stages", out / "stages")
    zero2 = ("--config_file", str(ROOT / "accelerate" / "zero2.yaml"))
    args = ["-m", "rlhf_recipes.run", "quickstart", *QUICKSTART, f"run.output_dir={out}"]
    launch(*args, "run.steps=2", launcher=zero2)
    optimizer = latest(out).state["trainer"]["optimizer"]
    assert isinstance(optimizer, list) and len(optimizer) == 2  # each process's share
    launch(*args, "run.steps=3", "--resume", launcher=zero2)
    resumed = load_file(out / "model" / "adapter_model.safetensors")
    for name, value in load_file(ddp / "model" / "adapter_model.safetensors").items():
        # the same maths, summed in another order (4e-5 apart here); a step moves them about 2e-3
        assert torch.allclose(resumed[name], value, atol=2e-4), name


def test_an_encoder_decoder_policy_trains_identically_on_two_processes(tiny_dir, tmp_path):
    overrides = [*local_overrides("flan_t5_detox", tiny_dir), "prompts.filter=none", "ppo.batch_size=4",
                 "ppo.mini_batch_size=2", "ppo.ppo_epochs=2", "run.steps=2", "eval.num_prompts=8", "eval.every=0",
                 "generation.response_min_tokens=4", "generation.response_max_tokens=8", "ppo.learning_rate=1e-2",
                 f"run.output_dir={tmp_path / 'run'}"]
    launch(str(TESTS / "ddp_worker.py"), str(tmp_path), "flan_t5_detox", *overrides)
    ranks = [trainable(tmp_path / f"rank-{r}.safetensors") for r in (0, 1)]
    assert ranks[0] and all(torch.equal(v, ranks[1][k]) for k, v in ranks[0].items())
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in ranks[0].items())
    assert [m["env/batch_size"] for m in metrics(tmp_path / "run")] == [8, 8]


# ---------------------------------------------------------------------------- DPO on two processes
# the DPO quickstart's stages cut to seconds, 8 pairs a step shared by 2 processes, a constant
# learning rate (a schedule's length follows run.steps, which the resume test changes)
DPO_QUICKSTART = ["sft.epochs=0.1", "sft.heldout=50", "reward_model.epochs=0.1", "reward_model.heldout=50",
                  "dpo.batch_size=8", "dpo.heldout=16", "dpo.lr_scheduler=constant", "dpo.warmup_ratio=0",
                  "eval.num_prompts=16", "eval.every=2", "run.checkpoint_every=1", "dpo.gradient_checkpointing=true"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """The DPO quickstart, 8 pairs a step shared by 2 processes on two machines."""
    return worker_run(tmp_path_factory, "quickstart_dpo", DPO_QUICKSTART)


def test_dpo_on_two_machines_trains_identical_copies_and_one_process_writes(dpo_run):
    root, out = dpo_run
    assert identical_trained_copies(root)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["rewards/margins"] > 0  # one writer
    saved = latest(out)
    assert saved.step == 3 and saved.state["processes"] == 2 and len(saved.state["rng"]) == 2
    evaluation = json.loads((out / "eval.json").read_text())
    assert [e["step"] for e in evaluation["during"]] == [2] and evaluation["after"]["step"] == 3


def resumes_exactly(name: str, overrides: list[str], uninterrupted: Path, out: Path) -> bool:
    """Whether `name` with `overrides` on two machines, stopped after step 2 and resumed to step 3
    in `out`, ends where the `uninterrupted` 3-step run did: adapter and per-step metrics (times aside)."""
    shutil.copytree(uninterrupted / "stages", out / "stages")
    args = ["-m", "rlhf_recipes.run", name, *overrides, f"run.output_dir={out}"]
    on_two_machines(*args, "run.steps=2")
    on_two_machines(*args, "run.steps=3", "--resume")
    a, b = (load_file(d / "model" / "adapter_model.safetensors") for d in (out, uninterrupted))
    timeless = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and \
        timeless(metrics(out)) == timeless(metrics(uninterrupted))


def test_dpo_resumed_on_two_machines_continues_the_run_exactly(dpo_run, tmp_path):
    assert resumes_exactly("quickstart_dpo", DPO_QUICKSTART, dpo_run[1], tmp_path / "run")


def test_dpo_on_two_processes_makes_one_processs_update_over_two_passes(tiny_dir, prefs, tmp_path):
    """Each process's share of a batch is the rows one process takes in one of two accumulation
    passes, so the runs agree to float rounding (the all-reduce sums in another order)."""
    from test_dpo import recipe_file

    path = recipe_file(tmp_path, tiny_dir, prefs)
    two, one = tmp_path / "two", tmp_path / "one"
    launch("-m", "rlhf_recipes.run", path, "run.steps=3", f"run.output_dir={two}")
    assert main([path, "run.steps=3", "dpo.gradient_accumulation_steps=2", f"run.output_dir={one}"]) == 0
    a, b = (load_file(d / "model" / "adapter_model.safetensors") for d in (two, one))
    assert a.keys() == b.keys() and any(bool(v.abs().sum()) for k, v in a.items() if "lora_B" in k)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    for x, y in zip(metrics(two), metrics(one)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["rewards/margins"] == pytest.approx(
            y["rewards/margins"], rel=1e-4, abs=1e-6)


def test_a_dpo_batch_that_processes_cannot_share_equally_is_refused(tmp_path):
    done = launch("-m", "rlhf_recipes.run", "quickstart_dpo", "dpo.batch_size=6", "dpo.gradient_accumulation_steps=2",
                  f"run.output_dir={tmp_path / 'run'}", succeeds=False)
    assert "dpo.batch_size=6 must be a multiple of the processes times dpo.gradient_accumulation_steps (2 x 2)" \
        in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------- GRPO on two processes
# the GRPO quickstart's stages cut to seconds, 4 prompts x 8 responses a step shared by 2
# processes in two passes each, a constant learning rate (a schedule follows run.steps)
GRPO_QUICKSTART = ["sft.epochs=0.1", "sft.heldout=50", "reward_model.epochs=0.1", "reward_model.heldout=50",
                   "grpo.batch_size=4", "grpo.gradient_accumulation_steps=2", "grpo.lr_scheduler=constant",
                   "eval.num_prompts=16", "eval.every=2", "run.checkpoint_every=1", "run.sample_every=0"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """The GRPO quickstart, each step's samples shared by 2 processes on one machine."""
    return worker_run(tmp_path_factory, "quickstart_grpo", GRPO_QUICKSTART, launcher=launch)


def test_grpo_on_two_processes_trains_identical_copies_on_the_whole_batch_and_one_process_writes(grpo_run):
    root, out = grpo_run
    assert identical_trained_copies(root)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["env/batch_size"] == 32 for r in rows)  # one writer
    assert rows[0]["objective/kl"] == 0.0 and rows[-1]["objective/kl"] != 0.0
    saved = latest(out)
    assert saved.step == 3 and saved.state["processes"] == 2 and len(saved.state["rng"]) == 2
    evaluation = json.loads((out / "eval.json").read_text())
    assert [e["step"] for e in evaluation["during"]] == [2] and evaluation["after"]["step"] == 3


# ---------------------------------------------------------------------------- ZeRO-3 on two processes
ZERO3 = ("--config_file", str(ROOT / "accelerate" / "zero3.yaml"))
needs_deepspeed = pytest.mark.skipif(not is_deepspeed_available(), reason="DeepSpeed is not installed "
                                                                            "(pip install deepspeed)")


def holds_half_of_the_frozen_weights(root: Path) -> bool:
    """Whether each process held only its share of the frozen weights (ZeRO-3's partition)."""
    held = [json.loads((root / f"rank-{r}.held.json").read_text()) for r in (0, 1)]
    return all(0 < h["held"] <= 0.51 * h["total"] for h in held) and held[0]["total"] == held[1]["total"]


@needs_deepspeed
def test_dpo_under_zero3_partitions_the_weights_resumes_and_matches_ddp(dpo_run, tmp_path_factory):
    """accelerate/zero3.yaml as shipped: every weight partitioned between the processes, each layer
    gathered as it runs, in training and in the evaluation every process runs alike; stopped after
    step 2 and resumed, it ends where DDP's uninterrupted run did, to float rounding."""
    root = tmp_path_factory.mktemp("zero3_dpo")
    out = root / "run"
    shutil.copytree(dpo_run[1] / "stages", out / "stages")  # stages do not train under ZeRO-3
    args = ["quickstart_dpo", *DPO_QUICKSTART, f"run.output_dir={out}"]
    launch("-m", "rlhf_recipes.run", *args, "run.steps=2", launcher=ZERO3)
    optimizer = latest(out).state["trainer"]["optimizer"]
    assert isinstance(optimizer, list) and len(optimizer) == 2  # each process's share
    launch(str(TESTS / "ddp_worker.py"), str(root), *args, "run.steps=3", "--resume", launcher=ZERO3)
    assert holds_half_of_the_frozen_weights(root) and identical_trained_copies(root)
    resumed = load_file(out / "model" / "adapter_model.safetensors")
    for name, value in load_file(dpo_run[1] / "model" / "adapter_model.safetensors").items():
        assert torch.allclose(resumed[name], value, atol=2e-4), name  # a step moves them about 2e-3
    for ours, ddp in zip(metrics(out), metrics(dpo_run[1]), strict=True):
        assert ours["step"] == ddp["step"] and ours["rewards/margins"] == pytest.approx(ddp["rewards/margins"], abs=1e-3)
    # evaluated on every process alike, layer by layer: DDP's evaluation, to rounding
    ours, ddp = (json.loads((d / "eval.json").read_text()) for d in (out, dpo_run[1]))
    assert ours["before"]["policy"]["kl"]["mean"] == 0.0
    for key in ("reward", "kl"):
        assert ours["after"]["policy"][key]["mean"] == pytest.approx(ddp["after"]["policy"][key]["mean"], abs=1e-4)


@needs_deepspeed
def test_grpo_under_zero3_samples_with_the_whole_policy_and_trains_partitioned(grpo_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3_grpo")
    out = root / "run"
    shutil.copytree(grpo_run[1] / "stages", out / "stages")
    launch(str(TESTS / "ddp_worker.py"), str(root), "quickstart_grpo", *GRPO_QUICKSTART, "run.steps=3",
           f"run.output_dir={out}", launcher=ZERO3)
    assert holds_half_of_the_frozen_weights(root) and identical_trained_copies(root)
    rows, ddp = metrics(out), metrics(grpo_run[1])
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["env/batch_size"] == 32 for r in rows)
    # every process samples with the weights gathered whole: DDP's samples, rewards and KL, to rounding
    assert rows[0]["objective/kl"] == 0.0
    for ours, theirs in zip(rows, ddp, strict=True):
        assert ours["env/reward_mean"] == pytest.approx(theirs["env/reward_mean"], abs=1e-5)
        assert ours["objective/kl"] == pytest.approx(theirs["objective/kl"], abs=1e-5)
    assert latest(out).step == 3 and len(latest(out).state["trainer"]["optimizer"]) == 2


@needs_deepspeed
def test_dpo_under_zero2_matches_ddp(dpo_run, tmp_path):
    """accelerate/zero2.yaml for DPO: the optimizer state split, the weights whole on each process."""
    out = tmp_path / "run"
    shutil.copytree(dpo_run[1] / "stages", out / "stages")
    launch(str(TESTS / "ddp_worker.py"), str(tmp_path), "quickstart_dpo", *DPO_QUICKSTART, "run.steps=3",
           f"run.output_dir={out}", launcher=("--config_file", str(ROOT / "accelerate" / "zero2.yaml")))
    assert identical_trained_copies(tmp_path) and len(latest(out).state["trainer"]["optimizer"]) == 2
    for ours, ddp in zip(metrics(out), metrics(dpo_run[1]), strict=True):
        assert ours["rewards/margins"] == pytest.approx(ddp["rewards/margins"], abs=1e-4)


@needs_deepspeed
def test_an_update_abandoned_part_way_under_zero3_leaves_no_gradient_behind(dpo_run, tmp_path):
    """A loss that is not finite in an update's second accumulation pass skips the batch: the
    first pass's gradients must go too (from DeepSpeed's own stores under ZeRO-3), so the run
    goes on exactly as DDP's does."""
    args = ["quickstart_dpo", *DPO_QUICKSTART, "dpo.gradient_accumulation_steps=2", "run.steps=3"]
    outs = {}
    for name, launcher in (("ddp", ("--multi_gpu",)), ("zero3", ZERO3)):
        outs[name] = tmp_path / name / "run"
        shutil.copytree(dpo_run[1] / "stages", outs[name] / "stages")
        launch(str(TESTS / "ddp_worker.py"), str(tmp_path / name), *args, f"run.output_dir={outs[name]}",
               env={"RLHF_TEST_NAN_AT_PASS": "2"}, launcher=launcher)
    ddp, zero3 = metrics(outs["ddp"]), metrics(outs["zero3"])
    assert [r["step"] for r in ddp] == [r["step"] for r in zero3] == [2, 3]  # step 1 skipped
    for ours, theirs in zip(zero3, ddp):
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)  # no stale first pass
        assert ours["rewards/margins"] == pytest.approx(theirs["rewards/margins"], abs=1e-4)
