"""GRPO and RLOO: their sections, the reward as TRL sees it, and whole runs through the real CLI
on the tiny GPT-2 scored by the tiny DistilBERT (NEGATIVE at index 0, as in the real one)."""
import importlib.util
import json
import sys
import textwrap

import pytest
import torch

from conftest import resumed_run_matches, run_dir_with_stages, skipped_batches_changed_nothing
from rlhf_recipes import GRPO, RLOO, Recipe, RecipeError, Run
from rlhf_recipes.config.recipe import apply_overrides, load_recipe
from rlhf_recipes.runtime import checkpoint
from rlhf_recipes.run import main


def recipe_file(tmp_path, tiny_dir, method: str = "grpo", slow: bool = False, policy: str = "gpt2") -> str:
    """A GRPO or RLOO recipe for the tiny GPT-2 scored by the tiny DistilBERT's POSITIVE label;
    slow=True sleeps before each update, so a test can stop it mid-run."""
    section = {"grpo": 'GRPO(loss_type="grpo", scale_rewards="group", ',
               "rloo": "RLOO(normalize_advantages=False, reward_clip_range=None, "}[method]
    path = tmp_path / f"tiny_{method}.py"
    path.write_text(textwrap.dedent(f"""
        import time
        from rlhf_recipes import GRPO, RLOO, Eval, Generation, Policy, Prompts, Recipe, Reward, Run
        from rlhf_recipes import trl_backend
        if {slow}:
            _update = trl_backend.critic_free_update
            trl_backend.critic_free_update = lambda *a: (time.sleep(0.3), _update(*a))[1]
        recipe = Recipe(
            name="tiny_{method}",
            policy=Policy(model="{tiny_dir / policy}", lora_r=4, lora_alpha=8),
            reward=Reward(model="{tiny_dir / 'distilbert-imdb'}", label="POSITIVE", batch_size=16),
            prompts=Prompts(dataset="{tiny_dir / 'imdb.jsonl'}", query_min_tokens=2, query_max_tokens=4),
            generation=Generation(response_min_tokens=4, response_max_tokens=6),
            {method}={section}learning_rate=1e-2, batch_size=4, num_generations=4, beta=0.1,
                     epsilon=0.2, temperature=1.0, lr_scheduler="constant"),
            eval=Eval(num_prompts=16, batch_size=16),
            run=Run(output_dir="{tmp_path / 'run'}", steps=4, checkpoint_every=2, keep_checkpoints=2, sample_every=2,
                    sample_rows=2),
        )
    """))
    return str(path)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- sections
BASE = dict(learning_rate=1e-3, batch_size=4, num_generations=4, beta=0.1, epsilon=0.2, temperature=1.0)


@pytest.mark.parametrize("change, message", [
    ({"num_generations": 1}, "grpo.num_generations must be >= 2"),
    ({"beta": -0.1}, "grpo.beta must be finite and >= 0"),
    ({"epsilon": 0.0}, "grpo.epsilon must be > 0"),
    ({"gradient_accumulation_steps": 3}, "grpo.gradient_accumulation_steps must divide the 16 samples a step"),
    ({"loss_type": "ppo"}, "grpo.loss_type must be one of 'grpo', 'dr_grpo', 'dapo'"),
    ({"scale_rewards": True}, "grpo.scale_rewards must be one of 'group', 'batch', 'none'"),
])
def test_the_grpo_section_checks_its_fields(change, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        GRPO(**{**BASE, "loss_type": "grpo", "scale_rewards": "group", **change})


def test_every_grpo_and_rloo_field_without_a_default_must_be_given():
    with pytest.raises(TypeError, match="scale_rewards"):
        GRPO(**BASE, loss_type="grpo")  # TRL's defaults move between versions: a recipe states them
    with pytest.raises(TypeError, match="normalize_advantages"):
        RLOO(**BASE)
    with pytest.raises(RecipeError, match=r"rloo.reward_clip_range must be two numbers, low then high"):
        RLOO(**BASE, normalize_advantages=False, reward_clip_range=(5.0, -5.0))


def test_a_recipe_has_one_method_and_grpo_fields_override_like_any_other(tmp_path):
    quick = load_recipe("quickstart_grpo")
    assert quick.method == "grpo" and quick.grpo.beta > 0 and load_recipe("quickstart_rloo").rloo.beta > 0
    with pytest.raises(RecipeError, match="give exactly one, not ppo and grpo"):
        Recipe(**{**{k: getattr(quick, k) for k in ("name", "policy", "reward", "prompts", "generation", "run")},
                  "grpo": quick.grpo, "ppo": load_recipe("quickstart").ppo})
    with pytest.raises(RecipeError, match="run.steps is required with GRPO"):
        Recipe(**{k: getattr(quick, k) for k in ("name", "policy", "reward", "prompts", "generation", "grpo")},
               run=Run(output_dir="x"))
    changed = apply_overrides(quick, ["grpo.beta=0.5", "grpo.epsilon_high=0.28", "grpo.loss_type=dapo"])
    assert (changed.grpo.beta, changed.grpo.epsilon_high, changed.grpo.loss_type) == (0.5, 0.28, "dapo")
    rloo = apply_overrides(load_recipe("quickstart_rloo"), ["rloo.reward_clip_range=-4,4"])
    assert rloo.rloo.reward_clip_range == (-4.0, 4.0)  # parsed to floats, item by item
    with pytest.raises(RecipeError, match=r"grpo.beta expects float, got 'lots'"):
        apply_overrides(quick, ["grpo.beta=lots"])
    with pytest.raises(RecipeError, match=r"unknown override key 'grpo.kl_coef'; .*valid keys: grpo.learning_rate"):
        apply_overrides(quick, ["grpo.kl_coef=0.1"])
    with pytest.raises(RecipeError, match="recipe 'quickstart_grpo' has no rloo stage"):
        apply_overrides(quick, ["rloo.beta=0.1"])


@pytest.mark.parametrize("method, args, message", [
    ("grpo", ["grpo.num_generations=1"], "grpo.num_generations must be >= 2: the baseline is taken from the other"),
    ("grpo", ["grpo.gradient_accumulation_steps=3"], "grpo.gradient_accumulation_steps must divide the 16 samples"),
    ("grpo", ["grpo.beta=-1"], "grpo.beta must be finite and >= 0"),
    ("grpo", ["grpo.loss_type=ppo"], "grpo.loss_type expects one of 'grpo'"),
    ("grpo", ["grpo.lr=1"], "unknown override key 'grpo.lr'; did you mean grpo.learning_rate?"),
    ("grpo", ["ppo.learning_rate=1"], "recipe 'tiny_grpo' has no ppo stage"),
    ("grpo", ["run.steps=none"], "run.steps is required with GRPO"),
    ("rloo", ["rloo.reward_clip_range=5"], "rloo.reward_clip_range must be two numbers, low then high"),
    ("rloo", ["rloo.normalize_advantages=maybe"], "rloo.normalize_advantages expects true/false, got 'maybe'"),
    ("rloo", ["rloo.temperature=0"], "rloo.temperature must be > 0"),
])
def test_bad_grpo_and_rloo_input_is_one_line_exit_2_and_writes_nothing(tiny_dir, tmp_path, capsys, method, args,
                                                                        message):
    assert main([recipe_file(tmp_path, tiny_dir, method), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- the reward as TRL sees it
def test_the_reward_reads_the_label_by_name_never_column_0_and_the_response_as_ppo_reads_it(tiny_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_recipes.components.reward import build_reward
    from rlhf_recipes.config.sections import Reward
    from rlhf_recipes.trl_backend import RecipeReward

    cfg = Reward(model=str(tiny_dir / "distilbert-imdb"), label="POSITIVE", score="probability", batch_size=8,
                 input="prompt+response")
    classifier = build_reward(cfg, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "gpt2")
    queries = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("the movie was", "i found it")]
    answers = [tokenizer(t)["input_ids"] for t in (" great and moving", " dull")]
    reward = RecipeReward(classifier, cfg, tokenizer, queries)
    # TRL hands the reward the dataset's prompts (our indices), its decoded completions and their ids
    got = reward(prompts=["0", "1"], completions=["ignored", "ignored"], completion_ids=answers, trainer_state=None)
    texts = ["the movie was great and moving", "i found it dull"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir / "distilbert-imdb")
    assert model.config.id2label[0] == "NEGATIVE"
    batch = AutoTokenizer.from_pretrained(tiny_dir / "distilbert-imdb")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
    assert got == pytest.approx(probs[:, 1].tolist(), abs=1e-6)  # POSITIVE
    assert got != pytest.approx(probs[:, 0].tolist(), abs=1e-3)  # what TRL's classifier path would read
    assert reward.texts == (["the movie was", "i found it"], [" great and moving", " dull"])


# ---------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_a_run_starts_at_kl_0_moves_and_is_evaluated_and_reported_as_a_ppo_run_is(tiny_dir, tmp_path, capsys,
                                                                                     method):
    from rlhf_recipes.evaluation import main as evaluate_main

    tensorboard = importlib.util.find_spec("tensorboard") is not None
    assert main([recipe_file(tmp_path, tiny_dir, method), "eval.every=2"]
                + (["run.report_to=tensorboard"] if tensorboard else [])) == 0
    out = tmp_path / "run"
    shown = capsys.readouterr().out
    assert f"{method.upper()} on" in shown and "held-out evaluation: reward" in shown
    assert shown.count("samples at step 2") == 1
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first = records[0]
    # the reference is the adapters-off model: the same function before the first update
    assert first["objective/kl"] == 0.0 and first[f"{method}/policy/kl_token"] == 0.0
    assert {"env/reward_mean", "env/reward_std", "env/response_length", f"{method}/loss/total",
            f"{method}/policy/entropy", f"{method}/policy/clip_ratio/region_mean", f"{method}/grad_norm"} <= set(first)
    assert records[-1]["objective/kl"] != 0 and not any(k.startswith("rewards/") or k == "reward" for k in first)
    if method == "rloo":  # TRL's per-token log-ratio, times the mean length, is our per-sequence one: the same samples
        for r in records:
            assert r["objective/kl"] == pytest.approx(r["rloo/policy/kl_token"] * r["env/response_length"], rel=1e-4,
                                                      abs=1e-6)
    result = json.loads((out / "eval.json").read_text())
    assert result["before"]["policy"]["kl"]["mean"] == 0 and result["after"]["policy"]["kl"]["mean"] != 0
    assert (out / "report.md").exists() and (out / "training.png").exists()
    assert f"trained with {method.upper()}" in (out / "model" / "README.md").read_text()
    assert not (out / "model" / "value_head.safetensors").exists() and "saved adapter and tokenizer" in shown
    assert checkpoint.latest(out).step == 4 and [e["step"] for e in result["during"]] == [2]
    assert evaluate_main([str(out)]) == 0  # re-evaluated from the saved run alone: the same figures
    again = json.loads((out / "eval.json").read_text())["after"]
    assert again["policy"]["reward"] == result["after"]["policy"]["reward"]
    if tensorboard:  # the trackers got every step under our keys, and the evaluations
        from test_trackers import scalars

        logged, _ = scalars(out / "trackers" / f"tiny_{method}")
        assert [s for s, _ in logged["objective/kl"]] == [1, 2, 3, 4] and [s for s, _ in logged["eval/reward"]] == [0, 2, 4]
    # what a finished PPO run offers, a GRPO or RLOO run offers too
    from rlhf_recipes.export import main as export_main
    from rlhf_recipes.sample import main as sample_main

    capsys.readouterr()
    assert sample_main([str(out), "--heldout", "2"]) == 0
    printed = capsys.readouterr().out
    assert "policy" in printed and "eval at step" not in printed  # sampling is not an evaluation step
    assert export_main([str(out), str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.model_type == "gpt2"
    if method == "grpo":  # and what changed inside the model
        from rlhf_recipes.interpret import main as interpret_main

        assert interpret_main([str(out), "--batch-size", "8"]) == 0
        assert json.loads((out / "interpret" / "interpret.json").read_text())["num_prompts"] > 0


def test_a_t5_policy_and_vllm_without_a_gpu_are_refused_in_one_line(tiny_dir, tmp_path, capsys):
    path = recipe_file(tmp_path, tiny_dir, "grpo", policy="t5")
    assert main([path, "prompts.max_source_tokens=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encoder-decoder" in err and "use PPO" in err
    assert not (tmp_path / "run").exists()
    assert main([recipe_file(tmp_path, tiny_dir, "rloo"), "rloo.use_vllm=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: rloo.use_vllm=true needs a CUDA GPU, and this machine has none; set rloo.use_vllm=false "
                   "to sample with transformers")


def test_non_finite_rewards_are_skipped_and_stop_the_run_with_a_checkpoint(tiny_dir, tmp_path, capsys):
    path = tmp_path / "nan_reward.py"
    path.write_text("calls = []\n"
                    "def reward(texts):\n"
                    "    calls.append(len(texts))\n"  # a training batch is 16 texts, an evaluation's 8
                    "    bad = len(texts) == 16 and calls.count(16) > 1\n"
                    "    return [float('nan') if bad else float(len(t)) for t in texts]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main([recipe_file(tmp_path, tiny_dir), "reward.model=", "reward.label=none",
                     "reward.function=nan_reward:reward", "eval.num_prompts=8", "run.steps=10", "run.max_bad_batches=2",
                     "run.checkpoint_every=1", "run.keep_checkpoints=10"]) == 1
    finally:
        sys.path.remove(str(tmp_path))
    err = capsys.readouterr()
    assert "2 batches in a row had non-finite rewards or losses (to step 3)" in err.err and "grpo.learning_rate" in err.err
    assert err.out.count("non-finite reward, loss or gradient, batch skipped") == 2
    saved = checkpoint.latest(tmp_path / "run")
    assert saved.step == 3 and saved.state["skipped"] == 2 and [r["step"] for r in read_metrics(tmp_path / "run")] == [1]
    assert skipped_batches_changed_nothing(tmp_path / "run", saved)  # the skipped batches changed nothing




@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo"])  # RLOO runs the same loop
def test_a_run_resumes_after_sigkill_to_the_same_result_and_stops_cleanly_on_sigterm(tiny_dir, tmp_path, method):
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    whole_dir.mkdir(), cut_dir.mkdir()
    # two updates a step: the old log-probs are scored, and the clip acts
    after = resumed_run_matches(recipe_file(whole_dir, tiny_dir, method), recipe_file(cut_dir, tiny_dir, method, slow=True),
                                ["run.steps=6", f"{method}.num_iterations=2"])
    assert after[0]["policy"] == after[1]["policy"]


@pytest.mark.slow
@pytest.mark.parametrize("method, quantization", [("grpo", "8bit"), ("rloo", "4bit")])
def test_a_lora_policy_on_a_quantized_base_trains_from_kl_0(tiny_dir, tmp_path, method, quantization):
    assert main([recipe_file(tmp_path, tiny_dir, method), f"policy.quantization={quantization}", "run.steps=2"]) == 0
    records = read_metrics(tmp_path / "run")
    assert records[0]["objective/kl"] == 0.0 and records[-1]["objective/kl"] != 0.0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["before"]["policy"]["kl"]["mean"] == 0 and result["after"]["policy"]["kl"]["mean"] != 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart_grpo", "quickstart_rloo"])
def test_the_critic_free_quickstarts_learn_on_the_ppo_quickstarts_scale(tmp_path, quickstart_stages, name):
    out = run_dir_with_stages(tmp_path / name, quickstart_stages)
    assert main([name, "sft.epochs=2", "reward_model.epochs=1", "eval.num_prompts=64", "eval.batch_size=64",
                 "eval.every=0", "run.sample_every=0", f"run.output_dir={out}"]) == 0
    result = json.loads((out / "eval.json").read_text())
    before, after = result["before"], result["after"]
    assert after["reward_improvement"]["ci95"][0] > 0
    assert after["reward_improvement"]["mean"] >= 2 * before["policy"]["reward"]["std"]  # at least 2 ref std
    assert after["policy"]["judged"]["mean"] >= before["policy"]["judged"]["mean"] + 0.5  # and the judge agrees
    assert 0 < after["policy"]["kl"]["mean"] < 20


def test_a_step_the_processes_cannot_share_equally_is_refused_before_any_model_loads():
    from rlhf_recipes.loops.critic_free import refuse

    recipe = apply_overrides(load_recipe("quickstart_rloo"), ["rloo.batch_size=3", "rloo.num_generations=2"])
    refuse(recipe, encoder_decoder=False, processes=1)  # 6 samples: fine on one process
    with pytest.raises(RecipeError, match=r"rloo.batch_size x num_generations \(6\) must be a multiple of the "
                                          r"processes times rloo.gradient_accumulation_steps \(4 x 1\)"):
        refuse(recipe, encoder_decoder=False, processes=4)


@pytest.mark.parametrize("iterations", [1, 2])
def test_objective_kl_is_the_samples_sequence_log_ratio_to_the_adapters_off_reference(tiny_dir, tmp_path, iterations):
    """Read from the log-probs TRL computes anyway (its first loss pass, or its old log-probs with
    num_iterations 2), it equals a direct computation on the same samples, policy against adapters off."""
    from rlhf_recipes import Generation, Policy, trl_backend
    from rlhf_recipes.components.data import load_prompts
    from rlhf_recipes.components.policy import build_policy, load_tokenizer
    from rlhf_recipes.components.reward import FunctionReward
    from rlhf_recipes.config.sections import Prompts, Reward

    tokenizer = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    torch.manual_seed(0)
    policy = build_policy(Policy(model=str(tiny_dir / "gpt2"), lora_r=4, lora_alpha=8), torch.device("cpu"))
    with torch.no_grad():  # a policy that has moved from its reference
        for name, p in policy.pretrained_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompts = load_prompts(Prompts(dataset=str(tiny_dir / "imdb.jsonl"), query_min_tokens=2, query_max_tokens=4),
                           tokenizer, 4, 0)
    cfg = Reward(function=lambda texts: [float(len(t)) for t in texts], input="response")
    reward = trl_backend.RecipeReward(FunctionReward(cfg), cfg, tokenizer, prompts.train)
    grpo = GRPO(**{**BASE, "learning_rate": 1e-2}, loss_type="grpo", scale_rewards="group", num_iterations=iterations)
    trainer = trl_backend.make_critic_free_trainer(grpo, Generation(4, 6), policy.pretrained_model, tokenizer,
                                                   prompts.train, reward, 2, 0, tmp_path, 1)
    batch = trl_backend.sample_and_score(trainer, [0, 1, 2, 3], 0)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    n = batch["completion_ids"].shape[1]
    with torch.no_grad():
        logits = policy.pretrained_model(input_ids=ids, attention_mask=mask).logits
        with policy.pretrained_model.disable_adapter():
            ref_logits = policy.pretrained_model(input_ids=ids, attention_mask=mask).logits
    target = batch["completion_ids"]

    def logps(x):
        return torch.log_softmax(x[:, -n - 1:-1].float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)

    expected = ((logps(logits) - logps(ref_logits)) * batch["completion_mask"]).sum(1).mean()
    stats = trl_backend.critic_free_update(trainer, batch)
    assert abs(float(expected)) > 0.01  # the adapters moved the policy
    assert stats["sequence_kl"] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
