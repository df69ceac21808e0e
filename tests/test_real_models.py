"""What tiny default fixtures never trigger and real models do: each test builds a fixture that
triggers it (a prompt cut inside a character, a pad id the config disagrees with, token types,
a RoBERTa without a length limit, BOS tokens, the PPO step switching modes inside it)."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from transformers import (AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel,
                          PreTrainedTokenizerFast)

from conftest import SMALL, local_overrides
from rlhf_recipes import Prompts, Reward, apply_overrides, load_recipe, ppo
from rlhf_recipes.runtime import startup
from rlhf_recipes.components.data import load_prompts
from rlhf_recipes.components.policy import build_policy, load_tokenizer
from rlhf_recipes.components.reward import build_reward, reward_inputs
from rlhf_recipes.components.rollout import decode_pairs
from rlhf_recipes.runtime.rundir import save_policy
from rlhf_recipes.run import main
from rlhf_recipes.runtime.rundir import read_metrics

CPU = torch.device("cpu")


def recipe_for(tiny_dir, tmp_path, *extra, name="imdb_positive"):
    return apply_overrides(load_recipe(name), [*local_overrides(name, tiny_dir), *SMALL, "ppo.learning_rate=1e-3",
                                               f"run.output_dir={tmp_path / 'run'}", *extra])


# ---------------------------------------------------------------------------- 1. gradient checkpointing
def test_gradient_checkpointing_checkpoints_the_gradient_pass_and_kl_starts_at_zero(tiny_dir, tmp_path):
    calls = {}
    for checkpointing in (False, True):
        recipe = recipe_for(tiny_dir, tmp_path, f"ppo.gradient_checkpointing={checkpointing}")
        torch.manual_seed(0)
        policy = build_policy(recipe.policy, CPU)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trainer = ppo.make_trainer(recipe, policy, load_tokenizer("p", recipe.policy.model))
        # transformers 5.25 renamed the switch, and the old name warns (compat.enable_checkpointing)
        assert not [w for w in seen if "checkpointing" in str(w.message)]
        blocks = policy.pretrained_model.base_model.model.transformer.h
        count = []
        for block in blocks:  # transformers routes a block through this only when it checkpoints
            run = block._gradient_checkpointing_func if checkpointing else None
            block._gradient_checkpointing_func = lambda *a, run=run, **k: count.append(1) or run(*a, **k)
        g = torch.Generator().manual_seed(0)
        queries = [torch.randint(1, 200, (5,), generator=g) for _ in range(8)]
        responses = [torch.randint(1, 200, (6,), generator=g) for _ in range(8)]
        stats = ppo.ppo_step(trainer, queries, responses, [float(i) for i in range(8)])
        assert stats["objective/kl"] == 0.0  # both scoring passes are the same function
        calls[checkpointing] = len(count)
    # 2 layers x 4 gradient passes (2 epochs x 2 minibatches); the no-grad scoring passes never checkpoint
    assert calls == {False: 0, True: 8}


# ---------------------------------------------------------------------------- 2. decoding
def test_a_prompt_cut_inside_a_character_never_reaches_the_response(tiny_dir):
    tok = load_tokenizer("p", str(tiny_dir / "gpt2"))
    ids = tok("I watched this film “twice”, and 😀 it")["input_ids"]
    cut = next(i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i]))  # inside the curly quote
    query, response = torch.tensor(ids[:cut]), torch.tensor(ids[cut:])
    prompts, responses = decode_pairs(tok, [query], [response])
    whole = tok.decode(ids)
    assert prompts[0] + responses[0] == whole
    assert responses[0].startswith("“") and "watched" not in responses[0]
    assert reward_inputs(Reward(function=len), prompts, responses) == [whole]


# ---------------------------------------------------------------------------- 3. and 21.1: reward inputs
@pytest.fixture(scope="module")
def gpt2_classifier(tiny_dir, tmp_path_factory):
    """A GPT-2 classifier whose config names pad id 7 while its tokenizer pads with 0, and a
    generic tokenizer that returns token_type_ids, as tokenizers built with `tokenizers` do."""
    path = tmp_path_factory.mktemp("gpt2-clf")
    base = AutoTokenizer.from_pretrained(tiny_dir / "gpt2")
    generic = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token=base.eos_token,
                                      pad_token=base.eos_token,  # 4.57's default; 5.x's leaves token types out
                                      model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    assert "token_type_ids" in generic("a")  # the fixture triggers what it must
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(generic), n_embd=32, n_layer=2, n_head=2, num_labels=2,
                                             pad_token_id=7, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                             label2id={"NEGATIVE": 0, "POSITIVE": 1})).save_pretrained(path)
    generic.save_pretrained(path)
    return path


def test_a_texts_reward_does_not_depend_on_its_batch(gpt2_classifier):
    reward = build_reward(Reward(model=str(gpt2_classifier), label="POSITIVE"), CPU)
    alone = reward(["the plot was dull"])
    beside = reward(["the plot was dull", "the acting was superb and the music was wonderful, " * 3])
    assert beside[0] == pytest.approx(alone[0], abs=1e-6)


def test_the_reward_model_is_fed_ids_and_mask_only(gpt2_classifier):
    reward = build_reward(Reward(model=str(gpt2_classifier), label="POSITIVE"), CPU)
    tok = AutoTokenizer.from_pretrained(gpt2_classifier)
    ids = tok(["the plot was dull"], return_tensors="pt")
    assert "token_type_ids" in ids  # what a plain load of the tokenizer returns
    plain = reward.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits[0, 1]
    typed = reward.model(**ids).logits[0, 1]
    assert float(typed) != pytest.approx(float(plain), abs=1e-4)  # token types would change the score
    assert reward(["the plot was dull"])[0] == pytest.approx(float(plain), abs=1e-6)


def test_a_saved_policy_tokenizer_returns_no_token_types(gpt2_classifier, tiny_dir, tmp_path):
    """model.generate(**tokenizer(text)) on the saved model must see what PPO trained on."""
    policy = build_policy(recipe_for(tiny_dir, tmp_path).policy, CPU)
    save_policy(policy, load_tokenizer("p", str(gpt2_classifier)), tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    inputs = tok("the plot was", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    lm = GPT2LMHeadModel.from_pretrained(tiny_dir / "gpt2").eval()
    torch.manual_seed(3)
    full = lm.generate(**inputs, do_sample=True, max_new_tokens=8, pad_token_id=0)
    torch.manual_seed(3)
    ids_only = lm.generate(input_ids=inputs["input_ids"], do_sample=True, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(full, ids_only)


# ---------------------------------------------------------------------------- 4. adaptive KL's reach
def test_kl_coef_reach_bounds_the_controller_and_every_shipped_recipe_can_act():
    from rlhf_recipes.ppo.maths import AdaptiveKL

    ppo = load_recipe("imdb_positive").ppo
    ctl = AdaptiveKL(ppo.init_kl_coef, ppo.target, ppo.horizon)
    for _ in range(50):
        ctl.update(ppo.target * 10, ppo.batch_size)  # far above target: the largest step up
    # the controller steps in float32, as TRL 0.11.4's did on its float32 statistic
    assert ctl.value / ppo.init_kl_coef == pytest.approx(ppo.kl_coef_reach(50), rel=1e-5)
    assert dataclasses.replace(ppo, adap_kl_ctrl=False).kl_coef_reach(50) == 1.0
    from rlhf_recipes import shipped_recipes
    for name in shipped_recipes():
        recipe = load_recipe(name)
        if recipe.ppo is not None:  # DPO recipes have no KL controller
            assert recipe.ppo.kl_coef_reach(recipe.run.steps) >= startup.KL_REACH_WARNING, name


def test_a_controller_that_cannot_act_is_warned_about(tiny_dir, tmp_path, capsys):
    assert main(["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL, "ppo.horizon=1e6",
                 "generation.top_k=50", f"run.output_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "by at most x1 over 2 steps" in out and "cannot steer the KL" in out
    assert "top_k=50" in out and "biased" in out  # non-plain sampling is said once
    assert "top_k=50" in (tmp_path / "run" / "report.md").read_text()


# ---------------------------------------------------------------------------- 5. dtypes
def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch, tiny_dir, tmp_path):
    from rlhf_recipes import RecipeError

    # below torch.cuda.is_bf16_supported: a T4 (compute capability 7.5) that emulates bf16, which
    # the function's default (including_emulation=True) counts as support
    props = type("Props", (), {"major": 7, "minor": 5})()
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert torch.cuda.is_bf16_supported()  # emulated: what the guard used to accept
    recipe = recipe_for(tiny_dir, tmp_path, "policy.dtype=bfloat16")
    with pytest.raises(RecipeError, match="Tesla T4 has none; use policy.dtype=float32"):
        startup.check_device(recipe, torch.device("cuda"))
    startup.check_device(recipe, CPU)  # a CPU computes in bf16, slowly


# ---------------------------------------------------------------------------- 6. classifier length
@pytest.fixture(scope="module")
def unlimited_roberta(tiny_dir, tmp_path_factory):
    """The tiny RoBERTa with its tokenizer's model_max_length removed, as some Hub models ship."""
    path = tmp_path_factory.mktemp("roberta")
    tok = AutoTokenizer.from_pretrained(tiny_dir / "roberta-hate")
    tok.model_max_length = int(1e30)
    tok.save_pretrained(path)
    from transformers import AutoModelForSequenceClassification
    AutoModelForSequenceClassification.from_pretrained(tiny_dir / "roberta-hate").save_pretrained(path)
    return path


def test_a_long_text_fits_a_roberta_and_loses_its_beginning_not_its_response(unlimited_roberta):
    reward = build_reward(Reward(model=str(unlimited_roberta), label="nothate", input="prompt+response"), CPU)
    assert reward.max_length == 64  # 66 positions, numbered from padding_idx + 1
    tail = " and then the ending was brilliant" * 12  # longer than 64 tokens
    a, b = reward(["the plot was dull, " * 30 + tail, "a wonderful cast, " * 30 + tail])
    assert a == pytest.approx(b, abs=1e-6)  # only the last 64 tokens are judged: the same in both
    right = build_reward(Reward(model=str(unlimited_roberta), label="nothate", input="response"), CPU)
    assert right.tokenizer.truncation_side == "right"


# ---------------------------------------------------------------------------- 7. held-out prompts
def test_held_out_prompts_are_never_training_prompts(tiny_dir, tmp_path):
    data = tmp_path / "short.jsonl"
    data.write_text("".join(f'{{"text": "This movie {w}"}}\n' for w in ["is", "was", "is", "seems"] * 30))
    tok = load_tokenizer("p", str(tiny_dir / "gpt2"))
    prompts = load_prompts(Prompts(dataset=str(data), query_min_tokens=2, query_max_tokens=3), tok, 2, seed=0)
    train, held = {tuple(q.tolist()) for q in prompts.train}, {tuple(q.tolist()) for q in prompts.heldout}
    assert not train & held and len(held) == 2
    assert prompts.duplicates == 120 - len(train) - len(held) > 100


# ---------------------------------------------------------------------------- 9. BOS and SentencePiece spacing
def test_bos_is_added_once_and_not_counted_and_texts_decode_right(tiny_dir):
    tok = load_tokenizer("p", str(tiny_dir / "llama"))
    data_dir = tiny_dir / "imdb.jsonl"
    prompts = load_prompts(Prompts(dataset=str(data_dir), query_min_tokens=3, query_max_tokens=3), tok, 4, seed=0)
    for q in prompts.train[:20]:
        assert len(q) == 4 and q[0] == tok.bos_token_id and tok.bos_token_id not in q[1:].tolist()
    query = prompts.train[0]
    response = torch.tensor(tok(" the plot was dull", add_special_tokens=False)["input_ids"])
    texts, responses = decode_pairs(tok, [query], [response])
    assert responses[0] == " the plot was dull"  # its leading space kept, no BOS text
    assert texts[0] + responses[0] == tok.decode(torch.cat([query, response]), skip_special_tokens=True)


@pytest.mark.slow
def test_a_llama_policy_trains_two_steps_with_one_bos_per_query(tiny_dir, tmp_path, monkeypatch):
    seen = []
    step = ppo.ppo_step

    def spy(trainer, queries, responses, rewards):
        seen.extend(torch.cat([q, r]).tolist() for q, r in zip(queries, responses))
        return step(trainer, queries, responses, rewards)

    monkeypatch.setattr(ppo, "ppo_step", spy)
    out = tmp_path / "run"
    assert main(["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL,
                 f"policy.model={tiny_dir / 'llama'}", "ppo.learning_rate=1e-3", f"run.output_dir={out}"]) == 0
    bos = load_tokenizer("p", str(tiny_dir / "llama")).bos_token_id
    assert seen and all(s[0] == bos and s.count(bos) == 1 for s in seen)
    metrics = read_metrics(out)
    assert abs(metrics[0]["objective/kl"]) < 1e-6 < abs(metrics[1]["objective/kl"])
    assert np.isfinite(metrics[1]["ppo/loss/total"])


# ---------------------------------------------------------------------------- 10. int8 outliers and packing
def llm_int8(module: torch.nn.Linear, threshold: float = 6.0):
    """`module`'s forward as bitsandbytes' LLM.int8 computes it on a GPU: the input's columns with a
    value above `threshold` anywhere in the batch in full precision, the rest in int8 (rows of the
    input and of the weight scaled to 127). bitsandbytes' CPU kernels skip the decomposition, so
    this stands in for the GPU's here; which columns count depends on the whole batch."""
    def forward(x):
        flat, w = x.reshape(-1, x.shape[-1]), module.weight
        outlier = (flat.abs() > threshold).any(0)
        xs, ws = flat[:, ~outlier], w[:, ~outlier]
        sx = xs.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        sw = ws.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        y = flat[:, outlier] @ w[:, outlier].T + (torch.round(xs / sx) @ torch.round(ws / sw).T) * sx * sw.T
        return (y if module.bias is None else y + module.bias).reshape(*x.shape[:-1], -1)
    module.forward = forward


@pytest.fixture(scope="module")
def outlier_llama(tiny_dir, tmp_path_factory):
    """A 64-wide Llama with an outlier feature: embedding column 3 at 40 for tokens 7 to 11 (after
    RMSNorm about 8, above LLM.int8's threshold of 6; a 32-wide model's norm would cap it at 5.7)."""
    from rlhf_recipes.tiny import causal_lm

    tokenizer = load_tokenizer("p", str(tiny_dir / "llama"))
    torch.manual_seed(0)
    model = causal_lm("llama", tokenizer, width=64)
    with torch.no_grad():
        model.model.embed_tokens.weight[7:12, 3] = 40.0
    out = tmp_path_factory.mktemp("outlier") / "llama"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_int8_outliers_leave_packing_on_with_the_kl_exactly_zero(outlier_llama):
    from rlhf_recipes import PPO, Policy
    from rlhf_recipes.ppo.probes import packing_problem

    torch.manual_seed(0)
    policy = build_policy(Policy(model=str(outlier_llama)), CPU)
    base = policy.pretrained_model.get_base_model()
    for name, module in base.named_modules():
        if name.endswith("base_layer") or (isinstance(module, torch.nn.Linear) and "lora" not in name
                                           and name.split(".")[-1] in ("gate_proj", "up_proj", "down_proj")):
            llm_int8(module)
    ids = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33]])
    with torch.no_grad():
        alone = base(input_ids=ids).logits[0]
        beside = base(input_ids=torch.stack([ids[0], torch.tensor([7, 8, 9, 10])])).logits[0]
    assert not torch.equal(alone, beside)  # the fixture does what int8 outliers do: a row moves with its neighbour
    assert (alone - beside).abs().max() < 0.02 * alone.abs().max()  # slightly
    assert packing_problem(policy) is None  # the old probe turned packing off here, blaming attention
    cfg = PPO(learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=1, adap_kl_ctrl=True, init_kl_coef=0.2,
              target=6.0, horizon=1000.0, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    trainer = ppo.build_trainer(cfg, policy, load_tokenizer("p", str(outlier_llama)))
    assert trainer.pack_rows and trainer.unpacked is None
    queries = [torch.tensor(q) for q in ([1, 7, 8], [1, 20, 21, 22], [1, 9, 30], [1, 40])]
    responses = [torch.tensor(r) for r in ([11, 12, 13], [50, 51], [10, 60, 61, 62], [70, 71, 72])]
    stats = ppo.ppo_step(trainer, queries, responses, [1.0, -1.0, 0.5, 0.0])
    assert stats["objective/kl"] == 0.0  # policy and reference saw the same packed rows the same way


def test_a_model_whose_packed_rows_see_each_other_is_refused_packing_for_that_reason(tiny_dir, monkeypatch):
    from rlhf_recipes import Policy
    from rlhf_recipes.components import token_scores
    from rlhf_recipes.ppo import probes

    def leaky(model, inputs, lengths, capacity):  # no position ids: transformers cannot tell the sequences apart
        ids, _, index = token_scores.pack(inputs["input_ids"], inputs["attention_mask"], lengths, capacity)
        return model(input_ids=ids, use_cache=False, logits_to_keep=1), index

    torch.manual_seed(0)
    policy = build_policy(Policy(model=str(tiny_dir / "gpt2")), CPU)
    assert probes.packing_problem(policy) is None
    monkeypatch.setattr(probes, "packed_forward", leaky)
    assert probes.packing_problem(policy) == probes.LEAK
