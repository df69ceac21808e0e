"""The training loops, in numbered steps: PPO (training.py), DPO (dpo.py), GRPO and RLOO
(critic_free.py), the stages before them, SFT and a reward model (stages.py), and what the loops
share (session.py)."""
