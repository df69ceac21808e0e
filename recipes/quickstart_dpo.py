"""The quickstart with DPO instead of a reward model and PPO, offline, on a CPU in minutes.

The same SFT stage and the same preference pairs, split where each pair parts (the shared
opening is the prompt): DPO trains the policy on them directly. The reward model is still
trained, but only to judge: it and the opinion-word judge score the held-out prompts'
samples exactly as they score the PPO quickstart, so the two runs compare on one scale.
"""
from rlhf_recipes import DPO, Recipe, Run
from rlhf_recipes.corpus import QUICKSTART
from rlhf_recipes.recipes.quickstart import recipe as ppo

recipe = Recipe(
    name="quickstart_dpo",
    # the PPO quickstart's own sections, not copies: the same policy, stages, held-out prompts,
    # reward, judge and sampling, so the two compare and a frontier trains the stages once
    policy=ppo.policy, sft=ppo.sft, reward_model=ppo.reward_model, reward=ppo.reward, prompts=ppo.prompts,
    generation=ppo.generation, eval=ppo.eval,
    # the answers carry no leading space: the join is the recipe's to choose. beta 0.1 is the
    # DPO paper's; a learning rate this high suits LoRA on a 0.4M-parameter model, not a real one
    dpo=DPO(dataset=str(QUICKSTART / "preferences.jsonl"), separator=" ", beta=0.1, loss_type="sigmoid",
            label_smoothing=0.0, rpo_alpha=None, learning_rate=5e-4, epochs=1.0, batch_size=32,
            gradient_accumulation_steps=1, max_grad_norm=1.0, lr_scheduler="linear", warmup_ratio=0.1,
            max_length=64, max_prompt_length=32, heldout=200, gradient_checkpointing=False),
    run=Run(output_dir="runs/quickstart_dpo", seed=0, checkpoint_every=20, keep_checkpoints=2, max_bad_batches=3),
)
