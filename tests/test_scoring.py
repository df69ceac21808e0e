"""PPO's scoring passes at the response tokens only, and packed (rlhf_recipes.ppo.scoring), give
what the padded full-vocabulary, every-position pass gives: the same masks, log-probs, values
and entropies, bit for bit or to float precision, and a whole step the same statistics and the
same trained weights. The padded pass is TRL 0.11.4's own, bit for bit (tests/test_parity.py)."""
import dataclasses
import inspect

import pytest
import torch

from conftest import SMALL, local_overrides
from rlhf_recipes import apply_overrides, load_recipe, ppo
from rlhf_recipes.components import token_scores
from rlhf_recipes.components.policy import build_policy, load_tokenizer
from rlhf_recipes.ppo import maths
from rlhf_recipes.ppo.scoring import score

CPU = torch.device("cpu")


def trl_masks(attention_mask, queries, responses):
    """TRL 0.11.4's batched_forward_pass masks, by its own per-row loop."""
    masks = torch.zeros_like(attention_mask)
    masks[:, :-1] = attention_mask[:, 1:]
    for j, (q, r) in enumerate(zip(queries, responses)):
        start = len(q) - 1
        if attention_mask[j, 0] == 0:
            start += attention_mask[j, :].nonzero()[0]
        masks[j, :start] = 0
        masks[j, start + len(r):] = 0
    return masks[:, :-1]


@pytest.mark.parametrize("side", ["right", "left"])
def test_response_mask_is_trls_without_the_loop(side):
    g = torch.Generator().manual_seed(0)
    queries = [torch.ones(int(n)) for n in torch.randint(1, 9, (16,), generator=g)]
    responses = [torch.ones(int(n)) for n in torch.randint(1, 17, (16,), generator=g)]
    width = max(len(q) + len(r) for q, r in zip(queries, responses)) + 2  # and a padding column everywhere
    attention = torch.zeros(16, width, dtype=torch.long)
    for j, (q, r) in enumerate(zip(queries, responses)):
        n = len(q) + len(r)
        attention[j, slice(0, n) if side == "right" else slice(width - n, width)] = 1
    mask = token_scores.response_mask(attention, torch.tensor([len(q) for q in queries]),
                                      torch.tensor([len(r) for r in responses]))
    assert mask.dtype == attention.dtype and torch.equal(mask, trl_masks(attention, queries, responses))
    assert torch.equal(maths.last_positions(mask), torch.tensor([int(m.nonzero()[-1]) for m in mask]))


@pytest.fixture(scope="module")
def recipe(tiny_dir):
    """Padded rows (ppo.pack_rows=false), to compare with the padded pass bit for bit."""
    return apply_overrides(load_recipe("imdb_positive"), [*local_overrides("imdb_positive", tiny_dir), *SMALL,
                                                          "ppo.learning_rate=1e-2", "ppo.pack_rows=false"])


def ragged(n, seed=0):
    """Queries and responses of different lengths, so that rows are padded differently."""
    g = torch.Generator().manual_seed(seed)
    queries = [torch.randint(1, 200, (int(k),), generator=g) for k in torch.randint(2, 9, (n,), generator=g)]
    responses = [torch.randint(1, 200, (int(k),), generator=g) for k in torch.randint(1, 9, (n,), generator=g)]
    return queries, responses


def forward_shapes(trainer, policy, batch, extra=None):
    """The trainer's pass over `batch`, and the (rows, width) of each model call it made."""
    shapes = []
    handle = policy.v_head.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape[:2]))
    try:
        return score(policy, batch, trainer.passes, extra), shapes
    finally:
        handle.remove()


def padded(trainer, policy, batch, extra=None):
    """The padded pass (TRL 0.11.4's), LM head at every position, over `batch`."""
    return score(policy, batch, dataclasses.replace(trainer.passes, responses_only=False, pack_rows=False), extra)


@pytest.mark.parametrize("arch,dtype", [("gpt2", "float32"), ("gpt2", "bfloat16"), ("gpt-neo", "float32"),
                                        ("gpt-neox", "float32"), ("llama", "float32")])
def test_every_causal_architecture_scores_at_the_responses_alone(tiny_dir, recipe, arch, dtype):
    """bfloat16, as on a GPU: the head runs in it and only its output is upcast, as in TRL."""
    recipe = dataclasses.replace(recipe, policy=dataclasses.replace(recipe.policy, model=str(tiny_dir / arch),
                                                                    dtype=dtype))
    torch.manual_seed(0)
    policy = build_policy(recipe.policy, CPU)
    modes = [m.training for m in policy.modules()]
    trainer = ppo.make_trainer(recipe, policy, load_tokenizer("p", recipe.policy.model))
    assert [m.training for m in policy.modules()] == modes  # the probe's passes leave every module as it was
    base = policy.pretrained_model.get_base_model()
    if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:  # GPT-Neo on transformers 4.57
        assert not trainer.responses_only  # it would compute every position's logits anyway: the padded pass
        return
    assert trainer.responses_only
    queries, responses = ragged(8)
    batch = trainer.batch(queries, responses)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            ours = score(policy, batch, trainer.passes, "entropy" if grad else None)
            theirs = padded(trainer, policy, batch, "entropy" if grad else None)
        logprobs, entropies, values, masks = ours
        assert torch.equal(masks, theirs[3])
        assert torch.equal(logprobs * masks, theirs[0] * masks)  # the padded pass's are not zero at prompt and padding
        assert torch.equal(values, theirs[2])
        if grad:
            assert logprobs.requires_grad and values.requires_grad
            assert torch.equal(entropies * masks, theirs[1].detach() * masks)
            assert not entropies.requires_grad  # a statistic only, unless ppo.entropy_coef puts it in the loss
        else:
            assert entropies is None


def test_a_model_whose_logits_are_not_its_head_of_the_last_hidden_state_keeps_the_padded_pass(recipe):
    torch.manual_seed(0)
    policy = build_policy(recipe.policy, CPU)
    base = policy.pretrained_model.get_base_model()
    # as Gemma 2's soft cap or Cohere's logit scale: the logits are changed after the head
    handle = base.register_forward_hook(lambda m, a, out: out.__setitem__("logits", out["logits"] * 2) or out)
    try:
        trainer = ppo.make_trainer(recipe, policy, load_tokenizer("p", recipe.policy.model))
        assert not trainer.responses_only
        queries, responses = ragged(8)
        stats = ppo.ppo_step(trainer, queries, responses, [float(i) for i in range(8)])
        assert stats["objective/kl"] == 0.0
    finally:
        handle.remove()


def test_a_model_that_fails_the_response_only_call_keeps_the_padded_pass(recipe):
    torch.manual_seed(0)
    policy = build_policy(recipe.policy, CPU)

    def refuse(module, args, kwargs):  # as a remote-code forward that cannot take logits_to_keep
        if "logits_to_keep" in kwargs:
            raise RuntimeError("unexpected argument")

    handle = policy.pretrained_model.get_base_model().register_forward_pre_hook(refuse, with_kwargs=True)
    try:
        trainer = ppo.make_trainer(recipe, policy, load_tokenizer("p", recipe.policy.model))
        assert not trainer.responses_only
        queries, responses = ragged(8)
        assert ppo.ppo_step(trainer, queries, responses, [float(i) for i in range(8)])["objective/kl"] == 0.0
    finally:
        handle.remove()


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_a_step_gives_the_padded_passs_statistics_and_weights_to_the_last_bits(recipe, entropy_coef):
    """One PPO step (2 epochs x 2 minibatches) with the response-only passes and with the padded
    ones, from the same weights and seed: every statistic and every trained weight the same to the
    last bits. (Bit for bit on the Intel CPU where this was first written; on an AMD EPYC the
    gradient sums over the response rows alone, not over every position with zeros at the others,
    take other kernel blockings and differ by about 1e-6 relative over two steps.)"""
    recipe = dataclasses.replace(recipe, ppo=dataclasses.replace(recipe.ppo, entropy_coef=entropy_coef))
    results = []
    for responses_only in (True, False):
        torch.manual_seed(0)
        policy = build_policy(recipe.policy, CPU)
        trainer = ppo.make_trainer(recipe, policy, load_tokenizer("p", recipe.policy.model))
        trainer.passes = dataclasses.replace(trainer.passes, responses_only=responses_only)
        calls = []  # so that the comparison cannot pass with the response-only pass never run
        handle = policy.pretrained_model.get_base_model().register_forward_pre_hook(
            lambda m, a, k: calls.append(k.get("logits_to_keep")), with_kwargs=True)
        queries, responses = ragged(8, seed=1)
        stats = [ppo.ppo_step(trainer, queries, responses, [float(i) - 3 for i in range(8)])
                 for _ in range(2)]  # the second step starts from a moved policy: KL and ratios not trivial
        handle.remove()
        params = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        # per step: 2 scoring passes and 2 epochs x 2 minibatches, of 2 chunks each for scoring
        assert calls.count(1) == (16 if responses_only else 0)
        results.append((stats, params))
    (ours, our_params), (theirs, their_params) = results
    assert ours[1]["objective/kl"] != 0.0
    ours, theirs = ({k: v for k, v in run[1].items() if not k.startswith("time/")} for run in (ours, theirs))
    assert ours.keys() == theirs.keys()
    assert all(ours[k] == pytest.approx(theirs[k], rel=1e-4, abs=1e-7) for k in theirs)
    assert all(torch.allclose(our_params[n], their_params[n], rtol=1e-4, atol=1e-5) for n in their_params)


def test_a_step_takes_exactly_a_batch_and_the_full_penalty_pads_every_pass(recipe):
    torch.manual_seed(0)
    trainer = ppo.make_trainer(recipe, build_policy(recipe.policy, CPU), load_tokenizer("p", recipe.policy.model))
    queries, responses = ragged(8)
    with pytest.raises(ValueError, match="a PPO step takes ppo.batch_size=8 queries, responses and scores, got 7"):
        ppo.ppo_step(trainer, queries[:7], responses[:7], [0.0] * 7)
    assert trainer.responses_only
    full = dataclasses.replace(recipe, ppo=dataclasses.replace(recipe.ppo, kl_penalty="full"))
    trainer = ppo.make_trainer(full, build_policy(recipe.policy, CPU), load_tokenizer("p", recipe.policy.model))
    assert not trainer.responses_only  # every logit is needed, in the gradient pass too
    assert ppo.ppo_step(trainer, queries, responses, [float(i) for i in range(8)])["objective/kl"] == 0.0


def test_rewards_for_the_batch_at_once_are_trls_row_by_row():
    """maths.token_rewards against TRL 0.11.4's compute_rewards loop, written out here."""
    g = torch.Generator().manual_seed(2)
    logprobs, ref = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    masks = torch.zeros(6, 11, dtype=torch.long)
    for j, (a, b) in enumerate([(0, 3), (2, 11), (5, 6), (1, 9), (10, 11), (0, 11)]):
        masks[j, a:b] = 1
    scores = torch.randn(6, generator=g)
    for penalty in ("kl", "abs", "mse"):
        kls = maths.kl_penalty(logprobs, ref, penalty)
        rewards, non_score = maths.token_rewards(scores, kls, masks, 0.37)
        for j in range(6):  # TRL's loop: the penalty everywhere, the score at the last scored token
            row = -0.37 * kls[j]
            assert torch.equal(non_score[j], row)
            row = row.clone()
            row[masks[j].nonzero()[-1]] += scores[j]
            assert torch.equal(rewards[j], row)
    masks[2] = 0  # a response with nothing scored: its score would land nowhere
    with pytest.raises(ValueError, match="no scored token"):
        maths.token_rewards(scores, kls, masks, 0.37)


def test_rollback_puts_back_everything_a_step_changes_and_the_check_sees_any_non_finite(recipe):
    torch.manual_seed(0)
    policy = build_policy(recipe.policy, CPU)
    trainer = ppo.make_trainer(recipe, policy, load_tokenizer("p", recipe.policy.model))
    rollback = ppo.Rollback(trainer)
    queries, responses = ragged(8)
    rewards = [float(i) for i in range(8)]
    for step in range(3):  # the first from a full copy (no optimizer state yet), then in place
        rollback.take()
        before = ppo.trainer_state(trainer)
        stats = ppo.ppo_step(trainer, queries, responses, rewards)
        assert ppo.step_is_finite(trainer, stats)
        rollback.restore()
        after = ppo.trainer_state(trainer)
        assert (rollback.full is None) == (step > 0)
        assert all(torch.equal(before["params"][n], after["params"][n]) for n in before["params"])
        for p, state in before["optimizer"]["state"].items():
            assert all(torch.equal(v, after["optimizer"]["state"][p][k]) for k, v in state.items())
        assert (before["kl_coef"], before["running"]) == (after["kl_coef"], after["running"])
        ppo.ppo_step(trainer, queries, responses, rewards)  # and move on, so the next step has state
    param = next(p for p in policy.parameters() if p.requires_grad)
    for value, finite in ((1e30, True), (float("inf"), False), (float("nan"), False)):
        with torch.no_grad():
            param.view(-1)[0] = value
        assert ppo.step_is_finite(trainer, stats) is finite


def test_length_buckets_score_rows_of_similar_length_together_and_agree_with_the_padded_pass(recipe):
    bucketed = dataclasses.replace(recipe, ppo=dataclasses.replace(recipe.ppo, length_buckets=2))
    torch.manual_seed(0)
    policy = build_policy(bucketed.policy, CPU)
    trainer = ppo.make_trainer(bucketed, policy, load_tokenizer("p", recipe.policy.model))
    queries, responses = ragged(8, seed=3)
    batch = trainer.batch(queries, responses)
    with torch.no_grad():
        ours, widths = forward_shapes(trainer, policy, batch)
        theirs = padded(trainer, policy, batch)
    # 2 chunks of mini_batch_size 4, each as 2 passes of 2 rows, the shorter ones trimmed
    lengths = sorted([len(q) + len(r) for q, r in zip(queries[:4], responses[:4])])
    assert len(widths) == 4 and widths[0] == (2, lengths[1])
    assert min(w for _, w in widths) < batch.inputs["input_ids"].shape[1]
    assert torch.equal(ours[3], theirs[3])
    assert torch.allclose(ours[0] * ours[3], theirs[0] * theirs[3], atol=1e-5)
    assert torch.allclose(ours[2] * ours[3], theirs[2] * theirs[3], atol=1e-5)
    stats = ppo.ppo_step(trainer, queries, responses, [float(i) for i in range(8)])
    assert stats["objective/kl"] == 0.0  # the policy's and the reference's passes are bucketed alike
    with pytest.raises(Exception, match="length_buckets"):
        dataclasses.replace(recipe.ppo, length_buckets=0)


def test_packing_lays_rows_end_to_end_at_positions_of_their_own():
    g = torch.Generator().manual_seed(4)
    lengths = [int(n) for n in torch.randint(1, 12, (9,), generator=g)]
    for side in ("right", "left"):
        ids = torch.zeros(9, 13, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, n in enumerate(lengths):
            cols = slice(0, n) if side == "right" else slice(13 - n, 13)
            ids[j, cols], mask[j, cols] = torch.randint(1, 500, (n,), generator=g), 1
        packed, positions, index = token_scores.pack(ids, mask, lengths, capacity=16)
        rows = -(-sum(lengths) // 16)
        assert packed.shape[0] == rows < 9  # fewer, fuller rows, about equally full
        assert packed.shape[1] <= sum(lengths) / rows + max(lengths)
        assert (packed != 0).sum() == sum(lengths)  # every token once, no padding but at the ends
        assert torch.equal(packed.view(-1)[index] * mask, ids)
        assert torch.equal(positions.view(-1)[index] * mask, (mask.cumsum(1) - 1) * mask)
    packed, _, _ = token_scores.pack(ids, mask, lengths, capacity=1)
    assert packed.shape[1] >= max(lengths)  # no row is cut to fit
    # a few tokens past the capacity take a few more columns, not a whole row more
    three = torch.tensor([[1] * 8, [1] * 8, [1] + [0] * 7])
    packed, _, _ = token_scores.pack(three * 5, three, [8, 8, 1], capacity=16)
    assert packed.shape == (2, 9)  # first fit would give (2, 16): one row full, one of a single token
    probe = torch.tensor([[1] * 5, [1] * 3 + [0] * 2] * 2)  # probes.packing_problem's rows: two packed rows of two each
    packed, positions, _ = token_scores.pack(probe * 3, probe, [5, 3, 5, 3], capacity=8)
    assert packed.shape == (2, 8) and positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]] * 2


@pytest.mark.parametrize("arch,dtype", [("gpt2", "float32"), ("gpt2", "bfloat16"), ("gpt-neo", "float32"),
                                        ("gpt-neox", "float32"), ("llama", "float32")])
def test_packed_rows_score_as_padded_ones(tiny_dir, recipe, arch, dtype):
    """ppo.pack_rows: every architecture keeps packed rows apart (its start-up probe says so), and
    the log-probs, values and entropies are the padded pass's to float precision, with gradients."""
    recipe = dataclasses.replace(recipe, policy=dataclasses.replace(recipe.policy, model=str(tiny_dir / arch),
                                                                    dtype=dtype),
                                 ppo=dataclasses.replace(recipe.ppo, pack_rows=True, mini_batch_size=8))
    torch.manual_seed(0)
    policy = build_policy(recipe.policy, CPU)
    trainer = ppo.make_trainer(recipe, policy, load_tokenizer("p", recipe.policy.model))
    if not trainer.responses_only:  # GPT-Neo on transformers 4.57: the padded pass, and no packing
        assert not trainer.pack_rows
        return
    assert trainer.pack_rows
    queries, responses = ragged(8, seed=5)
    # as real rollouts: GPT-2's pad id is its eos, which a response ends with and a prompt may start with;
    # packing must go by the attention mask, not by the token ids
    pad = trainer.tokenizer.pad_token_id
    responses[0][-1], responses[3][0], queries[1][0] = pad, pad, pad
    batch = trainer.batch(queries, responses)
    ours, shapes = forward_shapes(trainer, policy, batch, "entropy")
    theirs = padded(trainer, policy, batch, "entropy")
    lengths = [len(q) + len(r) for q, r in zip(queries, responses)]
    assert shapes[0].numel() < batch.inputs["input_ids"].numel() and shapes[0][1] >= max(lengths)  # packed, none cut
    assert shapes[0].numel() < 1.5 * sum(lengths)
    tol = dict(rtol=0.05, atol=0.05) if dtype == "bfloat16" else dict(rtol=1e-4, atol=1e-5)
    masks = theirs[3]
    assert torch.equal(ours[3], masks)
    assert torch.allclose(ours[0] * masks, theirs[0] * masks, **tol)
    assert torch.allclose(ours[2] * masks, theirs[2] * masks, **tol)
    assert torch.allclose(ours[1] * masks, theirs[1].detach() * masks, **tol)
    assert ours[0].requires_grad and ours[2].requires_grad
    stats = ppo.ppo_step(trainer, queries, responses, [float(i) for i in range(8)])
    assert stats["objective/kl"] == 0.0  # the policy's and the reference's passes are packed alike


def ignore_positions(module, args, kwargs):  # as a model that numbers positions itself
    return args, {k: v for k, v in kwargs.items() if k != "position_ids"}


def apart_in_one_row_only(module, args, kwargs):  # as flash attention: packed sequences only in a batch of one row
    return ignore_positions(module, args, kwargs) if kwargs["input_ids"].shape[0] > 1 else (args, kwargs)


@pytest.mark.parametrize("defect", [ignore_positions, apart_in_one_row_only])
def test_a_model_that_lets_packed_rows_see_each_other_is_not_packed(recipe, defect):
    torch.manual_seed(0)
    policy = build_policy(recipe.policy, CPU)
    packing = dataclasses.replace(recipe, ppo=dataclasses.replace(recipe.ppo, pack_rows=True))
    handle = policy.pretrained_model.get_base_model().register_forward_pre_hook(defect, with_kwargs=True)
    try:
        trainer = ppo.make_trainer(packing, policy, load_tokenizer("p", recipe.policy.model))
        assert trainer.responses_only and not trainer.pack_rows
    finally:
        handle.remove()
    trainer = ppo.make_trainer(packing, policy, load_tokenizer("p", recipe.policy.model))
    assert trainer.pack_rows
    with pytest.raises(Exception, match="length_buckets.*pack_rows=false"):
        dataclasses.replace(recipe.ppo, pack_rows=True, length_buckets=2)


def test_eager_attention_packs_rows_no_wider_than_the_padded_ones(tiny_dir, recipe):
    """gpt-neo's tiny model runs eager attention, which keeps each row's scores for the backward
    pass: its packed rows are at most the padded width (plus the greedy fill's overshoot)."""
    recipe = dataclasses.replace(recipe, policy=dataclasses.replace(recipe.policy, model=str(tiny_dir / "gpt-neo")),
                                 ppo=dataclasses.replace(recipe.ppo, pack_rows=True, mini_batch_size=8))
    torch.manual_seed(0)
    policy = build_policy(recipe.policy, CPU)
    trainer = ppo.make_trainer(recipe, policy, load_tokenizer("p", recipe.policy.model))
    assert trainer.passes.pack_width == 0  # eager attention seen: rows as wide as the pass's padded ones
    if not trainer.pack_rows:  # transformers 4.57's GPT-Neo builds its own mask: it pads
        return
    queries, responses = ragged(8, seed=6)
    batch = trainer.batch(queries, responses)
    with torch.no_grad():
        _, shapes = forward_shapes(trainer, policy, batch)
    width = batch.inputs["input_ids"].shape[1]
    assert shapes[0][0] > 1 and shapes[0][1] < 2 * width and shapes[0].numel() < batch.inputs["input_ids"].numel()
