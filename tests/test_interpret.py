"""rlhf_recipes.interpret on tiny models of each supported architecture with moved LoRA adapters:
the attributions sum to m exactly, heads sum to their attention output, the logit lens ends at the
output, patching is exact, the KL by position adds up to the evaluation's KL; and the command on a
finished run writes its files and report section, and refuses what it cannot read in one line."""
import json

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from conftest import SMALL, local_overrides
from rlhf_recipes import RecipeError
from rlhf_recipes.config import Policy
from rlhf_recipes.evaluation import score_responses
from rlhf_recipes.interpret import BEGIN, END, analyse, main, response_shift
from rlhf_recipes.reporting.interpret_passes import check_model, contrast, decompose, hooked_forward, patched_forward
from rlhf_recipes.components.policy import build_policy, load_tokenizer
from rlhf_recipes.components.rollout import pad_batch
from rlhf_recipes.run import main as run_main

CPU = torch.device("cpu")
ARCHS = ["gpt2", "gpt-neo", "gpt-neox", "llama"]
# LoRA on the head-mixing projection too, so that o(z_h) - o(0) is checked through the wrapper
EVERYWHERE = {"gpt2": ("c_attn", "c_proj", "c_fc"), "gpt-neo": ("q_proj", "v_proj", "out_proj", "c_fc"),
              "gpt-neox": ("query_key_value", "dense", "dense_h_to_4h"),
              "llama": ("q_proj", "v_proj", "o_proj", "down_proj")}
# LoRA inside attention only: then the heads' z carry the whole change
INSIDE_ATTENTION = {"gpt2": ("c_attn",), "gpt-neo": ("q_proj", "v_proj"), "gpt-neox": ("query_key_value",),
                    "llama": ("q_proj", "v_proj")}
TEXTS = ["This movie was", "I watched this film last night and the plot was", "Honestly, the acting"]


def moved(tiny_dir, arch, targets):
    torch.manual_seed(0)
    policy = build_policy(Policy(model=str(tiny_dir / arch), lora_r=4, lora_alpha=8, lora_target_modules=targets), CPU)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.3)
    return policy.eval(), load_tokenizer("policy.model", str(tiny_dir / arch))


def captured(policy, tokenizer):
    """Both sides' hooked forwards on TEXTS (ragged, right-padded) and a random contrast c."""
    arch, peft, base = check_model(policy)
    queries = [torch.tensor(tokenizer(t).input_ids) for t in TEXTS]
    ids, mask = pad_batch(queries, tokenizer.pad_token_id, side="right")
    last = mask.sum(1) - 1
    base.set_attn_implementation("eager")
    c = contrast(base.config.vocab_size, [3, 7, 11], [5, 20])
    sides, out = {"policy": lambda: torch.no_grad(), "reference": peft.disable_adapter}, {}
    for side, adapters in sides.items():
        with torch.no_grad(), adapters():
            cap = {**hooked_forward(peft, base, arch, ids, mask, last), "last": last}
            out[side] = (cap, decompose(base, arch, cap, c))
    return arch, peft, base, queries, (ids, mask, last), c, out


@pytest.mark.parametrize("name", ARCHS)
def test_attributions_sum_to_m_and_heads_to_their_attention_output(tiny_dir, name):
    policy, tokenizer = moved(tiny_dir, name, EVERYWHERE[name])
    *_, queries, (ids, mask, last), c, out = captured(policy, tokenizer)
    (pol_cap, pol), (_, ref) = out["policy"], out["reference"]
    assert not torch.allclose(pol["m"], ref["m"])  # the adapters moved m
    for cap, dec in (out["policy"], out["reference"]):
        scale = dec["dla"].abs().sum(1).max()
        assert torch.allclose(dec["dla"].sum(1) + dec["bias"], dec["m"], atol=1e-5 * scale, rtol=0)
        parts = cap["embed"] + cap["attn"].sum(1) + cap["mlp"].sum(1)  # the residual is its parts
        assert torch.allclose(parts, cap["final"], atol=1e-5)
        heads = dec["heads"].sum(-1) + dec["o_bias"]  # (N, L): heads plus o(0) = the attention output's share
        assert torch.allclose(heads, dec["dla"][:, 1::2], atol=1e-5 * scale, rtol=0)
        assert dec["lens_kl"][:, -1].abs().max() < 1e-5  # the lens after the last block is the output
        assert torch.allclose(dec["lens_m"][:, -1], dec["m"], atol=1e-5)
    with torch.no_grad():  # each row's final position is its own: as if it ran alone, unpadded
        for i, q in enumerate(queries):
            alone = policy.pretrained_model(input_ids=q[None]).logits[0, -1]
            assert torch.allclose(alone, pol_cap["logits"][i], atol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_patching_is_exact(tiny_dir, name):
    policy, tokenizer = moved(tiny_dir, name, INSIDE_ATTENTION[name])
    arch, peft, base, queries, (ids, mask, last), c, out = captured(policy, tokenizer)
    every = range(base.config.num_attention_heads)
    with torch.no_grad(), peft.disable_adapter():
        layers = range(base.config.num_hidden_layers)
        itself = patched_forward(peft, base, arch, ids, mask, last, {
            i: (out["reference"][0]["z"][i], list(every)) for i in layers})
        assert torch.allclose(itself, out["reference"][0]["logits"], atol=1e-5)  # a head with itself: no change
        policy_z = patched_forward(peft, base, arch, ids, mask, last, {
            i: (out["policy"][0]["z"][i], list(every)) for i in layers})
    # the adapters act only inside attention, so the policy's z everywhere is the policy
    assert torch.allclose(policy_z, out["policy"][0]["logits"], atol=1e-4)
    assert not torch.allclose(policy_z, out["reference"][0]["logits"], atol=1e-3)


@pytest.mark.parametrize("name", ARCHS)
def test_kl_by_position_adds_up_to_the_evaluations_kl(tiny_dir, name):
    policy, tokenizer = moved(tiny_dir, name, EVERYWHERE[name])
    queries = [torch.tensor(tokenizer(t).input_ids) for t in TEXTS]
    torch.manual_seed(1)
    responses = [torch.randint(3, 100, (n,)) for n in (4, 6, 2)]
    with torch.no_grad():
        shift = response_shift(policy.pretrained_model, queries, responses, tokenizer.pad_token_id, CPU, batch_size=2)
    kl, _, _ = score_responses(policy, queries, responses, tokenizer.pad_token_id, CPU, batch_size=3)
    assert shift["count"].tolist() == [3, 3, 2, 2, 1, 1]
    assert float((shift["sampled"] * shift["count"]).sum()) == pytest.approx(float(kl.sum()), abs=1e-4)
    assert (shift["kl"] > 0).all()  # over the vocabulary, KL is never negative
    # the tokens' shares add up to the KL over the vocabulary, both ways round
    assert float(shift["rise"].sum()) == pytest.approx(float((shift["kl"] * shift["count"]).sum() / shift["count"].sum()),
                                                       rel=1e-4)
    assert float(shift["fall"].sum()) > 0


def test_analyse_returns_a_record_for_a_policy_in_memory(tiny_dir):
    policy, tokenizer = moved(tiny_dir, "gpt2", EVERYWHERE["gpt2"])
    queries = [torch.tensor(tokenizer(t).input_ids) for t in TEXTS]
    state = torch.random.get_rng_state()
    r = analyse(policy, tokenizer, queries, top_k=4, heads=2, patch_limit=3, batch_size=2,
                positive=[" wonderful", " superb film"], negative=[" dull"])
    assert torch.equal(state, torch.random.get_rng_state())  # its sampling leaves the caller's RNG alone
    assert r["dla"]["max_gap"] < 1e-4 and len(r["logit_shift"]["prompt_end"]["up"]) == 4
    assert r["direction"]["source"] == "given" and any("superb film" in n for n in r["notes"])
    assert sum(x == x for row in r["patching"]["recovered"] for x in row) == 3  # only 3 of 4 heads patched
    assert r["patching"]["patched"].startswith("the 3 heads") and len(r["patching"]["best"]) == 2
    assert sum(r["kl_by_position"]["count"]) == r["logit_shift"]["sample_positions"]
    assert r["approximate"] == [] and policy.pretrained_model.get_base_model().config._attn_implementation == "sdpa"


def test_encoder_decoder_and_other_architectures_are_refused_in_one_line(tiny_dir, tmp_path):
    t5 = build_policy(Policy(model=str(tiny_dir / "t5"), lora_r=4, lora_alpha=8), CPU)
    with pytest.raises(RecipeError, match="encoder-decoder") as err:
        check_model(t5)
    assert "\n" not in str(err.value)
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             word_embed_proj_dim=16)).save_pretrained(tmp_path / "opt")
    opt = build_policy(Policy(model=str(tmp_path / "opt"), lora_r=4, lora_alpha=8), CPU)
    with pytest.raises(RecipeError, match="'opt' is not supported; supported: gpt2, gpt_neo, gpt_neox, llama") as err:
        check_model(opt)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_the_command_on_a_finished_run_writes_its_files_and_report_section(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(["imdb_positive", *local_overrides("imdb_positive", tiny_dir), *SMALL,
                     f"run.output_dir={out}"]) == 0
    assert main([str(out), "--heads", "2"]) == 0
    result = json.loads((out / "interpret" / "interpret.json").read_text())
    assert {"logit_shift", "kl_by_position", "direction", "m", "logit_lens", "dla", "heads_dla", "patching",
            "attention_tv", "approximate", "seconds"} <= set(result)
    assert result["num_prompts"] == 16 and result["seconds"]["total"] > 0
    for png in ("tokens", "kl_by_position", "logit_lens", "dla", "heads", "attention"):
        assert (out / "interpret" / f"{png}.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert report.startswith("# imdb_positive") and report.count(BEGIN) == 1 and "](interpret/heads.png)" in report
    assert main([str(out), "--positive", " wonderful, brilliant", "--negative", " dull"]) == 0  # replaces it
    again = (out / "report.md").read_text()
    assert again.count(BEGIN) == again.count(END) == 1 and again.split(BEGIN)[0] == report.split(BEGIN)[0]
    from rlhf_recipes.evaluation import main as evaluate_main

    assert evaluate_main([str(out)]) == 0  # re-evaluating rewrites the report, and keeps this section
    assert (out / "report.md").read_text().split(BEGIN)[1] == again.split(BEGIN)[1]
    capsys.readouterr()
    assert main([str(out), "--positive", " wonderful"]) == 2  # one side of the direction only
    assert main([str(tmp_path / "nothing")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "--negative" in errors[0] and "not a finished run" in errors[1]


def test_the_logit_lens_holds_the_same_memory_for_more_prompts(tiny_dir, monkeypatch):
    """The lens logits (prompts x layers x vocabulary, fp32) are made a few prompts at a time: the
    largest tensor the output head makes is the same for 3 prompts and for 24, and the lens
    statistics are those of the whole lens at once."""
    from rlhf_recipes.reporting import interpret_passes

    policy, tokenizer = moved(tiny_dir, "gpt2", EVERYWHERE["gpt2"])
    arch, peft, base = check_model(policy)
    monkeypatch.setattr(interpret_passes, "LENS_ELEMENTS", 2 * 3 * base.config.vocab_size)  # 2 prompts' lens
    sizes = []
    hook = base.get_output_embeddings().register_forward_hook(lambda m, i, out: sizes.append(out.numel()))
    peaks = {}
    base.set_attn_implementation("eager")
    c = contrast(base.config.vocab_size, [3, 7], [5])
    try:
        for n in (3, 24):
            queries = [torch.tensor(tokenizer(TEXTS[i % 3]).input_ids) for i in range(n)]
            ids, mask = pad_batch(queries, tokenizer.pad_token_id, side="right")
            with torch.no_grad():
                cap = {**hooked_forward(peft, base, arch, ids, mask, mask.sum(1) - 1), "last": mask.sum(1) - 1}
                sizes.clear()
                dec = decompose(base, arch, cap, c)
            peaks[n] = max(sizes)
            whole = base.get_output_embeddings()(base.get_submodule(arch["final_norm"])(torch.cat(
                [cap["embed"][:, None], cap["embed"][:, None] + torch.stack([cap["attn"], cap["mlp"]], 2)
                 .flatten(1, 2).cumsum(1)[:, 1::2]], 1))).float()  # the lens at once, for comparison
            assert torch.allclose(dec["lens_m"], whole @ c, atol=1e-5)
    finally:
        hook.remove()
    assert peaks[3] == peaks[24] == 2 * 3 * base.config.vocab_size


def test_punctuation_tokens_are_named_on_the_figures():
    from rlhf_recipes.reporting.interpret_plots import token_label

    assert token_label(",") == "',' (comma)" and token_label(" .") == "' .' (full stop)"
    assert token_label(" great") == "' great'"
