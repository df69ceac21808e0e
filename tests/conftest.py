"""Shared fixtures: tiny local models and prompt files, built once per test session, offline."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # local paths must never fall back to the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from rlhf_recipes import quiet, tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    """pytest resets warning filters for each test; re-apply ours as an import of the package would."""
    quiet.install()

# Each shipped recipe pointed at the local models with its architecture and label names.
LOCAL = {
    "imdb_positive": {"policy.model": "gpt2", "reward.model": "distilbert-imdb", "prompts.dataset": "imdb.jsonl",
                      "prompts.filter": None},
    "detoxify": {"policy.model": "gpt-neo", "reward.model": "roberta-hate", "prompts.dataset": "toxicity.jsonl"},
    "imdb_positive_7b_8bit": {"policy.model": "gpt-neox", "reward.model": "distilbert-imdb",
                              "prompts.dataset": "imdb.jsonl", "prompts.filter": None, "policy.dtype": None},
    "qwen_instruct_positive": {"policy.model": "qwen2-instruct", "reward.model": "distilbert-imdb",
                               "prompts.dataset": "imdb.jsonl", "policy.dtype": None},
    "quickstart": {},  # offline already: its data ships with the package
    "quickstart_seq2seq": {},
    "quickstart_dpo": {},
    "quickstart_grpo": {},
    "quickstart_rloo": {},
    "flan_t5_detox": {"policy.model": "t5", "reward.model": "roberta-hate", "prompts.dataset": "dialogsum.jsonl",
                      "sft.dataset": "dialogsum.jsonl", "sft.max_length": None, "prompts.max_source_tokens": None},
}
# Stages cut to a few seconds (their learning is tested in test_stages.py and test_quickstart.py).
SHORT_STAGES = {"quickstart": ["sft.epochs=0.1", "sft.heldout=50", "reward_model.epochs=0.1", "reward_model.heldout=50"],
                "quickstart_dpo": ["sft.epochs=0.1", "sft.heldout=50", "reward_model.epochs=0.1", "reward_model.heldout=50"],
                "quickstart_grpo": ["sft.epochs=0.1", "sft.heldout=50", "reward_model.epochs=0.1", "reward_model.heldout=50"],
                "quickstart_rloo": ["sft.epochs=0.1", "sft.heldout=50", "reward_model.epochs=0.1", "reward_model.heldout=50"],
                "quickstart_seq2seq": ["sft.epochs=0.1", "sft.heldout=50", "reward_model.epochs=0.1",
                                       "reward_model.heldout=50"],
                "flan_t5_detox": ["sft.epochs=0.2", "sft.heldout=20", "sft.batch_size=8"]}
# A quickstart shortened to about a minute on a 2-core CPU (1.5 for seq2seq): fewer SFT and
# reward-model epochs, 15 PPO steps of 64.
SHORT_QUICKSTART = ["sft.epochs=2", "reward_model.epochs=1", "ppo.batch_size=64", "ppo.mini_batch_size=16",
                    "run.steps=15", "eval.num_prompts=64", "eval.batch_size=64", "eval.every=0", "run.sample_every=0"]
# Small enough for a 2-core CPU: two PPO steps of 8 samples.
SMALL = ["ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", "run.steps=2", "eval.num_prompts=16",
         "run.sample_every=1", "run.sample_rows=2", "generation.response_min_tokens=4", "generation.response_max_tokens=8", "reward.batch_size=4"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("tiny"))


def local_overrides(name: str, tiny_dir) -> list[str]:
    """Overrides that point shipped recipe `name` at the tiny local models."""
    out = []
    for key, value in LOCAL[name].items():
        if value is None:  # fields whose real value does not suit the tiny stand-ins
            out.append({"policy.dtype": f"{key}=float32", "sft.max_length": f"{key}=128",
                        "prompts.max_source_tokens": f"{key}=128"}.get(key, f"{key}=none"))
        else:
            out.append(f"{key}={tiny_dir / value}")
    return out + SHORT_STAGES.get(name, [])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def prefs(tiny_dir, tmp_path_factory):
    """Preference files from the tiny review corpus: a prompt (a review's first two words),
    a positive review's rest over a negative one's; the same nested; and as rankings of three."""
    root = tmp_path_factory.mktemp("prefs")
    rows = [json.loads(line) for line in (tiny_dir / "imdb.jsonl").read_text().splitlines()]
    pos = [r["text"].split() for r in rows if r["label"] == 1]
    neg = [r["text"].split() for r in rows if r["label"] == 0]
    pairs = [{"prompt": " ".join(p[:2]), "chosen": " ".join(p[2:12]), "rejected": " ".join(n[2:12])}
             for p, n in zip(pos, neg) if len(p) > 3 and len(n) > 3]
    write_jsonl(root / "pairs.jsonl", pairs)
    write_jsonl(root / "nested.jsonl", [{"pair": {"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}}
                                        for r in pairs])
    write_jsonl(root / "ranked.jsonl", [{"prompt": r["prompt"], "answers": [r["chosen"], "and then", r["rejected"]]}
                                        for r in pairs])
    return root


# ---------------------------------------------------------------------------- stopping and resuming runs
def start_run(argv):
    """`python -m rlhf_recipes.run ARGV` in the background, offline; stderr kept for the test."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "rlhf_recipes.run", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_for_steps(proc, out, n):
    """Until OUT/metrics.jsonl holds n steps (the process must still be running)."""
    import time

    from rlhf_recipes.runtime.rundir import read_metrics

    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < n:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.01)


def resumed_run_matches(whole, cut, argv: list[str]) -> list[dict]:
    """Recipe file `whole` run through, and `cut` (the same recipe, slowed) killed after step 3
    (past a step-2 checkpoint), resumed, stopped by SIGTERM, and resumed to the end: the two
    runs' per-step metrics (times aside) and adapters agree exactly. Both write to the run/
    beside their recipe file; returns their eval.json "after" records."""
    import signal
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from rlhf_recipes.run import main
    from rlhf_recipes.runtime import checkpoint
    from rlhf_recipes.runtime.rundir import read_metrics

    runs = [Path(whole).parent / "run", Path(cut).parent / "run"]
    assert main([whole, *argv]) == 0
    proc = start_run([cut, *argv])
    wait_for_steps(proc, runs[1], 3)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    proc = start_run([cut, *argv, "--resume"])  # resumed, then stopped again, by SIGTERM this time
    wait_for_steps(proc, runs[1], 4)  # past what it rewrites from the checkpoint's records
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1].endswith("--resume"), err
    assert checkpoint.latest(runs[1]).step == len(read_metrics(runs[1]))
    assert main([cut, *argv, "--resume"]) == 0

    def learned(records):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]

    assert learned(read_metrics(runs[1])) == learned(read_metrics(runs[0]))  # exactly
    a, b = (load_file(r / "model" / "adapter_model.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return [json.loads((r / "eval.json").read_text())["after"] for r in runs]


def skipped_batches_changed_nothing(out, saved) -> bool:
    """Whether the trainable parameters of checkpoint `saved` equal those of step 1's, in OUT."""
    import torch
    from safetensors.torch import load_file

    step1 = load_file(out / "checkpoints" / "step-00000001" / "tensors.safetensors")
    later = load_file(saved.path / "tensors.safetensors")
    params = [k for k in step1 if k.startswith("trainer/params/")]
    return bool(params) and all(torch.equal(step1[k], later[k]) for k in params)


@pytest.fixture(scope="session")
def quickstart_stages(tmp_path_factory):
    """The quickstarts' SFT and reward model, trained once as SHORT_QUICKSTART shortens them (2 SFT
    epochs, 1 reward-model epoch): every quickstart (PPO, DPO, GRPO, RLOO) shares these stages,
    and `run_dir_with_stages` hands them to a run, as the frontier does."""
    from rlhf_recipes.run import main

    root = tmp_path_factory.mktemp("quickstart_stages")
    assert main(["quickstart", "sft.epochs=2", "reward_model.epochs=1", f"run.output_dir={root}",
                 "--stage", "reward_model"]) == 0
    return root / "stages"


def run_dir_with_stages(out, stages):
    """`out`, made, holding only a link to the trained `stages` (which a run reuses while its inputs agree)."""
    out.mkdir(parents=True)
    (out / "stages").symlink_to(stages, target_is_directory=True)
    return out
