"""The quickstart with DPO instead of a reward model and PPO, offline, on a CPU in minutes.

The same SFT stage and the same preference pairs, split where each pair parts (the shared
opening is the prompt): DPO trains the policy on them directly. The reward model is still
trained, but only to judge: it and the opinion-word judge score the held-out prompts'
samples exactly as they score the PPO quickstart, so the two runs compare on one scale.
"""
from rlhf_recipes import DPO, SFT, Eval, Generation, Policy, Prompts, Recipe, Reward, RewardModel, Run
from rlhf_recipes.corpus import QUICKSTART

recipe = Recipe(
    name="quickstart_dpo",
    policy=Policy(model=str(QUICKSTART / "base"), lora_r=16, lora_alpha=32, lora_dropout=0.0,
                  lora_target_modules=("c_attn", "c_proj", "c_fc")),
    sft=SFT(dataset=str(QUICKSTART / "reviews.jsonl"), method="full", init="random",
            learning_rate=3e-3, epochs=4.0, batch_size=32, max_length=64, heldout=200),
    # trained as in the PPO quickstart, to evaluate with: DPO itself needs no reward model
    reward_model=RewardModel(dataset=str(QUICKSTART / "pairs.jsonl"), init="random",
                             learning_rate=3e-3, epochs=2.0, batch_size=32, max_length=64, heldout=200),
    reward=Reward(input="prompt+response", batch_size=256),
    prompts=Prompts(dataset=str(QUICKSTART / "prompts.jsonl"), text_column="text",
                    query_min_tokens=9, query_max_tokens=9),
    generation=Generation(response_min_tokens=4, response_max_tokens=8, top_k=0, top_p=1.0, temperature=1.0),
    # the answers carry no leading space: the join is the recipe's to choose
    dpo=DPO(dataset=str(QUICKSTART / "preferences.jsonl"), separator=" ", beta=0.1, loss_type="sigmoid",
            label_smoothing=0.0, rpo_alpha=None, learning_rate=5e-4, epochs=1.0, batch_size=32,
            gradient_accumulation_steps=1, max_grad_norm=1.0, lr_scheduler="linear", warmup_ratio=0.1,
            max_length=64, max_prompt_length=32, heldout=200),
    eval=Eval(num_prompts=256, batch_size=256, seed=1234, every=20, judge="rlhf_recipes.corpus:is_positive"),
    run=Run(output_dir="runs/quickstart_dpo", seed=0, checkpoint_every=20, keep_checkpoints=2, max_bad_batches=3),
)
