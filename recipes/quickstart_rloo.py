"""The quickstart with RLOO instead of PPO, offline, on a CPU in minutes.

The PPO quickstart's own sections (SFT, reward model, prompts, reward, judge, sampling), and
REINFORCE Leave-One-Out in place of PPO: no value head, each response's baseline is the mean
reward of the other responses to its prompt, and beta times its log-ratio to the reference is
taken off its reward, as PPO's KL penalty is. The held-out evaluation is the PPO quickstart's.
"""
from rlhf_recipes import RLOO, Recipe, Run
from rlhf_recipes.recipes.quickstart import recipe as ppo

recipe = Recipe(
    name="quickstart_rloo",
    # the PPO quickstart's sections, not copies: a frontier trains the stages once for all methods
    policy=ppo.policy, sft=ppo.sft, reward_model=ppo.reward_model, reward=ppo.reward, prompts=ppo.prompts,
    generation=ppo.generation, eval=ppo.eval,
    # 32 prompts x 4 responses (k=4, as in Ahmadian et al. 2024): the 128 samples of a PPO
    # quickstart step. beta 0.05 is TRL's, a sequence-level penalty like PPO's init_kl_coef;
    # advantages are left unnormalized, as in the paper
    rloo=RLOO(learning_rate=5e-4, batch_size=32, num_generations=4, beta=0.05, normalize_advantages=False,
              reward_clip_range=None, epsilon=0.2, epsilon_high=None, temperature=1.0, num_iterations=1,
              gradient_accumulation_steps=1, max_grad_norm=1.0, lr_scheduler="linear", warmup_ratio=0.0,
              gradient_checkpointing=False, use_vllm=False),
    run=Run(output_dir="runs/quickstart_rloo", steps=50, seed=0, sample_every=10, sample_rows=4,
            checkpoint_every=20, keep_checkpoints=2, max_bad_batches=3),
)
