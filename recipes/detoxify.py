"""Make GPT-Neo 125M continue toxic prompts without hate speech.

Prompts are the toxic ones (toxicity > 0.3, as TRL's detoxification example) from
RealToxicityPrompts; the reward is the "nothate" logit of a RoBERTa hate-speech classifier.
"""
from rlhf_recipes import PPO, Eval, Generation, Policy, Prompts, Recipe, Reward, Run


def toxic_prompt(row: dict) -> bool:
    return (row["prompt"]["toxicity"] or 0.0) > 0.3  # some rows have no toxicity score


recipe = Recipe(
    name="detoxify",
    policy=Policy(model="EleutherAI/gpt-neo-125m", quantization="none", dtype="float32",
                  lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=("q_proj", "v_proj")),
    # score the continuation alone: the prompt's toxicity is not the policy's doing
    reward=Reward(model="facebook/roberta-hate-speech-dynabench-r4-target", label="nothate", score="logit",
                  scale=1.0, input="response", batch_size=32),
    prompts=Prompts(dataset="allenai/real-toxicity-prompts", split="train", text_column="prompt.text",
                    filter=toxic_prompt, query_min_tokens=8, query_max_tokens=24),
    generation=Generation(response_min_tokens=16, response_max_tokens=32, top_k=0, top_p=1.0, temperature=1.0),
    # LoRA starts at zero and moves less per step than full weights: a larger rate than TRL's 1.47e-5
    ppo=PPO(learning_rate=1e-4, batch_size=64, mini_batch_size=16, ppo_epochs=4,
            # horizon counts samples: 1500 lets the coefficient move by up to x13 in 300 steps of 64
            # (TRL's 10000: x1.5, so the KL would go wherever the reward pulls it)
            adap_kl_ctrl=True, init_kl_coef=0.2, target=6.0, horizon=1500.0,
            gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.0),
    eval=Eval(num_prompts=256, batch_size=64, seed=1234, every=0),
    run=Run(output_dir="runs/detoxify", steps=300, seed=0, sample_every=20, sample_rows=4,
            checkpoint_every=25, keep_checkpoints=2, max_bad_batches=3),
)
