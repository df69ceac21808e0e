"""Steer an instruct model, Qwen2.5-0.5B-Instruct, to continue movie reviews on a positive note.

An instruct model answers a conversation, not a bare text: each prompt (a review's first words)
becomes the user's turn in the model's own chat template, under a system message that asks for
a continuation, and each reply ends at the model's end of turn (<|im_end|>, one of the two end
tokens its generation config names), which is where reward, KL and PPO stop reading.
Memory (bf16 base, 0.49B params): about 1 GB of weights, LoRA and Adam 0.02 GB, a 151k-word
vocabulary's fp32 logits for a mini-batch of 16 x 96 tokens 0.9 GB: under 6 GB in all.
"""
from rlhf_recipes import PPO, Eval, Generation, Policy, Prompts, Recipe, Reward, Run

recipe = Recipe(
    name="qwen_instruct_positive",
    # Apache-2.0 and ungated; bf16 halves the base (a GPU without native bf16: policy.dtype=float32)
    policy=Policy(model="Qwen/Qwen2.5-0.5B-Instruct", quantization="none", dtype="bfloat16", lora_r=16,
                  lora_alpha=32, lora_dropout=0.0, lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    # the classifier reads the reply alone: the templated prompt carries role names and the system message
    reward=Reward(model="lvwerra/distilbert-imdb", label="POSITIVE", score="logit", scale=1.0,
                  input="response", batch_size=32),
    prompts=Prompts(dataset="stanfordnlp/imdb", split="train", text_column="text", query_min_tokens=4,
                    query_max_tokens=12, chat_template=True,
                    system="Continue the movie review that the user starts, in one or two sentences."),
    # plain sampling, not the model's own (temperature 0.7, top_p 0.8, repetition penalty): those bias the KL
    generation=Generation(response_min_tokens=16, response_max_tokens=48, top_k=0, top_p=1.0, temperature=1.0),
    ppo=PPO(learning_rate=5e-5, batch_size=64, mini_batch_size=16, ppo_epochs=4,
            # horizon counts samples: 1000 lets the coefficient move by up to x10 in 200 steps of 64
            adap_kl_ctrl=True, init_kl_coef=0.1, target=6.0, horizon=1000.0,
            gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.0),
    eval=Eval(num_prompts=256, batch_size=32, seed=1234, every=0),
    run=Run(output_dir="runs/qwen_instruct_positive", steps=200, seed=0, sample_every=10, sample_rows=4,
            checkpoint_every=25, keep_checkpoints=2, max_bad_batches=3),
)
