"""Instruct models and encoder-decoders that start their own way, on tiny models built to trigger it:
a Qwen2 with ChatML's template whose generation config names two end tokens (<|im_end|> and
the tokenizer's EOS <|endoftext|>), and a BART that is forced to write <s> first."""
import json

import pytest
import torch

from conftest import SMALL, local_overrides, write_jsonl
from rlhf_recipes import DPO, Generation, Policy, Prompts, RecipeError, apply_overrides, load_recipe, ppo, sample
from rlhf_recipes import trl_backend
from rlhf_recipes.components.data import load_prompts
from rlhf_recipes.components.policy import build_policy, load_tokenizer
from rlhf_recipes.components.rollout import end_ids, generate, sampling_config
from rlhf_recipes.run import main

CPU = torch.device("cpu")
SYSTEM = "Continue the review."


def chat_ids(tokenizer, text: str, system: str | None = SYSTEM) -> list[int]:
    """The templated prompt as transformers itself tokenizes it (not our path)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def qwen(tiny_dir):
    tokenizer = load_tokenizer("policy.model", str(tiny_dir / "qwen2-instruct"))
    torch.manual_seed(0)
    return build_policy(Policy(model=str(tiny_dir / "qwen2-instruct")), CPU), tokenizer


def test_sampling_stops_and_cuts_at_every_end_token_the_model_names(qwen):
    policy, tokenizer = qwen
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id != im_end and end_ids(policy, tokenizer) == [tokenizer.eos_token_id, im_end]
    lm_head = policy.pretrained_model.get_base_model().lm_head
    hook = lm_head.register_forward_hook(lambda m, i, logits: logits.index_add(
        -1, torch.tensor([im_end]), torch.full((*logits.shape[:-1], 1), 3.0)))  # the turn ends often
    try:
        torch.manual_seed(0)
        queries = [torch.tensor(chat_ids(tokenizer, f"review {i}")) for i in range(16)]
        responses = generate(policy, tokenizer, queries, [12] * 16, Generation(4, 12), CPU)
    finally:
        hook.remove()
    ended = [r for r in responses if im_end in r.tolist()]
    assert ended, "the fixture does end turns"
    assert all(r.tolist().index(im_end) == len(r) - 1 for r in ended)  # nothing after the end of the turn
    assert policy.pretrained_model.get_base_model().generation_config.eos_token_id == [im_end, tokenizer.eos_token_id]


def test_prompts_are_the_templated_ones_in_training_evaluation_and_sample(tiny_dir, tmp_path, monkeypatch):
    seen, step = [], ppo.ppo_step

    def spy(trainer, queries, responses, rewards):
        seen.extend(q.tolist() for q in queries)
        return step(trainer, queries, responses, rewards)

    monkeypatch.setattr(ppo, "ppo_step", spy)
    out = tmp_path / "run"
    argv = ["qwen_instruct_positive", *local_overrides("qwen_instruct_positive", tiny_dir), *SMALL,
            f"prompts.system={SYSTEM}", f"run.output_dir={out}"]
    assert main(argv) == 0
    recipe = apply_overrides(load_recipe("qwen_instruct_positive"), argv[1:])
    tokenizer = load_tokenizer("policy.model", recipe.policy.model)
    prompts = load_prompts(recipe.prompts, tokenizer, recipe.eval.num_prompts, 0)
    # each prompt is transformers' own rendering of the conversation, token for token
    assert [q.tolist() for q in prompts.heldout] == [chat_ids(tokenizer, t) for t in prompts.heldout_texts]
    train = {tuple(q.tolist()) for q in prompts.train}
    assert len(seen) == 16 and all(tuple(q) in train for q in seen)  # PPO saw exactly those
    opened = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert all(q[-len(opened):] == opened for q in seen)
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["before"]["policy"]["kl"]["mean"] == 0.0
    rows = sample.side_by_side(out, ["This movie"])  # a prompt typed by hand goes through the template too
    assert "assistant" in rows[0]["prompt"] and SYSTEM in rows[0]["prompt"]


def test_chat_template_settings_are_checked(tiny_dir):
    with pytest.raises(RecipeError, match="prompts.system.*set prompts.chat_template=true"):
        Prompts(dataset="x.jsonl", system="Be kind.")
    gpt2 = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    cfg = Prompts(dataset=str(tiny_dir / "imdb.jsonl"), chat_template=True)
    with pytest.raises(RecipeError, match="has no chat template .*prompts.chat_template=false"):
        load_prompts(cfg, gpt2, 16, 0)
    with pytest.raises(RecipeError, match="encoder-decoder"):
        load_prompts(cfg, gpt2, 16, 0, seq2seq=True)


def test_dpo_pairs_are_templated_and_end_at_the_end_of_the_turn(qwen, tmp_path):
    policy, tokenizer = qwen
    rows = [("This movie", " was wonderful.", " was dull.")] * 4
    cfg = DPO(dataset="unused", learning_rate=1e-3, epochs=1, batch_size=2, beta=0.1)
    chat = Prompts(dataset="unused", chat_template=True, system=SYSTEM)
    trainer = trl_backend.make_dpo_trainer(cfg, policy.pretrained_model, tokenizer, rows, rows[:2], 1, 0, tmp_path,
                                           chat=chat)
    first = trainer.train_dataset[0]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert first["prompt_ids"] == chat_ids(tokenizer, "This movie")
    assert first["chosen_ids"][-1] == im_end and first["rejected_ids"][-1] == im_end
    assert tokenizer.decode(first["chosen_ids"][:-1]) == " was wonderful."


def test_a_bart_policy_writes_its_forced_bos_first_and_nothing_of_its_own_generation_config(tiny_dir):
    tokenizer = load_tokenizer("policy.model", str(tiny_dir / "bart"))
    torch.manual_seed(0)
    policy = build_policy(Policy(model=str(tiny_dir / "bart")), CPU)
    own = policy.pretrained_model.get_base_model().generation_config
    assert own.forced_bos_token_id == 0 and own.num_beams == 4  # what BART's config asks for
    queries = [torch.tensor(tokenizer(f"the plot was {w}")["input_ids"]) for w in ("dull", "fine", "superb")]
    responses = generate(policy, tokenizer, queries, [6, 6, 6], Generation(6, 6), CPU)
    assert all(r[:2].tolist() == [2, 0] for r in responses)  # decoder start </s>, then the forced <s>
    assert all(2 < len(r) <= 8 for r in responses)  # six tokens sampled after it, at most
    # of the model's own config only the start and the forced BOS come over: no beams, no n-gram ban
    config = sampling_config(Generation(6, 6), 6, tokenizer, policy)
    assert config.forced_bos_token_id == 0 and config.decoder_start_token_id == 2
    assert config.num_beams in (None, 1) and not config.no_repeat_ngram_size and not config.forced_eos_token_id
    assert policy.pretrained_model.get_base_model().generation_config is own  # put back after sampling


def test_a_bart_run_trains_and_exports_as_an_encoder_decoder(tiny_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM
    from transformers.pipelines import SUPPORTED_TASKS

    from rlhf_recipes import export

    out = tmp_path / "run"
    assert main(["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL, "ppo.learning_rate=1e-2",
                 f"policy.model={tiny_dir / 'bart'}", "prompts.max_source_tokens=16", f"run.output_dir={out}"]) == 0
    assert export.main([str(out), str(tmp_path / "merged")]) == 0  # was: Unrecognized configuration class
    assert "AutoModelForSeq2SeqLM" in capsys.readouterr().out
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    adapter = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_dir / "bart"), out / "model").eval()
    ids, dec = torch.tensor([[0, 44, 105, 45, 2]]), torch.tensor([[2, 0, 44]])
    with torch.no_grad():
        ours, theirs = (m(input_ids=ids, decoder_input_ids=dec).logits for m in (merged, adapter))
        with adapter.disable_adapter():
            assert (adapter(input_ids=ids, decoder_input_ids=dec).logits - theirs).abs().max() > 1e-4  # it trained
    assert (ours - theirs).abs().max() < 1e-5
    config = merged.generation_config
    assert config.do_sample and config.forced_bos_token_id == 0 and config.decoder_start_token_id == 2
    assert config.num_beams in (None, 1) and not config.no_repeat_ngram_size  # the recipe's plain sampling
    tokenizer = load_tokenizer("x", str(tmp_path / "merged"))
    written = merged.generate(**tokenizer(["the plot was"], return_tensors="pt"), max_new_tokens=4)
    assert written[0, :2].tolist() == [2, 0]
    if "text2text-generation" in SUPPORTED_TASKS:  # transformers 4.57's seq2seq pipeline (5.x has none)
        from transformers import pipeline
        assert isinstance(pipeline("text2text-generation", model=str(tmp_path / "merged"))(
            "the plot was", max_new_tokens=4)[0]["generated_text"], str)


def test_a_prompt_cut_inside_a_character_is_templated_without_the_broken_character(qwen, tmp_path):
    """Byte-level BPE spreads an emoji or an accented letter the tokenizer never learned over several
    byte tokens; a query length that stops among them leaves half a character, which decodes to a
    replacement character. The chat template gets the text without it."""
    _, tokenizer = qwen
    rows = [{"text": f"{word} ☕ café naïve {i}"} for i, word in enumerate(["Great", "Dull", "Odd", "Fine"] * 10)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    cut = [tokenizer.decode(tokenizer(r["text"])["input_ids"][:n]) for r in rows for n in range(4, 8)]
    assert any(c.endswith("\ufffd") for c in cut)  # the fixture does cut inside a character
    cfg = Prompts(dataset=str(tmp_path / "p.jsonl"), query_min_tokens=4, query_max_tokens=7, chat_template=True)
    prompts = load_prompts(cfg, tokenizer, 4, 0)
    decoded = [tokenizer.decode(q) for q in prompts.train + prompts.heldout]
    assert any("☕" in d for d in decoded)  # whole characters come through
    assert not any("\ufffd" in d for d in decoded)


def test_grpo_samples_from_the_templated_prompt_tokens_and_stops_at_the_end_of_turn(qwen, tiny_dir, tmp_path):
    """TRL gets PPO's templated prompt ids as they are (no second tokenization, no second BOS), and
    its responses end at <|im_end|>, which the model's generation config names beside the EOS."""
    from rlhf_recipes import GRPO
    from rlhf_recipes.components.reward import FunctionReward
    from rlhf_recipes.config.sections import Reward

    policy, tokenizer = qwen
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg = Prompts(dataset=str(tiny_dir / "imdb.jsonl"), query_min_tokens=2, query_max_tokens=4, chat_template=True,
                  system=SYSTEM)
    prompts = load_prompts(cfg, tokenizer, 4, 0)
    reward_cfg = Reward(function=lambda texts: [float(len(t)) for t in texts], input="response")
    reward = trl_backend.RecipeReward(FunctionReward(reward_cfg), reward_cfg, tokenizer, prompts.train)
    grpo = GRPO(learning_rate=1e-3, batch_size=4, num_generations=4, beta=0.1, epsilon=0.2, temperature=1.0,
                loss_type="grpo", scale_rewards="group")
    trainer = trl_backend.make_critic_free_trainer(grpo, Generation(4, 12), policy.pretrained_model, tokenizer,
                                                   prompts.train, reward, 1, 0, tmp_path, 1)
    assert im_end in trainer.eos_token_ids
    lm_head = policy.pretrained_model.get_base_model().lm_head
    hook = lm_head.register_forward_hook(lambda m, i, logits: logits.index_add(
        -1, torch.tensor([im_end]), torch.full((*logits.shape[:-1], 1), 3.0)))  # the turn ends often
    try:
        torch.manual_seed(0)
        batch = trl_backend.sample_and_score(trainer, [0, 1, 2, 3], 0)
    finally:
        hook.remove()
    asked = [i for i in range(4) for _ in range(4)]  # each prompt num_generations times, in order
    for row, mask, i in zip(batch["prompt_ids"], batch["prompt_mask"], asked):
        assert row[mask.bool()].tolist() == prompts.train[i].tolist()  # PPO's prompt tokens, left-padded
    ended = 0
    for ids, mask in zip(batch["completion_ids"], batch["completion_mask"]):
        kept = ids[mask.bool()].tolist()
        if im_end in kept:
            ended += 1
            assert kept.index(im_end) == len(kept) - 1  # nothing after the end of the turn is trained on
    assert ended
    assert len(reward.texts[1]) == 16 and not any("<|im_end|>" in r for r in reward.texts[1])  # the reply alone
