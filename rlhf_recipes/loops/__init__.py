"""The training loops, in numbered steps: PPO (training.py), DPO (dpo.py), the stages before
them, SFT and a reward model (stages.py), and what the two loops share (session.py)."""
