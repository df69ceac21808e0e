"""Components on tiny local models: reward by label name, policy and reference, prompts."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline

from rlhf_recipes import Policy, Prompts, RecipeError, Reward
from rlhf_recipes.components.data import load_prompts
from rlhf_recipes.components.policy import build_policy, load_tokenizer
from rlhf_recipes.components.reward import build_reward
from rlhf_recipes.runtime.rundir import VALUE_HEAD, save_policy

CPU = torch.device("cpu")
TEXTS = ["the plot was dull", "a wonderful, moving film", "the acting was superb", "boring and tedious",
         "I expected little, yet the ending was brilliant " * 20]  # the last one is longer than the classifier


@pytest.fixture(scope="module")
def classifiers(tiny_dir, tmp_path_factory):
    """The tiny DistilBERT with a head whose two logits clearly differ, and the same function with
    its labels stored in the other order."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir / "distilbert-imdb")
    paths = []
    for swapped in (False, True):
        with torch.no_grad():
            model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=torch.Generator().manual_seed(0)))
            model.classifier.bias.copy_(torch.tensor([-0.5, 0.5]))  # POSITIVE on top: sorted, it comes first
            if swapped:
                model.config.id2label, model.config.label2id = {0: "POSITIVE", 1: "NEGATIVE"}, {"POSITIVE": 0, "NEGATIVE": 1}
                model.classifier.weight.copy_(model.classifier.weight.flip(0))
                model.classifier.bias.copy_(model.classifier.bias.flip(0))
        path = tmp_path_factory.mktemp("swapped" if swapped else "classifier")
        model.save_pretrained(path)
        load_tokenizer("t", str(tiny_dir / "distilbert-imdb")).save_pretrained(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_reward_reads_its_label_by_name_whatever_the_order(classifiers, score):
    rewards, positional = [], []
    for path in classifiers:
        # input="response": truncated on the right, as the pipeline does
        rewards.append(build_reward(Reward(model=str(path), label="POSITIVE", score=score, batch_size=2,
                                           input="response"), CPU)(TEXTS))
        # the transformers pipeline sorts labels by score; pick from it by name, and by position
        pipe = pipeline("text-classification", model=str(path), top_k=None, truncation=True,
                        function_to_apply="none" if score == "logit" else "softmax")
        outputs = pipe(TEXTS)
        assert rewards[-1] == pytest.approx([next(d["score"] for d in o if d["label"] == "POSITIVE")
                                             for o in outputs], abs=1e-5)
        positional.append([o[1]["score"] for o in outputs])
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6)  # same function, labels stored in another order
    assert positional[0] != pytest.approx(rewards[0], abs=1e-6) or positional[1] != pytest.approx(rewards[1], abs=1e-6)


def test_reward_scale_flips_sign_and_unknown_label_lists_valid_ones(tiny_dir):
    base = Reward(model=str(tiny_dir / "roberta-hate"), label="nothate")
    plain, flipped = build_reward(base, CPU), build_reward(Reward(model=base.model, label="nothate", scale=-2.0), CPU)
    assert flipped(TEXTS) == pytest.approx([-2 * x for x in plain(TEXTS)])
    with pytest.raises(RecipeError, match="'toxic' is not a label of the classifier; valid labels: nothate, hate"):
        build_reward(Reward(model=base.model, label="toxic"), CPU)


def test_function_reward_is_checked():
    assert build_reward(Reward(function=lambda texts: [len(t) for t in texts]), CPU)(["ab", "c"]) == [2.0, 1.0]
    assert build_reward(Reward(function="builtins:len", scale=1.0), CPU) is not None
    with pytest.raises(RecipeError, match="returned 1 rewards for 2 texts"):
        build_reward(Reward(function=lambda texts: [1.0]), CPU)(["a", "b"])
    with pytest.raises(RecipeError, match="cannot import 'nope.nothing:fn'"):
        build_reward(Reward(function="nope.nothing:fn"), CPU)


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_policy_reference_is_the_base_with_adapters_off(tiny_dir, quantization):
    policy = build_policy(Policy(model=str(tiny_dir / "gpt2"), quantization=quantization), CPU)
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "v_head" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    base = policy.pretrained_model
    with torch.no_grad():
        with base.disable_adapter():
            ref = base(input_ids=ids).logits
        assert torch.equal(base(input_ids=ids).logits, ref)  # fresh LoRA adds exactly zero: KL is 0
        for p in trainable.values():
            p.add_(0.05)  # stand-in for an update
        assert not torch.allclose(base(input_ids=ids).logits, ref)
        with base.disable_adapter():
            assert torch.equal(base(input_ids=ids).logits, ref)  # the reference never moves
    if quantization == "none":
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir / "gpt2").eval()
        assert torch.allclose(plain(input_ids=ids).logits, ref, atol=1e-5)


def test_saved_adapter_loads_with_peft(tiny_dir, tmp_path):
    policy = build_policy(Policy(model=str(tiny_dir / "gpt2")), CPU)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    tok = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    save_policy(policy, tok, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / VALUE_HEAD).exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir / "gpt2"), tmp_path).eval()
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, policy.pretrained_model(input_ids=ids).logits, atol=1e-5)


def test_policy_errors_name_the_field(tiny_dir):
    with pytest.raises(RecipeError, match="policy.lora_target_modules .* its linear modules are: .*c_attn"):
        build_policy(Policy(model=str(tiny_dir / "gpt2"), lora_target_modules=("q_proj",)), CPU)
    with pytest.raises(RecipeError, match="policy.model: local path '/no/such/model' does not exist"):
        build_policy(Policy(model="/no/such/model"), CPU)
    with pytest.raises(RecipeError, match="policy.model: cannot load 'nobody/nothing'"):
        build_policy(Policy(model="nobody/nothing"), CPU)


def test_gpt2_tokenizer_gets_a_pad_token(tiny_dir):
    tok = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    assert tok.pad_token == tok.eos_token and tok.pad_token_id is not None


def test_ppo_scores_each_token_as_it_was_sampled(tiny_dir):
    """In a batch of ragged queries, the log-probs PPO trains on equal the unpadded ones."""
    from rlhf_recipes import apply_overrides, load_recipe, ppo
    from rlhf_recipes.ppo.scoring import score

    recipe = apply_overrides(load_recipe("imdb_positive"), [
        f"policy.model={tiny_dir / 'gpt2'}", "ppo.batch_size=2", "ppo.mini_batch_size=2", "run.output_dir=x"])
    tok = load_tokenizer("policy.model", recipe.policy.model)
    policy = build_policy(recipe.policy, CPU)
    trainer = ppo.make_trainer(recipe, policy, tok)
    queries = [torch.tensor([5, 17, 42, 8, 99, 3]), torch.tensor([7, 9])]
    responses = [torch.tensor([11, 12, 13]), torch.tensor([21, 22, 23])]
    with torch.no_grad():
        logprobs, _, _, masks = score(policy, trainer.batch(queries, responses), trainer.passes)
    for i, (q, r) in enumerate(zip(queries, responses)):
        seq = torch.cat([q, r])
        with torch.no_grad():
            logits = policy.pretrained_model(input_ids=seq[None]).logits[0, :-1]
        direct = torch.log_softmax(logits, -1).gather(-1, seq[1:, None])[-len(r):, 0]
        assert torch.allclose(logprobs[i][masks[i].bool()], direct, atol=1e-5)


def test_prompts_hold_out_filter_and_cut(tiny_dir):
    tok = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    cfg = Prompts(dataset=str(tiny_dir / "toxicity.jsonl"), text_column="prompt.text",
                  filter=lambda row: row["prompt"]["toxicity"] > 0.5, query_min_tokens=2, query_max_tokens=5)
    rows = [json.loads(line) for line in open(tiny_dir / "toxicity.jsonl")]
    toxic = sum(r["prompt"]["toxicity"] > 0.5 for r in rows)
    a, b = load_prompts(cfg, tok, heldout=20, seed=0), load_prompts(cfg, tok, heldout=20, seed=0)
    assert len(a.heldout) == 20 and len(a.train) + 20 + a.duplicates == toxic and a.duplicates > 0
    assert all(2 <= len(q) <= 5 for q in a.train + a.heldout)
    assert [q.tolist() for q in a.train] == [q.tolist() for q in b.train]  # seeded
    with pytest.raises(RecipeError, match="prompts.text_column 'review' is not in .* its columns: prompt"):
        load_prompts(Prompts(dataset=cfg.dataset, text_column="review"), tok, heldout=1, seed=0)
    with pytest.raises(RecipeError, match="0 usable texts after filtering"):
        load_prompts(Prompts(dataset=cfg.dataset, text_column="prompt.text", filter=lambda r: False), tok, 1, 0)


def test_heldout_prompts_are_never_trained_on(tiny_dir, tmp_path):
    tok = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    path = tmp_path / "numbered.csv"  # digits are single tokens here: the 4-digit id is a unique 4-token prefix
    path.write_text("text\n" + "".join(f"{i:04d} the plot was dull\n" for i in range(300)))
    prompts = load_prompts(Prompts(dataset=str(path), query_min_tokens=4, query_max_tokens=6), tok, heldout=50, seed=1)
    ids = lambda qs: {tuple(q[:4].tolist()) for q in qs}
    assert len(ids(prompts.heldout)) == 50 and len(ids(prompts.train)) == 250
    assert not ids(prompts.heldout) & ids(prompts.train)


def test_sampling_ignores_model_defaults_and_training_mode(tiny_dir):
    """Regression: the model's generation_config must not leak in, and generation must run in
    eval mode (the PPO step leaves the model training; with gradient checkpointing that drops the cache)."""
    from rlhf_recipes import Generation
    from rlhf_recipes.components.rollout import generate

    tok = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    policy = build_policy(Policy(model=str(tiny_dir / "gpt2")), CPU)
    queries = [torch.tensor([5, 17, 42]), torch.tensor([7, 9]), torch.tensor([30, 31, 32, 33])]
    greedy = Generation(response_min_tokens=6, response_max_tokens=6, top_k=1)
    policy.eval()
    expected = [r.tolist() for r in generate(policy, tok, queries, [6] * 3, greedy, CPU)]
    policy.pretrained_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    assert [r.tolist() for r in generate(policy, tok, queries, [6] * 3, greedy, CPU)] == expected
    assert policy.training  # restored for the PPO step
    policy.pretrained_model.generation_config.suppress_tokens = [t for t in range(len(tok)) if t != 7]
    torch.manual_seed(0)
    sampled = generate(policy, tok, queries * 4, [8] * 12, Generation(response_min_tokens=8, response_max_tokens=8), CPU)
    assert {t for r in sampled for t in r.tolist()} != {7}


def test_compiled_sampling_samples_as_the_plain_model_does_as_the_adapters_move(tiny_dir):
    """generation.compile: the static cache and the compiled decoding step sample for a seed what
    plain decoding samples (but for a rare token whose logits differ in their last bits), and the
    compiled step reads the adapters as they are after an update, not as they were compiled."""
    import dataclasses

    from rlhf_recipes import Generation
    from rlhf_recipes.components.rollout import generate, pad_batch

    tok = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    torch.manual_seed(0)
    policy = build_policy(Policy(model=str(tiny_dir / "gpt2")), CPU)
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(1, 200, (int(k),), generator=g) for k in torch.randint(2, 9, (16,), generator=g)]
    lengths = [int(k) for k in torch.randint(4, 9, (16,), generator=g)]
    gen = Generation(response_min_tokens=4, response_max_tokens=8)

    def sample(compile):
        torch.manual_seed(5)
        return generate(policy, tok, queries, lengths, dataclasses.replace(gen, compile=compile), CPU)

    def agree(a, b):
        return sum(torch.equal(x, y) for x, y in zip(a, b))

    before = sample(True)
    base = policy.pretrained_model.get_base_model()
    assert hasattr(base, "_compiled_call")  # compiled, on a CPU too
    assert not hasattr(base, "_cache")  # transformers 4.57's static cache is not kept through the update
    assert all(len(r) <= n for r, n in zip(before, lengths))
    assert agree(before, sample(False)) >= 14
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1.0)
    after = sample(True)
    assert agree(after, sample(False)) >= 14 and agree(after, before) <= 10
    assert pad_batch(queries, 0, multiple=8)[0].shape == (16, 8)  # prompts of 2-8 tokens: one width


def test_compiled_sampling_is_off_for_a_bitsandbytes_policy_and_the_run_says_so(tiny_dir):
    """transformers cannot compile bitsandbytes' layers: such a policy samples exactly as without
    generation.compile (no static cache, no padding to 8, no running to the longest length)."""
    import dataclasses

    from rlhf_recipes import Generation, apply_overrides, load_recipe
    from rlhf_recipes.components.rollout import compiles, generate
    from rlhf_recipes.runtime.startup import notices

    tok = load_tokenizer("policy.model", str(tiny_dir / "gpt2"))
    policy = build_policy(Policy(model=str(tiny_dir / "gpt2"), quantization="8bit"), CPU)
    assert not compiles(policy) and compiles(build_policy(Policy(model=str(tiny_dir / "gpt2")), CPU))
    queries, lengths = [torch.tensor([5, 17, 42]), torch.tensor([7, 9])], [5, 3]
    gen = Generation(response_min_tokens=3, response_max_tokens=5)
    samples = []
    for compile in (False, True):
        torch.manual_seed(3)
        samples.append([r.tolist() for r in generate(policy, tok, queries, lengths,
                                                     dataclasses.replace(gen, compile=compile), CPU)])
    assert samples[0] == samples[1] and not hasattr(policy.pretrained_model.get_base_model(), "_compiled_call")
    recipe = apply_overrides(load_recipe("imdb_positive"), ["generation.compile=true", "policy.quantization=8bit"])
    assert any("generation.compile is off" in text for _, text in notices(recipe, 1, CPU))
    assert not any("generation.compile" in text for _, text in notices(
        apply_overrides(recipe, ["policy.quantization=none"]), 1, CPU))


def test_max_grad_norm_clips_every_minibatch(tiny_dir):
    from rlhf_recipes import apply_overrides, load_recipe, ppo

    recipe = apply_overrides(load_recipe("imdb_positive"), [f"policy.model={tiny_dir / 'gpt2'}", "ppo.max_grad_norm=1.0",
                                                            "run.output_dir=x"])
    policy = build_policy(recipe.policy, CPU)
    trainer = ppo.make_trainer(recipe, policy, load_tokenizer("policy.model", recipe.policy.model))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(2):  # TRL 0.11.4's one-shot filter() was empty the second time
        assert len(list(trainer.model_params)) == len(trainable) > 0


def test_texts_with_markup_print_as_text(capsys):
    from rlhf_recipes.reporting.console import sample_table

    sample_table("t", ["a [/spoiler] prompt"], ["[b]bold[/b] reply"], [1.0], rows=1)
    printed = capsys.readouterr().out
    assert "[/spoiler]" in printed and "[b]bold[/b]" in printed


def test_decode_pairs_keeps_the_space_between_prompt_and_response():
    """With a SentencePiece-style (Metaspace) tokenizer, decoding the response alone drops its
    leading space; the pair must still read as the decoded whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf_recipes.components.rollout import decode_pairs

    words = ["<unk>", "▁The", "▁plot", "▁was", "▁dull"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    q, r = torch.tensor([1, 2, 3]), torch.tensor([4])
    assert tok.decode(q) + tok.decode(r) == "The plot wasdull"  # the failure decode_pairs exists to avoid
    prompts, responses = decode_pairs(tok, [q], [r])
    assert prompts[0] + responses[0] == "The plot was dull"


def test_threads_follow_the_usable_cpus_and_a_busy_machine_is_named(monkeypatch):
    from rlhf_recipes.config.sections import Run
    from rlhf_recipes.runtime import startup

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(startup.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(startup.os, "getloadavg", lambda: (1.2, 1.0, 1.0))  # this process, starting up
    try:
        assert startup.set_threads(Run(output_dir="x")) is None and torch.get_num_threads() == 4
        assert startup.set_threads(Run(output_dir="x"), local_processes=2) is None and torch.get_num_threads() == 2
        monkeypatch.setattr(startup.os, "getloadavg", lambda: (3.1, 3.0, 3.0))  # and two CPUs' worth of other work
        said = startup.set_threads(Run(output_dir="x"))
        assert "already busy" in said and "about 2.1 of its 4 usable CPUs" in said and "run.threads=2" in said
        assert startup.set_threads(Run(output_dir="x", threads=2)) is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
