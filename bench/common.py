"""What the benchmarks share: locally built random-weight models of realistic shapes, the
machine's description, and the writing of one section of bench/RESULTS.md.

Benchmarks are scripts, not tests: they take minutes, and their figures depend on the
machine. Each one prints its section, headed with the machine, the command, the date and the
library versions, and with --record replaces that section of the tracked RESULTS.md.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
# every script prints its section; only with --record does it replace that section of the tracked RESULTS.md
RECORD = "--record" in sys.argv
if RECORD:
    sys.argv.remove("--record")
MODELS = HERE / ".models"  # built on first use, not committed

# name -> GPT-2 config: "small" is GPT-2 small (124M parameters); "tiny" is for quick runs
SHAPES = {"tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=256),
          "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)}
# name -> GPT-NeoX config of the Pythia model of that size (the 7B 8-bit recipe's architecture)
NEOX_SHAPES = {
    "pythia-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192,
                      vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25),
    "pythia-6.9b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=16384,
                        vocab_size=50432, max_position_embeddings=2048, rotary_pct=0.25),
}


def trl011_python() -> list[str] | None:
    """The command (argv prefix) of a python with trl==0.11.4 and transformers 4.57, for the
    baselines that run TRL's classic PPO: $RLHF_RECIPES_TRL011_PYTHON (a path, or a command such as
    `env PYTHONPATH=... python3`, as bench/gpu.sh sets it), else the repo's .venv-trl011
    (bench/trl011_venv.sh), else None. rlhf_recipes must import there too."""
    import shlex

    given = os.environ.get("RLHF_RECIPES_TRL011_PYTHON")
    default = HERE.parent / ".venv-trl011" / "bin" / "python"
    if given:
        return shlex.split(given)
    return [str(default)] if default.exists() else None


def build_models(shape: str) -> dict[str, Path]:
    """The policy of `shape` (random weights), a tiny DistilBERT sentiment classifier and a prompt file.

    The tokenizer is the tiny one (a 512-token BPE trained here); the policy keeps GPT-2's
    full vocabulary for the gpt2-small shape, so its embedding and LM head cost what GPT-2's do.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    from rlhf_recipes import tiny

    tiny_dir = MODELS / "tiny"
    if not (tiny_dir / "imdb.jsonl").exists():
        tiny.build(tiny_dir)
    policy = MODELS / shape
    if not (policy / "config.json").exists():
        torch.manual_seed(0)
        tokenizer_dir = tiny_dir / "gpt2"
        if shape in NEOX_SHAPES:  # billions of random weights: made on the GPU if there is one, stored in fp16
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                model = GPTNeoXForCausalLM._from_config(
                    GPTNeoXConfig(**NEOX_SHAPES[shape], bos_token_id=0, eos_token_id=0), dtype=torch.float16)
        else:
            model = GPT2LMHeadModel(GPT2Config(**SHAPES[shape], bos_token_id=0, eos_token_id=0))
        model.save_pretrained(policy)
        del model
        for f in tokenizer_dir.iterdir():
            if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
                (policy / f.name).write_bytes(f.read_bytes())
    return {"policy": policy, "reward": tiny_dir / "distilbert-imdb", "prompts": tiny_dir / "imdb.jsonl"}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch threads {torch.get_num_threads()}"


def write_section(name: str, body: str) -> None:
    """Print section `name`, with a header saying how it was made; with --record, also replace it
    in RESULTS.md (or add it there)."""
    libs = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "trl", "peft", "bitsandbytes"))
    header = (f"<!-- {name} -->\n## {name}\n\n"
              f"- machine: {machine()}\n- command: `python {' '.join(sys.argv)}`\n"
              f"- date: {datetime.date.today().isoformat()}\n- versions: {libs}, python {platform.python_version()}\n\n")
    block = header + body.rstrip() + f"\n<!-- /{name} -->\n"
    print(block)
    if not RECORD:
        print(f"(not recorded: rerun with --record to write it into {RESULTS})")
        return
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in bench/.\n\n"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block
    RESULTS.write_text(text)


def table(rows: list[list[str]], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
