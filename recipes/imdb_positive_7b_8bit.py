"""imdb_positive on a 7B policy (Pythia 6.9B) in 8-bit, sized for one 24 GB consumer GPU.

Memory budget: an estimate from the shapes, not yet measured on a GPU (bench/large.py measures it).
It assumes sequences of at most 8 + 32 = 40 tokens and a PPO mini-batch of 8:
  int8 weights of the 32 blocks, 6.4B params ............................ 6.4 GB
  embed_in + embed_out kept in fp32 (0.41B params) by k-bit preparation .. 1.7 GB
  LoRA r=16 on query_key_value (8.4M params): weights, grads, Adam ....... 0.1 GB
  KV cache while generating, 32 sequences x 40 tokens (fp32) ............. 1.3 GB
  mini-batch activations: one fp16 residual per layer kept by gradient
    checkpointing, one layer recomputed at a time (1.7 GB without it) .... 0.2 GB
  fp32 logits of 8 x 40 x 50k, with TRL's log-softmax and entropy ........ 0.3 GB
  DistilBERT reward model in 8-bit as the policy (0.07 GB; 0.27 in fp32),
    CUDA context, allocator slack ....................................... 1.8 GB
  total ................................................................ ~12 GB of 24 GB
"""
from rlhf_recipes import PPO, Eval, Generation, Policy, Prompts, Recipe, Reward, Run


def long_review(row: dict) -> bool:
    return len(row["text"]) > 200


recipe = Recipe(
    name="imdb_positive_7b_8bit",
    # Apache-2.0 and ungated; its 50k vocabulary keeps the fp32 embeddings small
    policy=Policy(model="EleutherAI/pythia-6.9b", quantization="8bit", dtype="float16",
                  lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=("query_key_value",)),
    reward=Reward(model="lvwerra/distilbert-imdb", label="POSITIVE", score="logit", scale=1.0,
                  input="prompt+response", batch_size=32),
    prompts=Prompts(dataset="stanfordnlp/imdb", split="train", text_column="text", filter=long_review,
                    query_min_tokens=2, query_max_tokens=8),
    generation=Generation(response_min_tokens=4, response_max_tokens=32, top_k=0, top_p=1.0, temperature=1.0),
    # a smaller batch than GPT-2's 128 to fit the budget; LoRA wants a larger rate than full fine-tuning
    ppo=PPO(learning_rate=5e-5, batch_size=32, mini_batch_size=8, ppo_epochs=4,
            # horizon counts samples: 800 lets the coefficient move by up to x11 in 300 steps of 32
            # (TRL's 10000: x1.2)
            adap_kl_ctrl=True, init_kl_coef=0.2, target=6.0, horizon=800.0,
            gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.0,
            gradient_checkpointing=True),
    eval=Eval(num_prompts=256, batch_size=32, seed=1234, every=0),
    # steps here take tens of seconds: checkpoint often so a pre-empted job loses little
    run=Run(output_dir="runs/imdb_positive_7b_8bit", steps=300, seed=0, sample_every=10, sample_rows=4,
            checkpoint_every=10, keep_checkpoints=2, max_bad_batches=3),
)
