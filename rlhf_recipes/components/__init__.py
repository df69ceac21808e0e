"""What a recipe builds: the policy (policy.py, seq2seq.py for encoder-decoders), the reward
(reward.py), the prompts and preference data (data.py), sampling (rollout.py), the maths of
PPO's scoring passes (token_scores.py), and loading from the Hub or disk (loading.py, with
compat.py for the transformers versions)."""
