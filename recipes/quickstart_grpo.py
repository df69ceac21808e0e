"""The quickstart with GRPO instead of PPO, offline, on a CPU in minutes.

The PPO quickstart's own sections (SFT, reward model, prompts, reward, judge, sampling), and
GRPO in place of PPO: no value head to train, the baseline of each response is the mean reward
of the other responses to its prompt, and the advantage is divided by their spread. The held-out
evaluation is the PPO quickstart's, so the two runs compare on one scale.
"""
from rlhf_recipes import GRPO, Recipe, Run
from rlhf_recipes.recipes.quickstart import recipe as ppo

recipe = Recipe(
    name="quickstart_grpo",
    # the PPO quickstart's sections, not copies: a frontier trains the stages once for all methods
    policy=ppo.policy, sft=ppo.sft, reward_model=ppo.reward_model, reward=ppo.reward, prompts=ppo.prompts,
    generation=ppo.generation, eval=ppo.eval,
    # 16 prompts x 8 responses: the 128 samples of a PPO quickstart step. beta is set, not left at
    # TRL's 0, which would drop the reference; 0.04 is the GRPO paper's. The "grpo" loss averages
    # each response's tokens, then the responses, as the paper does; "group" scaling is its
    # advantage. One update a step: the samples are the current policy's, so the ratio is 1 and
    # the clip range only matters from num_iterations=2
    grpo=GRPO(learning_rate=5e-4, batch_size=16, num_generations=8, beta=0.04, loss_type="grpo",
              scale_rewards="group", epsilon=0.2, epsilon_high=None, temperature=1.0, num_iterations=1,
              gradient_accumulation_steps=1, max_grad_norm=1.0, lr_scheduler="linear", warmup_ratio=0.0,
              mask_truncated_completions=False, gradient_checkpointing=False, use_vllm=False),
    run=Run(output_dir="runs/quickstart_grpo", steps=50, seed=0, sample_every=10, sample_rows=4,
            checkpoint_every=20, keep_checkpoints=2, max_bad_batches=3),
)
