"""TRL 0.11.4's classic PPO step on fixed inputs: the reference that tests/test_parity.py holds
rlhf_recipes.ppo against.

Run it in a venv of its own with trl==0.11.4 and transformers 4.57 (.ci/run builds one); it
imports no rlhf_recipes, and writes one file that holds, for each case, the tiny model's
starting weights, the inputs of each step, and what TRL computed from them: the rollout's
log-probs, values, advantages and returns, every scalar statistic of each step, and the
trainable weights after each step.

    python tests/parity/trl011_reference.py OUT.pt

With no argument it rewrites the recorded copy beside it (trl011_reference.pt), which the test
uses where no such venv is at hand.

Three changes to TRL are applied, the ones rlhf_recipes' PPO makes on purpose:
- an encoder-decoder's first generated token is scored (TRL's mask starts a token later);
- use_score_scaling runs: TRL 0.11.4 keeps its running std as a float and calls .to() on it, so
  every such step fails; here that float converts as a tensor would at that call, its intended maths;
- max_grad_norm clips every minibatch: TRL keeps the trainable parameters in a one-shot filter(),
  which clips the first minibatch of a run and none after it.
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

warnings.filterwarnings("ignore")
import trl  # noqa: E402
from trl import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402
from trl.trainer import utils as trl_utils  # noqa: E402

VOCAB, PAD, EOS = 48, 0, 1
BATCH, STEPS = 8, 2
LORA = {"gpt2": dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], task_type="CAUSAL_LM",
                     fan_in_fan_out=True),
        "t5": dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")}

# Each case: the architecture and the PPOConfig fields that differ from BASE.
BASE = dict(learning_rate=5e-3, batch_size=BATCH, mini_batch_size=4, ppo_epochs=2, adap_kl_ctrl=True,
            init_kl_coef=0.2, target=0.5, horizon=40.0, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2,
            vf_coef=0.1, gradient_accumulation_steps=1, kl_penalty="kl")
CASES = {
    "gpt2": ("gpt2", {}),
    "gpt2_full_kl": ("gpt2", {"kl_penalty": "full"}),
    "gpt2_accumulation": ("gpt2", {"mini_batch_size": 2, "gradient_accumulation_steps": 2, "max_grad_norm": 0.05,
                                   "kl_penalty": "abs"}),
    "gpt2_score_scaling": ("gpt2", {"use_score_scaling": True, "use_score_norm": True, "score_clip": 1.5,
                                    "whiten_rewards": True, "kl_penalty": "mse"}),
    "gpt2_epochs": ("gpt2", {"ppo_epochs": 4, "mini_batch_size": 2, "adap_kl_ctrl": False, "early_stopping": True,
                             "target_kl": 0.001, "learning_rate": 3e-2}),
    "t5": ("t5", {}),
}


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "</s>": EOS, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w2")),
                                  pad_token="<pad>", eos_token="</s>")
    tok.padding_side = "right"
    return tok


def base_model(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
        return GPT2LMHeadModel(config), LORA["gpt2"]
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=PAD, pad_token_id=PAD,
                      eos_token_id=EOS, dropout_rate=0.0)
    return T5ForConditionalGeneration(config), LORA["t5"]


def policy(arch: str):
    """The base with LoRA adapters that are not zero (B starts at zero: a random B makes the
    adapters-off reference differ from the policy from the first step), and a value head."""
    base, lora = base_model(arch)
    peft_model = get_peft_model(base, LoraConfig(**lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    wrapper = AutoModelForSeq2SeqLMWithValueHead if arch == "t5" else AutoModelForCausalLMWithValueHead
    model = wrapper(peft_model, summary_dropout_prob=0.0)
    model.is_peft_model = True
    model.v_head.to(torch.float32)
    return model


def inputs(arch: str, step: int) -> dict:
    """BATCH queries and responses of different lengths, and scores, for one step."""
    g = torch.Generator().manual_seed(100 + step)
    queries, responses = [], []
    for _ in range(BATCH):
        q = torch.randint(2, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
        r = torch.randint(2, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
        if arch == "t5":  # the encoder's input ends in EOS; the decoder's starts with its start token
            q, r = torch.cat([q, torch.tensor([EOS])]), torch.cat([torch.tensor([PAD]), r])
        queries.append(q)
        responses.append(r)
    scores = (torch.randn(BATCH, generator=g) * 2 + 0.5).tolist()
    return {"queries": queries, "responses": responses, "scores": scores}


class _Moment(float):
    """TRL's running mean or std: the float it keeps, which also converts as a tensor would, for
    step()'s .to() on it."""

    def to(self, **kwargs) -> torch.Tensor:
        return torch.tensor(float(self), **kwargs)


def _tensor_moments(update):
    def patched(self, xs):
        out = update(self, xs)
        self.mean, self.std = _Moment(self.mean), _Moment(self.std)
        return out
    return patched


def run_case(arch: str, overrides: dict) -> dict:
    model = policy(arch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    start = {"pretrained_model": {k: v.clone() for k, v in model.pretrained_model.state_dict().items()},
             "v_head": {k: v.clone() for k, v in model.v_head.state_dict().items()}}
    trainer = PPOTrainer(PPOConfig(**{**BASE, **overrides}, seed=0, log_with=None), model=model, ref_model=None,
                         tokenizer=tokenizer())
    trainer.model_params = [p for p in trainer.model.parameters() if p.requires_grad]  # TRL's filter() clips once
    seen = {}
    forward, advantages = trainer.batched_forward_pass, trainer.compute_advantages

    def recorded_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.is_encoder_decoder:  # rlhf_recipes scores the first generated token too
            out = (*out[:3], args[3]["decoder_attention_mask"][:, 1:].to(out[3].dtype))
        seen.setdefault("forward", []).append(out)
        return out

    def recorded_advantages(values, rewards, mask):
        out = advantages(values, rewards, mask)
        seen["advantages"] = out
        return out

    trainer.batched_forward_pass, trainer.compute_advantages = recorded_forward, recorded_advantages
    np.random.seed(1234)  # the minibatch order
    steps = []
    for step in range(STEPS):
        seen.clear()
        given = inputs(arch, step)
        stats = trainer.step(given["queries"], given["responses"],
                             [torch.tensor(s, dtype=torch.float32) for s in given["scores"]])
        (logprobs, _, _, masks), (ref_logprobs, _, _, _) = seen["forward"][:2]
        values, adv, returns = seen["advantages"]
        scalars = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in stats.items()
                   if not k.startswith("time/") and np.size(v) == 1}
        steps.append({**given, "stats": scalars, "minibatches": len(seen["forward"]) - 2, "mask": masks, "logprobs": logprobs * masks,
                      "ref_logprobs": ref_logprobs * masks, "values": values, "advantages": adv, "returns": returns,
                      "weights": {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}})
    return {"arch": arch, "config": {**BASE, **overrides}, "lora": LORA[arch], "start": start, "steps": steps,
            "model_config": model.pretrained_model.get_base_model().config.to_dict()}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("trl011_reference.pt")
    trl_utils.RunningMoments.update = _tensor_moments(trl_utils.RunningMoments.update)
    torch.set_num_threads(1)  # reductions split across threads would round by the thread count
    cases = {name: run_case(arch, overrides) for name, (arch, overrides) in CASES.items()}
    import transformers

    torch.save({"trl": trl.__version__, "transformers": transformers.__version__, "torch": str(torch.__version__),
                "ppo_config_fields": [f.name for f in dataclasses.fields(PPOConfig)], "cases": cases}, out)
    print(f"wrote {out}: {', '.join(cases)} (trl {trl.__version__})")


if __name__ == "__main__":
    main()
