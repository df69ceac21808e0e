"""Using what a run made: a merged standalone export, and side-by-side sampling of reference and policy."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from conftest import SMALL, local_overrides
from rlhf_recipes import export, sample
from rlhf_recipes.evaluation import load_run
from rlhf_recipes.run import main

IDS = torch.tensor([[5, 17, 42, 8, 99, 3]])


def trained_run(tiny_dir, out, *extra):
    assert main(["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL, "ppo.learning_rate=1e-2",
                 f"run.output_dir={out}", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    return trained_run(tiny_dir, tmp_path_factory.mktemp("out") / "run")


def test_the_export_is_the_adapter_model_folded_in_and_loads_in_a_pipeline(run, tiny_dir, tmp_path, capsys):
    assert export.main([str(run), str(tmp_path / "merged")]) == 0
    assert "pipeline('text-generation'" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir / "gpt2"), run / "model").eval()
    with torch.no_grad():
        ours, theirs = merged(input_ids=IDS).logits, adapter(input_ids=IDS).logits
        with adapter.disable_adapter():
            assert (adapter(input_ids=IDS).logits - theirs).abs().max() > 1e-4  # the adapter did train
    assert (ours - theirs).abs().max() < 1e-5
    assert not any("lora" in k or "v_head" in k for k in merged.state_dict())
    assert merged.generation_config.do_sample and merged.generation_config.top_k == 0
    generated = pipeline("text-generation", model=str(tmp_path / "merged"))("This movie", max_new_tokens=5)
    assert generated[0]["generated_text"].startswith("This movie")
    assert set(AutoTokenizer.from_pretrained(tmp_path / "merged")("x")) == {"input_ids", "attention_mask"}


@pytest.mark.slow
def test_an_8bit_run_exports_dequantized_within_a_stated_difference(tiny_dir, tmp_path, capsys):
    run = trained_run(tiny_dir, tmp_path / "run8", "policy.quantization=8bit")
    assert export.main([str(run), str(tmp_path / "merged")]) == 2  # a dtype must be chosen
    assert "--dtype" in capsys.readouterr().err and not (tmp_path / "merged").exists()
    assert export.main([str(run), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    saved = load_run(run)  # the adapter on the 8-bit base, as trained
    with torch.no_grad():
        ours = merged(input_ids=IDS).logits
        theirs = saved.policy.pretrained_model(input_ids=IDS).logits.float()
    difference = float((ours - theirs).abs().max())
    print(f"8-bit export: max |logit difference| = {difference:.3g} (logits' scale {float(theirs.abs().max()):.3g})")
    assert difference < 0.01  # int8 matmul against the dequantized weights in fp32: small, not zero


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nothing", "{tmp}/out"], "is not a finished run"),
    (["{run}", "{run}"], "is not empty"),
    (["{run}", "{tmp}/out", "--dtype", "int4"], "invalid choice"),
])
def test_bad_export_input_is_one_line_and_writes_nothing(args, message, run, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, run=run) for a in args]
    before = sorted(p.name for p in run.iterdir())
    code = export.main(argv) if message != "invalid choice" else _exit(export.main, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.count("\n") <= 1, err
    assert sorted(p.name for p in run.iterdir()) == before and not (tmp_path / "out").exists()


def _exit(fn, argv):
    with pytest.raises(SystemExit) as exited:
        fn(argv)
    return exited.value.code


def test_sampling_side_by_side_uses_the_runs_reward_and_one_seed(run, capsys):
    assert sample.main([str(run), "This movie", "The trailer promised a lot, but", "--heldout", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and rows[0]["prompt"] == "This movie"
    assert {"reference", "policy", "reference_reward", "policy_reward", "kl"} <= set(rows[0])
    saved = load_run(run)
    from rlhf_recipes.components.reward import build_reward
    reward = build_reward(saved.recipe.reward, saved.device, saved.recipe.policy)
    assert reward([rows[0]["prompt"] + rows[0]["policy"]])[0] == pytest.approx(rows[0]["policy_reward"], abs=1e-5)
    # the same prompts and seed: the same samples (a batch's samples depend on what else is in it)
    assert sample.main([str(run), "This movie", "The trailer promised a lot, but", "--heldout", "2", "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    assert sample.main([str(run), "This movie"]) == 0
    assert "reference" in capsys.readouterr().out


def test_sampling_with_no_prompts_is_one_line(run, capsys):
    assert sample.main([str(run)]) == 2
    assert "give prompts" in capsys.readouterr().err
