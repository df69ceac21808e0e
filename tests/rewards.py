"""Reward functions for tests, importable as reward.function=rewards:NAME (tests/ is on sys.path)."""
import math


def nan_reward(texts):
    return [math.nan] * len(texts)


def length_reward(texts):
    return [len(t) / 50 for t in texts]
