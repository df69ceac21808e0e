"""Encoder-decoder policies on a tiny random T5 of FLAN-T5's kind (gated-gelu, decoder start = pad
= 0, eos = 1, a tokenizer that appends </s>): the rollout keeps the start token and two generated
tokens, the reference is the adapters-off model, templates are checked, and the seq2seq
quickstart learns."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM

from conftest import SHORT_QUICKSTART, SMALL, local_overrides
from rlhf_recipes import Generation, Policy, Prompts, RecipeError, apply_overrides, load_recipe, ppo
from rlhf_recipes.components.data import load_prompts
from rlhf_recipes.evaluation import score_responses
from rlhf_recipes.ppo.scoring import score
from rlhf_recipes.components.policy import build_policy, load_tokenizer
from rlhf_recipes.reporting.report import reward_gain
from rlhf_recipes.components.rollout import decode_pairs, generate
from rlhf_recipes.run import main
from rlhf_recipes.runtime.rundir import read_metrics

CPU = torch.device("cpu")


def flan_args(tiny_dir, out, *extra):
    return ["flan_t5_detox", *local_overrides("flan_t5_detox", tiny_dir), *SMALL, "ppo.learning_rate=1e-2",
            "prompts.filter=none", f"run.output_dir={out}", *extra]


def test_responses_keep_the_start_token_and_are_cut_from_the_right(tiny_dir, monkeypatch):
    tok = load_tokenizer("p", str(tiny_dir / "t5"))
    policy = build_policy(Policy(model=str(tiny_dir / "t5")), CPU)
    prompts = load_prompts(Prompts(dataset=str(tiny_dir / "dialogsum.jsonl"), template="Summarize: {dialogue}",
                                   max_source_tokens=40), tok, 4, seed=0, seq2seq=True)
    queries = prompts.train[:24]
    assert all(q[-1] == tok.eos_token_id and len(q) <= 40 for q in queries)  # whole, cut, </s> kept
    raw = []
    original = policy.generate
    monkeypatch.setattr(policy, "generate", lambda **kw: raw.append(original(**kw)) or raw[-1])
    # an EOS-heavy model: some responses are start + </s>, which TRL 0.11.4 alone could not score
    def eos_heavy(module, inputs, logits):  # every other prompt's response ends at once
        logits[::2, ..., tok.eos_token_id] += 1e4
        return logits

    policy.pretrained_model.base_model.model.lm_head.register_forward_hook(eos_heavy)
    torch.manual_seed(0)
    lengths = [2, 3, 5, 8] * 6
    responses = generate(policy, tok, queries, lengths, Generation(response_min_tokens=2, response_max_tokens=8), CPU)
    for row, response, n in zip(raw[0], responses, lengths):
        assert response[0] == 0 and torch.equal(response, row[:len(response)])  # start kept, cut on the right
        assert 2 <= len(response) <= n + 1  # start + 1 to n generated tokens
    assert any(len(r) == 2 for r in responses)  # the fixture does produce one-token responses
    prompt_texts, texts = decode_pairs(tok, queries, responses, encoder_decoder=True)
    assert all(t == tok.decode(r, skip_special_tokens=True).strip() for t, r in zip(texts, responses))
    assert all(p.endswith(" ") and "Summarize" in p for p in prompt_texts)


def test_kl_is_zero_with_adapters_at_zero_and_not_after_they_move(tiny_dir):
    tok = load_tokenizer("p", str(tiny_dir / "t5"))
    policy = build_policy(Policy(model=str(tiny_dir / "t5")), CPU)
    queries = [torch.tensor(tok("the plot was dull")["input_ids"]), torch.tensor(tok("a fine cast")["input_ids"])]
    responses = [torch.tensor([0, 44, 105, 45]), torch.tensor([0, 188, 1])]
    kl, ent, ref_ent = score_responses(policy, queries, responses, tok.pad_token_id, CPU, batch_size=2)
    assert kl.tolist() == [0.0, 0.0] and ent.tolist() == ref_ent.tolist()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    kl, _, _ = score_responses(policy, queries, responses, tok.pad_token_id, CPU, batch_size=2)
    alone = [score_responses(policy, [q], [r], tok.pad_token_id, CPU, batch_size=1)[0][0]
             for q, r in zip(queries, responses)]
    assert all(abs(k) > 1e-4 for k in kl) and kl.tolist() == pytest.approx(alone, rel=1e-4)  # padding changes nothing (float noise aside)


def test_templates_and_architecture_limits_are_checked(tiny_dir, tmp_path):
    data = str(tiny_dir / "dialogsum.jsonl")
    tok = load_tokenizer("p", str(tiny_dir / "t5"))
    with pytest.raises(RecipeError, match=r"prompts.template names column \{dialog\}, which is not in .* its columns: "
                                          r"id, dialogue, summary, topic"):
        load_prompts(Prompts(dataset=data, template="{dialog}"), tok, 4, 0, seq2seq=True)
    with pytest.raises(RecipeError, match="prompts.template is not a valid format string"):
        Prompts(dataset=data, template="Summary: {dialogue")
    with pytest.raises(RecipeError, match="prompts.template must name dataset columns"):
        Prompts(dataset=data, template="{0}")
    with pytest.raises(RecipeError, match="float16.*use policy.dtype=bfloat16 or float32"):
        build_policy(Policy(model=str(tiny_dir / "t5"), dtype="float16", quantization="8bit"), CPU)


def test_ppo_scores_every_generated_token_the_first_and_a_lone_eos_included(tiny_dir, tmp_path):
    recipe = apply_overrides(load_recipe("flan_t5_detox"), flan_args(tiny_dir, tmp_path)[1:])
    policy = build_policy(recipe.policy, CPU)
    tok = load_tokenizer("p", recipe.policy.model)
    trainer = ppo.make_trainer(recipe, policy, tok)
    queries = [torch.tensor(tok("the plot was dull")["input_ids"])] * 8
    responses = [torch.tensor([0, 1])] * 4 + [torch.tensor([0, 44, 105, 1])] * 4  # start + eos, and 3 tokens
    with torch.no_grad():
        _, _, _, masks = score(policy, trainer.batch(queries, responses), trainer.passes)
    assert masks.sum(-1).tolist() == [1] * 4 + [3] * 4  # every generated token, the first one too
    stats = ppo.ppo_step(trainer, queries, responses, [1.0] * 8)  # TRL 0.11.4 crashed on start + eos
    assert stats["objective/kl"] == 0.0 and stats["ppo/loss/total"] == stats["ppo/loss/total"]


@pytest.mark.slow
def test_a_seq2seq_run_trains_quietly_and_its_adapter_loads(tiny_dir, tmp_path, monkeypatch):
    seen = []
    step = ppo.ppo_step

    def spy(trainer, queries, responses, rewards):
        seen.extend(responses)
        return step(trainer, queries, responses, rewards)

    monkeypatch.setattr(ppo, "ppo_step", spy)
    out = tmp_path / "run"
    assert main(flan_args(tiny_dir, out)) == 0
    assert seen and all(r[0] == 0 and len(r) >= 2 for r in seen)  # the start token, then what was generated
    metrics = read_metrics(out)
    assert metrics[0]["objective/kl"] == 0.0 and abs(metrics[1]["objective/kl"]) > 1e-6
    sft = json.loads((out / "stages" / "sft" / "stage.json").read_text())
    assert sft["heldout_loss_after"] < sft["heldout_loss_before"]  # the supervised summariser learned
    base = AutoModelForSeq2SeqLM.from_pretrained(out / "stages" / "sft")  # the reference: the SFT model
    tuned = PeftModel.from_pretrained(base, out / "model").eval()
    ids, dec = torch.tensor([[44, 105, 45, 1]]), torch.tensor([[0, 44, 105]])
    with torch.no_grad():
        moved = tuned(input_ids=ids, decoder_input_ids=dec).logits
        with tuned.disable_adapter():
            assert not torch.allclose(moved, tuned(input_ids=ids, decoder_input_ids=dec).logits)
    assert main(["flan_t5_detox", f"run.output_dir={out}", "--dry-run"]) == 0
    exported_like_the_adapter(out, tuned, tmp_path / "merged", ids, dec)


def exported_like_the_adapter(run, tuned, target, ids, dec):
    """The run exports (was: "Unrecognized configuration class T5Config") to a model that
    AutoModelForSeq2SeqLM loads, with the adapter model's logits, and that generates."""
    from rlhf_recipes import export

    assert export.main([str(run), str(target)]) == 0
    merged = AutoModelForSeq2SeqLM.from_pretrained(target).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids, decoder_input_ids=dec).logits
                - tuned(input_ids=ids, decoder_input_ids=dec).logits).abs().max() < 1e-5
    assert merged.generate(input_ids=ids, max_new_tokens=3)[0, 0] == merged.config.decoder_start_token_id


@pytest.mark.slow
def test_a_short_seq2seq_quickstart_learns_and_holds_the_kl(tmp_path):
    out = tmp_path / "quickstart_seq2seq"
    assert main(["quickstart_seq2seq", *SHORT_QUICKSTART, f"run.output_dir={out}"]) == 0
    result = json.loads((out / "eval.json").read_text())
    before, after = result["before"], result["after"]
    assert before["policy"]["kl"]["mean"] == 0.0
    assert after["reward_improvement"]["ci95"][0] > 0  # significant, paired by prompt
    assert reward_gain(result) >= 1.0  # in reference standard deviations
    assert after["policy"]["judged"]["mean"] >= before["policy"]["judged"]["mean"] + 0.2
    assert 0 < after["policy"]["kl"]["mean"] <= 2 * json.loads((out / "recipe.json").read_text())["ppo"]["target"]
    base = AutoModelForSeq2SeqLM.from_pretrained(out / "stages" / "sft")
    tuned = PeftModel.from_pretrained(base, out / "model").eval()
    exported_like_the_adapter(out, tuned, tmp_path / "merged", torch.tensor([[44, 105, 45, 1]]),
                              torch.tensor([[0, 44, 105]]))
