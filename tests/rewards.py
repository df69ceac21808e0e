"""Reward functions for tests, importable as reward.function=rewards:NAME (tests/ is on sys.path)."""
import json
import math
import os


def nan_reward(texts):
    return [math.nan] * len(texts)


def length_reward(texts):
    return [len(t) / 50 for t in texts]


def logged_length_reward(texts):
    """length_reward, and each call's texts appended to $REWARD_LOG.rank-$RANK as one JSON line."""
    with open(f"{os.environ['REWARD_LOG']}.rank-{os.environ.get('RANK', '0')}", "a") as log:
        log.write(json.dumps(list(texts)) + "\n")
    return length_reward(texts)


def nan_on_rank_1(texts):
    """Non-finite for the second process of a launch only: every process must still skip the batch."""
    return nan_reward(texts) if os.environ.get("RANK") == "1" else length_reward(texts)
