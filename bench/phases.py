"""Where a PPO step of rlhf_recipes spends its time, phase by phase, measured from outside:
`profiled()` wraps the functions the loop calls (prompt selection, generation and what it
does around model.generate, decoding, the reward, the rollback snapshot, the PPO step, the
finiteness check, logging and the display) with timers, and leaves the code under test as it is.

    with profiled() as prof:
        result = train(recipe)
    prof.steps  # one {phase: seconds} per step, "wall" from this step's start to the next's

The PPO step is split further by its own `time/ppo/*` metrics (its two scoring passes, the
rewards and advantages, the minibatch updates, its statistics).
"""
from __future__ import annotations

import contextlib
import functools
import time

# (phase, module path, attribute): the loop's own references, so that wrapping them changes
# nothing else; generation's inner parts are patched in rlhf_recipes.components.rollout, which calls them
PATCHED = (
    ("prompt selection", "rlhf_recipes.loops.training", "batch_indices"),
    ("generate (all)", "rlhf_recipes.loops.training", "generate"),
    ("  padding", "rlhf_recipes.components.rollout", "pad_batch"),
    ("  cutting", "rlhf_recipes.components.rollout", "cut_response"),
    ("decoding", "rlhf_recipes.loops.training", "decode_pairs"),
    ("reward", "rlhf_recipes.loops.training", "reward_inputs"),  # wraps the call: reward_fn(reward_inputs(...)) below
    ("rollback snapshot", "rlhf_recipes.ppo", "Rollback.take"),
    ("PPO step (all)", "rlhf_recipes.ppo", "ppo_step"),
    ("finiteness check", "rlhf_recipes.ppo", "step_is_finite"),
    ("logging and display", "rlhf_recipes.loops.training", "record_step"),
    ("checkpoint check", "rlhf_recipes.loops.training", "checkpoint_or_stop"),
)
# the step's own time/ppo/* metrics (TRL 0.11.4's, which rlhf_recipes.ppo keeps), in both loops
STEP_PHASES = {"time/ppo/forward_pass": "  step: policy and reference scoring",
               "time/ppo/compute_rewards": "  step: rewards (KL penalty)",
               "time/ppo/compute_advantages": "  step: advantages",
               "time/ppo/optimize_step": "  step: minibatch updates",
               "time/ppo/calc_stats": "  step: statistics"}
# the order of the table: each phase followed by its parts
ORDER = [phase for phase, _, _ in PATCHED]
ORDER[ORDER.index("  cutting"):ORDER.index("  cutting")] = ["  model.generate"]
ORDER[ORDER.index("PPO step (all)") + 1:ORDER.index("PPO step (all)") + 1] = list(STEP_PHASES.values())


class Profile:
    def __init__(self):
        self.steps: list[dict] = []
        self._open: dict | None = None  # the step being timed: from its prompt selection to its checkpoint check
        self._started = 0.0

    def add(self, phase: str, seconds: float) -> None:
        if self._open is not None:  # evaluations before and after training are not steps
            self._open[phase] = self._open.get(phase, 0.0) + seconds


def _timed(prof: Profile, phase: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        if phase == "prompt selection":
            prof._open, prof._started = {}, t
        out = fn(*args, **kwargs)
        end = time.perf_counter()
        prof.add(phase, end - t)
        if phase == "PPO step (all)":
            for key, name in STEP_PHASES.items():
                prof.add(name, float(out.get(key, 0.0)))
        if phase == "checkpoint check" and prof._open is not None:
            prof._open["wall"] = end - prof._started
            prof.steps.append(prof._open)
            prof._open = None
        return out

    return wrapper


@contextlib.contextmanager
def profiled():
    """A Profile that the PPO loop fills while inside; the functions are restored after."""
    import importlib

    from rlhf_recipes.loops import session
    from rlhf_recipes.ppo.value_head import ValueHeadModel

    prof = Profile()
    saved = []
    for phase, module, name in PATCHED:
        owner = importlib.import_module(module)
        *path, name = name.split(".")  # a class's method: patched on the class
        for part in path:
            owner = getattr(owner, part)
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, _timed(prof, phase, getattr(owner, name)))
    # model.generate itself, and the reward model: called through objects, not module names
    generate = ValueHeadModel.generate
    saved.append((ValueHeadModel, "generate", generate))
    ValueHeadModel.generate = _timed(prof, "  model.generate", generate)
    load = session.build_reward
    saved.append((session, "build_reward", load))
    session.build_reward = lambda *a, **k: _timed(prof, "reward", load(*a, **k))
    try:
        yield prof
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)
