"""Bad input, table-driven: each case ends with one line on stderr naming the problem and
the fix, exit code 2, no traceback, and nothing written or overwritten anywhere."""
import hashlib
import os
import subprocess
import sys

import pytest

from conftest import SMALL, local_overrides
from rlhf_recipes.run import main


@pytest.fixture(scope="module")
def ws(tiny_dir, tmp_path_factory):
    """A workspace holding a finished run, odd recipe files and odd datasets."""
    root = tmp_path_factory.mktemp("ws")
    base = ["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL]
    assert main([*base, "run.steps=1", f"run.output_dir={root / 'done'}"]) == 0
    (root / "no_recipe.py").write_text("x = 1\n")
    (root / "syntax.py").write_text("recipe = Recipe(\n")
    (root / "raises.py").write_text("import json\n\nrecipe = json.loads('{')\n")
    (root / "wrong_field.py").write_text(
        "from rlhf_recipes import Policy\nrecipe = Policy(model='gpt2', lora_rank=8)\n")
    (root / "empty.jsonl").write_text("")
    (root / "a_file").write_text("not a directory")
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("mine")
    return root


# (id, arguments after the tiny local overrides, words the one-line error must contain);
# {ws} is the workspace; the output directory is {ws}/new unless a case sets run.output_dir.
CASES = [
    ("no such recipe", ["no_such_recipe"], "no recipe file or shipped recipe named 'no_such_recipe'"),
    ("missing recipe file", ["{ws}/missing.py"], "does not exist; give a path to a .py file"),
    ("file without recipe", ["{ws}/no_recipe.py"], "must define a module-level `recipe = Recipe(...)`"),
    ("recipe syntax error", ["{ws}/syntax.py"], "syntax error at line"),
    ("recipe code raises", ["{ws}/raises.py"], "line 3: JSONDecodeError"),
    ("misspelled section field", ["{ws}/wrong_field.py"], "lora_rank"),
    ("unknown option", ["imdb_positive", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("abbreviated option", ["imdb_positive", "--resum"], "unrecognized arguments: --resum"),  # no prefix matching
    ("unknown override key", ["imdb_positive", "ppo.lr=1"], "unknown override key 'ppo.lr'; did you mean ppo.learning_rate?"),
    ("unknown section", ["imdb_positive", "optim.lr=1"], "unknown override section 'optim' in 'optim.lr=1'; valid sections: policy"),
    ("override without =", ["imdb_positive", "ppo.batch_size"], "section.field=value"),
    ("wrong type", ["imdb_positive", "ppo.batch_size=abc"], "ppo.batch_size expects int, got 'abc'"),
    ("value not allowed", ["imdb_positive", "policy.quantization=16bit"], "policy.quantization"),
    ("zero steps", ["imdb_positive", "run.steps=0"], "run.steps must be > 0"),
    ("an option that does nothing alone", ["imdb_positive", "ppo.use_score_norm=true"], "ppo.use_score_norm does nothing without"),
    ("judge not importable", ["imdb_positive", "eval.judge=nosuch.mod:fn"], "eval.judge: cannot import"),
    ("batch not divisible", ["imdb_positive", "ppo.batch_size=10"], "ppo.batch_size must be a multiple of"),
    ("template names a missing column", ["imdb_positive", "prompts.template=Review: {{review}}"],
     "prompts.template names column {review}, which is not in"),
    ("T5 in float16", ["imdb_positive", "policy.model={tiny}/t5", "policy.quantization=8bit", "policy.dtype=float16"],
     "use policy.dtype=bfloat16 or float32"),
    ("min above max tokens", ["imdb_positive", "generation.response_min_tokens=9"], "generation.response_"),
    ("missing model path", ["imdb_positive", "policy.model=/no/such/dir"], "policy.model: local path '/no/such/dir' does not exist"),
    ("hub id offline", ["imdb_positive", "policy.model=nobody/nothing"], "policy.model: cannot load 'nobody/nothing'"),
    ("reward model is not a classifier", ["imdb_positive", "reward.model={tiny}/gpt2"], "reward.model"),
    ("lora targets missing", ["imdb_positive", "policy.lora_target_modules=q_proj"], "policy.lora_target_modules"),
    ("reward label missing", ["imdb_positive", "reward.label=HAPPY"], "reward.label 'HAPPY' is not a label of the classifier"),
    ("prompt column missing", ["imdb_positive", "prompts.text_column=review"], "prompts.text_column 'review' is not in"),
    ("missing dataset file", ["imdb_positive", "prompts.dataset={ws}/none.jsonl"], "prompts.dataset"),
    ("empty prompt set", ["imdb_positive", "prompts.dataset={ws}/empty.jsonl"], "prompts"),
    ("filter keeps nothing", ["imdb_positive", "prompts.filter=builtins:callable"], "prompts"),
    ("reward function not importable", ["imdb_positive", "reward.model=", "reward.function=nosuch.mod:fn"], "reward.function"),
    ("reward returns one number", ["imdb_positive", "reward.model=", "reward.function=builtins:len"], "reward"),
    ("reward returns strings", ["imdb_positive", "reward.model=", "reward.function=builtins:list"], "reward"),
    ("output dir is a file", ["imdb_positive", "run.output_dir={ws}/a_file"], "is a file; choose a directory"),
    ("output dir cannot be created", ["imdb_positive", "run.output_dir={ws}/a_file/run"], "cannot be written"),
    ("output dir holds other files", ["imdb_positive", "run.output_dir={ws}/notes"], "is not empty"),
    ("overwrite other files", ["imdb_positive", "run.output_dir={ws}/notes", "run.overwrite=true"], "not a run's"),
    ("finished run without --resume", ["imdb_positive", "run.output_dir={ws}/done"], "pass --resume"),
    ("resume with another recipe", ["imdb_positive", "run.output_dir={ws}/done", "ppo.learning_rate=0.5", "--resume"],
     "--resume: ppo.learning_rate is 0.5"),
    ("stage the recipe lacks", ["imdb_positive", "--stage", "sft"], "has no sft stage"),
]


def tree(root):
    """Every file under root with a hash of its contents and its modification time."""
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def argv_for(args, ws, tiny_dir):
    args = [a.format(ws=ws, tiny=tiny_dir) for a in args]
    if not args or args[0].startswith("--"):
        return args
    keys = {a.split("=")[0] for a in args[1:]}
    local = [a for a in [*local_overrides("imdb_positive", tiny_dir), *SMALL] if a.split("=")[0] not in keys]
    out = [] if "run.output_dir" in keys else [f"run.output_dir={ws / 'new'}"]
    return [args[0], *local, *out, *args[1:]]


def test_the_table_has_at_least_twenty_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, ws, tiny_dir, capsys):
    before = tree(ws)
    code = main(argv_for(args, ws, tiny_dir)) if args[-1] not in ("--frobnicate", "--resum") else \
        _argparse_exit(args, ws, tiny_dir)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert "Traceback" not in err
    assert tree(ws) == before and not (ws / "new").exists()


def _argparse_exit(args, ws, tiny_dir):
    with pytest.raises(SystemExit) as exited:
        main(argv_for(args, ws, tiny_dir))
    return exited.value.code


def test_a_real_process_gets_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "rlhf_recipes.run", "imdb_positive", "ppo.lr=1",
                           f"run.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "valid keys" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()
