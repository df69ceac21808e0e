"""DPO: the section, preference data (pairs, nested columns, rankings), TRL's tokenization
without GPT-2's stray BOS, the loss against the adapters-off reference, and whole runs
through the CLI that are evaluated, resumed, stopped and re-evaluated as PPO runs are."""
import dataclasses
import json
import math
import textwrap

import pytest
import torch

from conftest import resumed_run_matches, run_dir_with_stages, skipped_batches_changed_nothing
from rlhf_recipes import DPO, RecipeError, apply_overrides, load_recipe
from rlhf_recipes.runtime import checkpoint
from rlhf_recipes.config.stages import RewardModel
from rlhf_recipes.components.data import load_preferences
from rlhf_recipes.runtime.rundir import read_metrics
from rlhf_recipes.run import main

TRL_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "grad_norm", "learning_rate"}


def recipe_file(tmp_path, tiny_dir, prefs, slow: bool = False):
    """A DPO recipe for the tiny GPT-2 (whose tokenizer has a BOS it does not add), scored by the
    tiny DistilBERT; slow=True sleeps before each update, so a test can stop it mid-run."""
    path = tmp_path / "tiny_dpo.py"
    path.write_text(textwrap.dedent(f"""
        import time
        from rlhf_recipes import DPO, Eval, Generation, Policy, Prompts, Recipe, Reward, Run
        from rlhf_recipes import trl_backend
        if {slow}:
            _update = trl_backend.dpo_update
            trl_backend.dpo_update = lambda *a: (time.sleep(0.3), _update(*a))[1]
        recipe = Recipe(
            name="tiny_dpo",
            policy=Policy(model="{tiny_dir / 'gpt2'}", lora_r=4, lora_alpha=8),
            reward=Reward(model="{tiny_dir / 'distilbert-imdb'}", label="POSITIVE", batch_size=16),
            prompts=Prompts(dataset="{tiny_dir / 'imdb.jsonl'}", query_min_tokens=2, query_max_tokens=4),
            generation=Generation(response_min_tokens=4, response_max_tokens=6),
            dpo=DPO(dataset="{prefs / 'pairs.jsonl'}", separator=" ", beta=0.1, learning_rate=1e-2, epochs=1.0,
                    batch_size=8, max_length=32, max_prompt_length=8, heldout=16),
            eval=Eval(num_prompts=16, batch_size=16),
            run=Run(output_dir="{tmp_path / 'run'}", steps=4, checkpoint_every=2, keep_checkpoints=2),
        )
    """))
    return str(path)


# ---------------------------------------------------------------------------- the section
@pytest.mark.parametrize("change, message", [
    ({"label_smoothing": 0.1, "loss_type": "hinge"}, "dpo.label_smoothing is ignored by loss_type='hinge'"),
    ({"max_prompt_length": 64, "max_length": 64}, "dpo.max_prompt_length must be < dpo.max_length (64)"),
    ({"loss_type": "kto_pair"}, "dpo.loss_type must be one of 'sigmoid', 'hinge', 'ipo'"),
    ({"beta": 0.0}, "dpo.beta must be > 0"),
    ({"batch_size": 6, "gradient_accumulation_steps": 4}, "must be a multiple of dpo.gradient_accumulation_steps"),
])
def test_the_dpo_section_checks_its_fields(change, message):
    base = dict(dataset="d.jsonl", learning_rate=1e-4, epochs=1.0, batch_size=8, beta=0.1)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DPO(**{**base, **change})


def test_a_recipe_has_ppo_or_dpo_and_dpo_fields_override_like_any_other():
    import dataclasses

    dpo_recipe = load_recipe("quickstart_dpo")
    ppo = load_recipe("quickstart").ppo
    with pytest.raises(RecipeError, match="give exactly one, not ppo and dpo"):
        dataclasses.replace(dpo_recipe, ppo=ppo)
    with pytest.raises(RecipeError, match="give exactly one"):
        dataclasses.replace(dpo_recipe, dpo=None)
    with pytest.raises(RecipeError, match="run.steps is required with PPO"):
        dataclasses.replace(dpo_recipe, dpo=None, ppo=ppo)
    changed = apply_overrides(dpo_recipe, ["dpo.beta=0.5", "dpo.loss_type=ipo", "dpo.rpo_alpha=1"])
    assert (changed.dpo.beta, changed.dpo.loss_type, changed.dpo.rpo_alpha) == (0.5, "ipo", 1.0)
    with pytest.raises(RecipeError, match="unknown override key 'dpo.betta'; did you mean dpo.beta"):
        apply_overrides(dpo_recipe, ["dpo.betta=1"])
    with pytest.raises(RecipeError, match="has no ppo stage"):
        apply_overrides(dpo_recipe, ["ppo.target=3"])


# ---------------------------------------------------------------------------- data
def test_preferences_come_as_pairs_nested_columns_or_rankings(prefs):
    cfg = DPO(dataset=str(prefs / "pairs.jsonl"), learning_rate=1e-4, epochs=1.0, batch_size=8, beta=0.1)
    pairs = load_preferences("dpo", cfg, cfg.prompt_column)
    assert all(len(g) == 1 and len(g[0]) == 3 for g in pairs)
    nested = DPO(dataset=str(prefs / "nested.jsonl"), learning_rate=1e-4, epochs=1.0, batch_size=8, beta=0.1,
                 prompt_column="pair.q", chosen_column="pair.good", rejected_column="pair.bad")
    assert load_preferences("dpo", nested, nested.prompt_column) == pairs
    ranked = DPO(dataset=str(prefs / "ranked.jsonl"), learning_rate=1e-4, epochs=1.0, batch_size=8, beta=0.1,
                 ranking_column="answers")
    groups = load_preferences("dpo", ranked, ranked.prompt_column)
    (prompt, best, worst), = pairs[0]
    assert groups[0] == [(prompt, best, "and then"), (prompt, best, worst), (prompt, "and then", worst)]  # K(K-1)/2
    # the reward-model stage takes rankings too, as (better, worse) texts
    rm = RewardModel(dataset=str(prefs / "ranked.jsonl"), learning_rate=1e-3, epochs=1.0, batch_size=8,
                     ranking_column="answers")
    assert load_preferences("reward_model", rm)[0] == [(best, "and then"), (best, worst), ("and then", worst)]


@pytest.mark.parametrize("fields, message", [
    ({"chosen_column": "good"}, "dpo.chosen_column 'good' is not in"),
    ({"ranking_column": "prompt"}, "dpo.ranking_column 'prompt' holds str, not lists of texts"),
    ({"dataset": "EMPTY"}, "is empty; give a file with data in it"),
])
def test_bad_preference_columns_and_empty_data_get_one_line_errors(prefs, fields, message):
    (prefs / "empty.jsonl").write_text("")
    fields = {k: str(prefs / "empty.jsonl") if v == "EMPTY" else v for k, v in fields.items()}
    cfg = DPO(**{"dataset": str(prefs / "pairs.jsonl"), "learning_rate": 1e-4, "epochs": 1.0, "batch_size": 8,
                 "beta": 0.1, **fields})
    with pytest.raises(RecipeError, match=message) as err:
        load_preferences("dpo", cfg, cfg.prompt_column)
    assert "\n" not in str(err.value)


def test_pairs_are_tokenized_as_prompts_are_sampled_and_cut_from_the_left(tiny_dir, tmp_path):
    from rlhf_recipes import trl_backend
    from rlhf_recipes.config import Policy
    from rlhf_recipes.components.policy import build_policy, load_tokenizer

    cfg = DPO(dataset="unused", learning_rate=1e-3, epochs=1.0, batch_size=2, beta=0.1, separator=" ",
              max_length=32, max_prompt_length=8)
    rows = [("the movie was", "great fun", "a bore"), ("i think", "it works", "it fails")]
    for arch, adds_bos in (("gpt2", False), ("llama", True)):
        tokenizer = load_tokenizer("policy.model", str(tiny_dir / arch))
        policy = build_policy(Policy(model=str(tiny_dir / arch), lora_r=4, lora_alpha=8), torch.device("cpu"))
        trainer = trl_backend.make_dpo_trainer(cfg, policy.pretrained_model, tokenizer, rows, rows[:1], 2, 0,
                                               tmp_path / arch)
        row = trainer.train_dataset[0]
        as_sampled = tokenizer("the movie was")["input_ids"]  # how PPO and the evaluation see the prompt
        assert row["prompt_ids"] == as_sampled and (as_sampled[0] == tokenizer.bos_token_id) == adds_bos
        assert tokenizer.decode(row["chosen_ids"], skip_special_tokens=True).strip() == "great fun"
        assert row["chosen_ids"][-1] == tokenizer.eos_token_id  # answers end, so the policy learns to stop
        # TRL's collator scores the answers only: prompt + chosen, with its completion mask over the answer
        batch = trainer.data_collator([row])
        assert batch["input_ids"][0, :len(as_sampled)].tolist() == as_sampled
        assert batch["completion_mask"][0, :len(as_sampled)].tolist() == [0] * len(as_sampled)
        # adapters at zero: the policy is its reference, so every DPO reward is exactly 0
        loss, metrics = trl_backend.dpo_batch_loss(trainer, [trainer.train_dataset[i] for i in range(2)], train=False)
        assert metrics["rewards/chosen"] == 0 and metrics["rewards/margins"] == 0
        assert float(loss) == pytest.approx(math.log(2))
        # a prompt longer than max_prompt_length is cut from the left: a Llama prompt keeps its BOS;
        # a prompt's trailing space merging into the answer's first token loses no token
        long = [(" ".join(["the movie was"] * 10), "great fun", "a bore"), ("the ", "movie was great", "a bore")]
        trainer = trl_backend.make_dpo_trainer(dataclasses.replace(cfg, separator=""), policy.pretrained_model,
                                               tokenizer, long, [], 2, 0, tmp_path / f"{arch}-long")
        assert len(trainer.train_dataset) == 2  # TRL 1.x alone would drop the row whose prompt is too long
        cut, spaced = trainer.train_dataset[0], trainer.train_dataset[1]
        assert (cut["prompt_ids"][0] == tokenizer.bos_token_id) == adds_bos
        assert len(cut["prompt_ids"]) == 8 and cut["chosen_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(spaced["chosen_ids"], skip_special_tokens=True).strip() == "movie was great"
        assert tokenizer.decode(spaced["prompt_ids"], skip_special_tokens=True) == "the"


def test_sequence_log_probs_are_float32_for_a_bfloat16_policy_and_rpo_adds_the_sft_term(tiny_dir, tmp_path):
    """A bfloat16 policy's sequence log-probs are summed in float32 (in bfloat16 they would be
    rounded to whole nats at real lengths, and small margins vanish); rpo_alpha adds alpha times
    the chosen answers' mean negative log-likelihood, as RPO's term did in TRL 0.11.4."""
    from rlhf_recipes import trl_backend
    from rlhf_recipes.config import Policy
    from rlhf_recipes.components.policy import build_policy, load_tokenizer

    rows = [("the movie was", "great fun", "a bore"), ("i think", "it works", "it fails")]
    tokenizer = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    policy = build_policy(Policy(model=str(tiny_dir / "gpt2"), lora_r=4, lora_alpha=8, dtype="bfloat16"),
                          torch.device("cpu"))
    base = policy.pretrained_model.get_base_model()
    seen = []
    handle = base.register_forward_hook(lambda m, a, out: seen.append(out))
    cfg = DPO(dataset="unused", learning_rate=1e-2, epochs=1.0, batch_size=2, beta=0.1, separator=" ",
              max_length=32, max_prompt_length=8)
    trainer = trl_backend.make_dpo_trainer(cfg, policy.pretrained_model, tokenizer, rows, rows, 2, 0, tmp_path)
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
    batch = [trainer.train_dataset[i] for i in range(2)]
    loss, _ = trl_backend.dpo_batch_loss(trainer, batch, train=False)
    handle.remove()
    assert seen and all(out.log_probs.dtype == torch.float32 for out in seen)
    rpo = trl_backend.make_dpo_trainer(dataclasses.replace(cfg, rpo_alpha=0.5), policy.pretrained_model, tokenizer,
                                       rows, rows, 2, 0, tmp_path / "rpo")
    with_sft, _ = trl_backend.dpo_batch_loss(rpo, batch, train=False)
    inputs = rpo.data_collator(batch)
    with torch.no_grad():
        logits = policy.pretrained_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    answer = inputs["completion_mask"][:, 1:].bool()
    nll = -(logp[:2][answer[:2]]).mean()  # the chosen answers (the first half of TRL's batch), per token
    assert float(with_sft - loss) == pytest.approx(0.5 * float(nll), rel=1e-3)


def test_dpo_gradient_checkpointing_recomputes_the_blocks_and_changes_no_number(tiny_dir, tmp_path):
    from rlhf_recipes import trl_backend
    from rlhf_recipes.config import Policy
    from rlhf_recipes.components.policy import build_policy, load_tokenizer

    cfg = DPO(dataset="unused", learning_rate=1e-2, epochs=1.0, batch_size=2, beta=0.1, separator=" ",
              max_length=32, max_prompt_length=8)
    rows = [("the movie was", "great fun", "a bore"), ("i think", "it works", "it fails")]
    tokenizer = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    calls, results = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = build_policy(Policy(model=str(tiny_dir / "gpt2"), lora_r=4, lora_alpha=8), torch.device("cpu"))
        trainer = trl_backend.make_dpo_trainer(cfg, policy.pretrained_model, tokenizer, rows, [], 2, 0,
                                               tmp_path / str(checkpointing), checkpointing)
        embeddings = policy.pretrained_model.get_input_embeddings()
        hooks = len(embeddings._forward_hooks)
        saved = []  # what autograd keeps for the backward pass outside checkpointed blocks, in elements
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            for _ in range(2):  # the second update starts from moved adapters: a non-zero gradient everywhere
                stats = trl_backend.dpo_update(trainer, [trainer.train_dataset[i] for i in range(2)])
        calls[checkpointing] = sum(saved)
        # TRL's reference pass toggles checkpointing, and transformers would add a hook each time
        assert len(embeddings._forward_hooks) == hooks
        results[checkpointing] = (stats, {n: p.detach().clone() for n, p in policy.named_parameters()
                                          if p.requires_grad})
    assert calls[True] < 0.7 * calls[False]  # the blocks' activations are recomputed, not kept
    (plain, plain_params), (checkpointed, params) = results[False], results[True]
    assert plain["loss"] == pytest.approx(checkpointed["loss"], rel=1e-6)
    assert all(torch.allclose(params[n], plain_params[n], atol=1e-6) for n in params)


def test_the_trainer_also_trains_with_its_own_train_method(tiny_dir, tmp_path):
    """For projects that import it: TRL's DPOTrainer.train() on our tokenized rows, its metrics logged."""
    from rlhf_recipes import trl_backend
    from rlhf_recipes.config import Policy
    from rlhf_recipes.components.policy import build_policy, load_tokenizer

    cfg = DPO(dataset="unused", learning_rate=1e-2, epochs=1.0, batch_size=2, beta=0.1, separator=" ",
              max_length=32, max_prompt_length=8)
    rows = [("the movie was", "great fun", "a bore"), ("i think", "it works", "it fails")] * 2
    tokenizer = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    policy = build_policy(Policy(model=str(tiny_dir / "gpt2"), lora_r=4, lora_alpha=8), torch.device("cpu"))
    trainer = trl_backend.make_dpo_trainer(cfg, policy.pretrained_model, tokenizer, rows, rows[:2], 2, 0, tmp_path)
    trainer.args.logging_steps = 1
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("rewards/margins" in h and "rewards/accuracies" in h for h in logged)
    assert "eval_rewards/margins" in trainer.evaluate()


# ---------------------------------------------------------------------------- whole runs
def test_a_dpo_run_is_evaluated_and_reported_as_a_ppo_run_is(tiny_dir, prefs, tmp_path, capsys):
    from rlhf_recipes.evaluation import main as evaluate_main

    assert main([recipe_file(tmp_path, tiny_dir, prefs)]) == 0
    out = tmp_path / "run"
    shown = capsys.readouterr().out
    assert "DPO on" in shown and "held-out evaluation: reward" in shown
    result = json.loads((out / "eval.json").read_text())
    before, after = result["before"], result["after"]
    assert before["policy"]["kl"]["mean"] == 0 and after["policy"]["kl"]["mean"] > 0  # the same KL as PPO's
    assert before["heldout_pairs"]["rewards/margins"] == 0 and after["heldout_pairs"]["rewards/margins"] > 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and TRL_KEYS <= set(records[0])
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    report = (out / "report.md").read_text()
    assert "DPO's own metrics on its held-out preference pairs" in report and (out / "training.png").exists()
    assert "trained with DPO" in (out / "model" / "README.md").read_text()
    # re-evaluated from the saved run alone: the same samples, the same figures
    assert evaluate_main([str(out)]) == 0
    again = json.loads((out / "eval.json").read_text())["after"]
    assert again["policy"]["reward"] == after["policy"]["reward"] and again["policy"]["kl"] == after["policy"]["kl"]


def test_non_finite_dpo_losses_are_skipped_and_stop_the_run_with_a_checkpoint(tiny_dir, prefs, tmp_path,
                                                                              monkeypatch, capsys):
    from rlhf_recipes import trl_backend

    real, calls = trl_backend.dpo_batch_loss, []

    def breaking(trainer, rows, train=True):
        loss, metrics = real(trainer, rows, train)
        if train:
            calls.append(1)
            if len(calls) >= 2:  # every update after the first
                loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(trl_backend.dpo, "dpo_batch_loss", breaking)  # where dpo_update calls it
    path = recipe_file(tmp_path, tiny_dir, prefs)
    assert main([path, "run.steps=10", "run.max_bad_batches=2", "run.checkpoint_every=1",
                 "run.keep_checkpoints=10"]) == 1
    err = capsys.readouterr()
    assert "2 batches in a row had non-finite rewards or losses (to step 3)" in err.err and "dpo.learning_rate" in err.err
    assert err.out.count("non-finite loss or gradient, batch skipped") == 2
    saved = checkpoint.latest(tmp_path / "run")
    assert saved.step == 3 and saved.state["skipped"] == 2 and [r["step"] for r in read_metrics(tmp_path / "run")] == [1]
    assert skipped_batches_changed_nothing(tmp_path / "run", saved)  # the skipped updates changed nothing




@pytest.mark.slow
def test_a_dpo_run_resumes_after_sigkill_to_the_same_result_and_stops_cleanly_on_sigterm(tiny_dir, prefs, tmp_path):
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    whole_dir.mkdir(), cut_dir.mkdir()
    after = resumed_run_matches(recipe_file(whole_dir, tiny_dir, prefs), recipe_file(cut_dir, tiny_dir, prefs, slow=True),
                                ["run.steps=6"])
    assert after[0]["policy"] == after[1]["policy"] and after[0]["heldout_pairs"] == after[1]["heldout_pairs"]


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_dpo_trains_a_lora_policy_on_a_quantized_base(tiny_dir, prefs, tmp_path, quantization):
    assert main([recipe_file(tmp_path, tiny_dir, prefs), f"policy.quantization={quantization}", "run.steps=2"]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["before"]["policy"]["kl"]["mean"] == 0 and result["after"]["heldout_pairs"]["rewards/margins"] > 0


@pytest.mark.slow
def test_the_dpo_quickstart_learns_on_the_ppo_quickstarts_scale(tmp_path, quickstart_stages):
    out = run_dir_with_stages(tmp_path / "quickstart_dpo", quickstart_stages)
    assert main(["quickstart_dpo", "sft.epochs=2", "reward_model.epochs=1", "eval.num_prompts=64",
                 "eval.batch_size=64", "eval.every=0", f"run.output_dir={out}"]) == 0
    result = json.loads((out / "eval.json").read_text())
    before, after = result["before"], result["after"]
    assert after["reward_improvement"]["ci95"][0] > 0
    assert after["policy"]["judged"]["mean"] >= before["policy"]["judged"]["mean"] + 0.3
    assert 0 < after["policy"]["kl"]["mean"] < 20
    assert after["heldout_pairs"]["rewards/accuracies"] >= 0.8
