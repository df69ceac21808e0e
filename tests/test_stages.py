"""The stages before PPO on tiny inputs: SFT lowers the loss, the reward model ranks held-out
pairs, outputs are cached and reused, stages run alone, and the corpus regenerates exactly."""
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import local_overrides
from rlhf_recipes import SFT, RecipeError, RewardModel, apply_overrides, corpus, load_recipe
from rlhf_recipes.run import main
from rlhf_recipes.loops.stages import STAGE_FILE, heldout_loss, pair_accuracy, prepare

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small copy of the quickstart's data: 400 reviews, 400 pairs, 200 openings."""
    root = tmp_path_factory.mktemp("corpus")
    corpus.write(root, seed=3, num_reviews=400, num_pairs=400, num_prompts=200)
    return root


def staged_recipe(data, out, **sft):
    """The quickstart recipe on the small data, with short stages."""
    recipe = load_recipe("quickstart")
    return dataclasses.replace(
        recipe, policy=dataclasses.replace(recipe.policy, model=str(data / "base")),
        sft=dataclasses.replace(recipe.sft, dataset=str(data / "reviews.jsonl"), epochs=2.0, heldout=50, **sft),
        reward_model=dataclasses.replace(recipe.reward_model, dataset=str(data / "pairs.jsonl"), epochs=3.0,
                                         learning_rate=3e-3, heldout=50),
        prompts=dataclasses.replace(recipe.prompts, dataset=str(data / "prompts.jsonl")),
        run=dataclasses.replace(recipe.run, output_dir=str(out)))


@pytest.fixture(scope="module")
def staged(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("staged")
    recipe = staged_recipe(data, out)
    return recipe, prepare(recipe, out, CPU), out


def test_sft_lowers_the_held_out_loss(staged):
    _, ppo_recipe, out = staged
    record = json.loads((out / "stages" / "sft" / STAGE_FILE).read_text())
    assert record["heldout_loss_after"] < record["heldout_loss_before"] - 1.0
    assert record["train_losses"][-1] < record["train_losses"][0]
    assert ppo_recipe.policy.model == str(out / "stages" / "sft") and ppo_recipe.sft is None
    model = AutoModelForCausalLM.from_pretrained(ppo_recipe.policy.model)  # a plain causal LM, safetensors
    assert (out / "stages" / "sft" / "model.safetensors").exists()
    assert not list((out / "stages" / "sft").glob("*.bin")) and not (out / "stages" / "sft" / "trainer").exists()
    tokenizer = AutoTokenizer.from_pretrained(ppo_recipe.policy.model)
    fresh = [r["text"] for r in corpus.reviews(100, seed=99)]  # never seen in training
    assert heldout_loss(model, tokenizer, fresh, 64) < record["heldout_loss_before"] - 1.0


def test_the_reward_model_prefers_chosen_over_rejected_on_held_out_pairs(staged, data):
    _, ppo_recipe, out = staged
    record = json.loads((out / "stages" / "reward_model" / STAGE_FILE).read_text())
    assert record["heldout_accuracy_after"] >= 0.9 and record["heldout_accuracy_after"] > record["heldout_accuracy_before"]
    assert ppo_recipe.reward.model == str(out / "stages" / "reward_model") and ppo_recipe.reward.label is None
    model = AutoModelForSequenceClassification.from_pretrained(ppo_recipe.reward.model)
    assert model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(ppo_recipe.reward.model)
    fresh = [(p["chosen"], p["rejected"]) for p in corpus.pairs(100, seed=99)]  # never seen in training
    assert pair_accuracy(model, tokenizer, fresh, 64) >= 0.9


def test_stage_outputs_are_reused_until_an_input_changes(staged, capsys):
    recipe, _, out = staged
    weights = out / "stages" / "sft" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    ppo_lora = dataclasses.replace(recipe, policy=dataclasses.replace(recipe.policy, lora_r=4))
    prepare(ppo_lora, out, CPU)  # PPO's LoRA settings are no input of a full SFT
    assert "sft: reusing" in capsys.readouterr().out and weights.stat().st_mtime_ns == stamp
    changed = dataclasses.replace(recipe, sft=dataclasses.replace(recipe.sft, epochs=1.0))
    prepare(changed, out, CPU, until="sft")
    assert weights.stat().st_mtime_ns != stamp  # retrained
    with pytest.raises(RecipeError, match="trained from other inputs"):
        prepare(recipe, out, CPU, train=False)  # re-evaluation never trains


def test_a_stage_runs_alone_from_the_command_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["quickstart", f"policy.model={data / 'base'}", f"sft.dataset={data / 'reviews.jsonl'}",
            "sft.epochs=1", "sft.heldout=50", f"run.output_dir={out}"]
    assert main([*base, "--stage", "sft"]) == 0
    assert [p.name for p in out.iterdir()] == ["stages"] and [p.name for p in (out / "stages").iterdir()] == ["sft"]
    assert main(["imdb_positive", f"run.output_dir={tmp_path / 'x'}", "--stage", "sft"]) == 2
    assert "has no sft stage" in capsys.readouterr().err


def test_lora_sft_merges_its_adapters_into_a_pretrained_base(tiny_dir, data, tmp_path):
    recipe = apply_overrides(load_recipe("imdb_positive"), local_overrides("imdb_positive", tiny_dir))
    recipe = dataclasses.replace(recipe, sft=SFT(dataset=str(tiny_dir / "imdb.jsonl"), learning_rate=1e-2,
                                                 epochs=1.0, batch_size=16, method="lora", max_length=32, heldout=50),
                                 run=dataclasses.replace(recipe.run, output_dir=str(tmp_path)))
    ppo_recipe = prepare(recipe, tmp_path, CPU)
    record = json.loads((tmp_path / "stages" / "sft" / STAGE_FILE).read_text())
    assert record["heldout_loss_after"] < record["heldout_loss_before"]
    merged = AutoModelForCausalLM.from_pretrained(ppo_recipe.policy.model)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "gpt2")
    assert not any("lora" in k for k in merged.state_dict())  # merged: a plain model again
    assert not torch.equal(merged.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)


def spy_training(monkeypatch, name: str) -> list[dict]:
    """What the stage's model looked like while trl_backend.`name` trained it."""
    from rlhf_recipes import trl_backend

    seen, train = [], getattr(trl_backend, name)

    def spy(model, *args):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        losses = train(model, *args)
        seen.append({"precision": args[-1], "trainable": {n: p.dtype for n, p in model.named_parameters()
                                                            if p.requires_grad},
                     "kinds": {type(m).__name__ for m in model.modules()},
                     "moved": sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters()
                                  if p.requires_grad) / sum(v.numel() for v in before.values())})
        return losses

    monkeypatch.setattr(trl_backend, name, spy)
    return seen


def test_a_bf16_full_sft_keeps_fp32_master_weights_under_mixed_precision(data, tmp_path, monkeypatch):
    """Pure bf16 AdamW at 1e-5 rounds most updates away (about 15% of the weights moved in 10 steps);
    fp32 master weights under bf16 autocast move them all, and the output is saved in bf16."""
    seen = spy_training(monkeypatch, "train_sft")
    recipe = staged_recipe(data, tmp_path, learning_rate=1e-5)
    recipe = dataclasses.replace(recipe, policy=dataclasses.replace(recipe.policy, dtype="bfloat16"),
                                 sft=dataclasses.replace(recipe.sft, epochs=1.0))
    ppo_recipe = prepare(recipe, tmp_path, CPU, until="sft") or recipe
    (trained,) = seen
    assert trained["precision"]["bf16"] and set(trained["trainable"].values()) == {torch.float32}
    assert trained["moved"] > 0.9
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "stages" / "sft", dtype="auto")
    assert saved.dtype == torch.bfloat16 and ppo_recipe.sft is not None


def test_an_8bit_policy_gets_qlora_sft_and_a_full_precision_merged_output(tiny_dir, tmp_path, monkeypatch):
    seen = spy_training(monkeypatch, "train_sft")
    recipe = apply_overrides(load_recipe("imdb_positive"), local_overrides("imdb_positive", tiny_dir) + [
        "policy.quantization=8bit"])
    recipe = dataclasses.replace(recipe, sft=SFT(dataset=str(tiny_dir / "imdb.jsonl"), learning_rate=1e-2,
                                                 epochs=0.5, batch_size=16, method="lora", max_length=32, heldout=50,
                                                 gradient_checkpointing=True),
                                 run=dataclasses.replace(recipe.run, output_dir=str(tmp_path)))
    ppo_recipe = prepare(recipe, tmp_path, CPU)
    (trained,) = seen
    assert "Linear8bitLt" in trained["kinds"]  # it trained on the quantized base, as PPO will
    assert all("lora_" in n for n in trained["trainable"]) and set(trained["trainable"].values()) == {torch.float32}
    assert any(v for k, v in trained["precision"].items() if k.endswith("checkpointing"))
    record = json.loads((tmp_path / "stages" / "sft" / STAGE_FILE).read_text())
    assert record["heldout_loss_after"] < record["heldout_loss_before"]
    config = json.loads((tmp_path / "stages" / "sft" / "config.json").read_text())
    assert "quantization_config" not in config  # merged into a full-precision base; PPO quantizes it again
    merged = AutoModelForCausalLM.from_pretrained(ppo_recipe.policy.model)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "gpt2")
    assert not any("lora" in k for k in merged.state_dict())
    moved = merged.transformer.h[0].attn.c_attn.weight - base.transformer.h[0].attn.c_attn.weight
    assert 0 < moved.abs().max() < 1.0  # the adapters' change, not int8 rounding of the whole base


def test_the_reward_model_trains_lora_on_a_quantized_base_when_asked(tiny_dir, data, tmp_path, monkeypatch):
    seen = spy_training(monkeypatch, "train_reward_model")
    recipe = staged_recipe(data, tmp_path)
    recipe = dataclasses.replace(
        recipe, sft=None, policy=dataclasses.replace(recipe.policy, quantization="8bit"),
        reward_model=dataclasses.replace(recipe.reward_model, init="pretrained", model=str(tiny_dir / "gpt2"),
                                         method="lora", epochs=1.0))
    ppo_recipe = prepare(recipe, tmp_path, CPU)
    (trained,) = seen
    assert "Linear8bitLt" in trained["kinds"]
    assert all("lora_" in n or "score" in n for n in trained["trainable"])  # adapters and the new head
    assert any("score" in n for n in trained["trainable"])
    assert set(trained["trainable"].values()) == {torch.float32}
    model = AutoModelForSequenceClassification.from_pretrained(ppo_recipe.reward.model)
    assert model.config.num_labels == 1 and not any("lora" in k for k in model.state_dict())
    assert "quantization_config" not in json.loads((tmp_path / "stages" / "reward_model" / "config.json").read_text())
    with pytest.raises(RecipeError, match="reward_model.quantization.*method=lora"):
        dataclasses.replace(recipe.reward_model, method="full", quantization="8bit")


def test_sft_batches_keep_eos_even_when_it_is_the_pad_token(tiny_dir):
    from rlhf_recipes.components.policy import load_tokenizer
    from rlhf_recipes.trl_backend.stages import _lm_batch

    tokenizer = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))  # GPT-2: pad is eos
    rows = [tokenizer("a b" + tokenizer.eos_token), tokenizer("a b c d" + tokenizer.eos_token)]
    batch = _lm_batch(tokenizer, rows)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    assert (batch["labels"][0] == eos).sum() == 1  # its own EOS is learned; the padding after it is not
    assert (batch["labels"] == -100).sum() == (batch["attention_mask"] == 0).sum() > 0


def test_stage_settings_are_checked():
    with pytest.raises(RecipeError, match="sft.init"):
        SFT(dataset="d.jsonl", learning_rate=1e-3, epochs=1.0, batch_size=8, method="lora", init="random")
    with pytest.raises(RecipeError, match="reward_model.heldout"):
        RewardModel(dataset="p.jsonl", learning_rate=1e-3, epochs=1.0, batch_size=8, heldout=0)
    recipe = load_recipe("quickstart")
    with pytest.raises(RecipeError, match="reward.model must be unset"):
        dataclasses.replace(recipe, reward=dataclasses.replace(recipe.reward, model="x"))
    with pytest.raises(RecipeError, match="has no sft stage"):
        apply_overrides(load_recipe("imdb_positive"), ["sft.epochs=2"])
    assert apply_overrides(recipe, ["sft.epochs=2"]).sft.epochs == 2.0


def test_the_shipped_corpus_regenerates_exactly(tmp_path):
    """The data byte for byte; the tokenizer and model config (which each transformers major
    version writes in its own way) by what they load as."""
    from transformers import AutoConfig, AutoTokenizer

    corpus.write(tmp_path)
    data = sorted(p.relative_to(corpus.QUICKSTART) for p in corpus.QUICKSTART.glob("*.jsonl"))
    assert data == sorted(p.relative_to(tmp_path) for p in tmp_path.glob("*.jsonl")) and data
    assert all((corpus.QUICKSTART / p).read_bytes() == (tmp_path / p).read_bytes() for p in data)
    shipped, fresh = (AutoTokenizer.from_pretrained(d / "base") for d in (corpus.QUICKSTART, tmp_path))
    texts = [json.loads(line)["text"] for line in (tmp_path / "reviews.jsonl").read_text().splitlines()[:500]]
    assert shipped(texts)["input_ids"] == fresh(texts)["input_ids"] and "token_type_ids" not in fresh(texts[:1])
    assert shipped.get_vocab() == fresh.get_vocab() and shipped.special_tokens_map == fresh.special_tokens_map
    assert shipped.model_max_length == fresh.model_max_length
    where = ("transformers_version", "_name_or_path")
    keep = lambda c: {k: v for k, v in c.to_dict().items() if k not in where}  # noqa: E731
    assert keep(AutoConfig.from_pretrained(corpus.QUICKSTART / "base")) == keep(AutoConfig.from_pretrained(tmp_path / "base"))


def test_the_corpus_is_mixed_and_the_judge_agrees_with_its_labels():
    rows = corpus.reviews(2000, seed=5)
    share = sum(r["label"] for r in rows) / len(rows)
    assert 0.05 < share < 0.2  # mostly critical, but mixed
    assert all(corpus.is_positive(r["text"]) == bool(r["label"]) for r in rows)
    assert all(corpus.opinion(p["text"]) == 0 for p in corpus.openings(500, seed=6))  # prompts give no opinion
    pairs = corpus.pairs(500, seed=7)
    assert all(corpus.opinion(p["chosen"]) > corpus.opinion(p["rejected"]) for p in pairs)
