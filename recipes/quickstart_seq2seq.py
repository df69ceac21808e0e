"""The quickstart with an encoder-decoder policy: offline proof that seq2seq PPO learns.

A tiny T5 of FLAN-T5's kind (gated-gelu, decoder start = pad = 0, eos = 1) learns from random
weights to continue a review's opening (SFT: source = the opening, target = the rest), a reward
model learns as in the quickstart, and PPO steers the continuations positive. The encoder reads
the opening; the decoder writes the rest; the reward sees opening + continuation, as it was trained.
"""
from rlhf_recipes import PPO, SFT, Eval, Generation, Policy, Prompts, Recipe, Reward, RewardModel, Run
from rlhf_recipes.corpus import QUICKSTART

recipe = Recipe(
    name="quickstart_seq2seq",
    # base_seq2seq/ holds a tokenizer that appends </s> and a T5 config: SFT starts from random weights
    policy=Policy(model=str(QUICKSTART / "base_seq2seq"), lora_r=16, lora_alpha=32, lora_dropout=0.0,
                  lora_target_modules=("q", "k", "v", "o", "wi_0", "wi_1", "wo")),
    sft=SFT(dataset=str(QUICKSTART / "continuations.jsonl"), template="{opening}", target_column="rest",
            method="full", init="random", learning_rate=3e-3, epochs=4.0, batch_size=32, max_length=64, heldout=200),
    # the quickstart's reward model: a GPT-2-shaped classifier from random weights on the same pairs
    reward_model=RewardModel(dataset=str(QUICKSTART / "pairs.jsonl"), model=str(QUICKSTART / "base"), init="random",
                             learning_rate=3e-3, epochs=2.0, batch_size=32, max_length=64, heldout=200),
    reward=Reward(input="prompt+response", batch_size=256),
    # the encoder reads a whole opening (up to 9 words and </s>)
    prompts=Prompts(dataset=str(QUICKSTART / "prompts.jsonl"), text_column="text", max_source_tokens=16),
    generation=Generation(response_min_tokens=4, response_max_tokens=8, top_k=0, top_p=1.0, temperature=1.0),
    ppo=PPO(learning_rate=5e-4, batch_size=128, mini_batch_size=32, ppo_epochs=4,
            adap_kl_ctrl=True, init_kl_coef=0.2, target=6.0, horizon=320.0,  # up to x47 in 50 steps
            gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, max_grad_norm=1.0,
            entropy_coef=0.01),  # as the quickstart, measured there
    eval=Eval(num_prompts=256, batch_size=256, seed=1234, every=10, judge="rlhf_recipes.corpus:is_positive"),
    run=Run(output_dir="runs/quickstart_seq2seq", steps=50, seed=0, sample_every=10, sample_rows=4,
            checkpoint_every=20, keep_checkpoints=2, max_bad_batches=3),
)
