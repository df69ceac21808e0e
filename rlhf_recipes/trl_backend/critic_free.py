"""GRPO's and RLOO's TRL side: TRL 1.x's GRPOTrainer and RLOOTrainer set up from the recipe, and what
rlhf_recipes.loops.critic_free's own loop calls of them (sample and score a step, update on it).

TRL samples, scores and computes the loss; we choose the prompts, read the reward, and take the
optimizer steps, so that a step is a pure function of the seed and its number (for exact resume)
and a non-finite batch is skipped. The prompts are PPO's token ids, handed to TRL as they are
(a chat template already applied), and the reward sees exactly the texts PPO's reward would.
"""
from __future__ import annotations

from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

from ..components import compat
from ..components.reward import all_finite, reward_inputs
from ..components.rollout import decode_pairs
from ..config.methods import GRPO, RLOO, GroupSampled
from ..config.sections import Generation, RecipeError, Reward
from ..runtime import distributed
from ..runtime.trainer_state import load_trainer_state, trainer_state
from . import driven
from .stages import trainable_dtypes_kept


class _OurPrompts:
    """A trainer whose prompts are indices into `queries` (PPO's prompt token ids), tokenized by
    nothing: TRL would re-tokenize a decoded text, which need not give the same tokens back."""

    queries: list[torch.Tensor]  # set by make_trainer

    def _tokenize_prompts(self, prompts: list):
        return [self.queries[int(i)].tolist() for i in prompts], None, {}


class _GRPO(_OurPrompts, GRPOTrainer):
    pass


class _RLOO(_OurPrompts, RLOOTrainer):
    pass


class RecipeReward:
    """The recipe's reward in TRL's reward-function interface. A response is read from its token
    ids with the prompt's, as PPO reads it (rollout.decode_pairs), and a classifier's label is
    chosen by name (reward.label): TRL's own classifier path reads logits[:, 0], which for an IMDB
    sentiment model is NEGATIVE. Keeps its last call's prompts, responses and rewards, for the
    loop's non-finite check and sample tables."""

    __name__ = "reward"  # TRL names the function's metrics after it

    def __init__(self, reward_fn, cfg: Reward, tokenizer, queries: list[torch.Tensor]):
        self.reward_fn, self.cfg, self.tokenizer, self.queries = reward_fn, cfg, tokenizer, queries
        self.last: list[float] = []
        self.texts: tuple[list[str], list[str]] = ([], [])

    def __call__(self, prompts, completions, completion_ids, **_) -> list[float]:
        queries = [self.queries[int(i)] for i in prompts]
        responses = [torch.tensor(ids, dtype=torch.long) for ids in completion_ids]
        texts, answers = self.texts = decode_pairs(self.tokenizer, queries, responses)
        self.last = list(self.reward_fn(reward_inputs(self.cfg, texts, answers)))
        return self.last


def check_vllm(cfg: GroupSampled) -> None:
    """Refuse use_vllm, in one line, where it cannot run: without a CUDA GPU or the vllm package."""
    if not cfg.use_vllm:
        return
    if not torch.cuda.is_available():
        raise RecipeError(f"{cfg.section}.use_vllm=true needs a CUDA GPU, and this machine has none; "
                          f"set {cfg.section}.use_vllm=false to sample with transformers")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise RecipeError(f"{cfg.section}.use_vllm=true needs vLLM: pip install 'rlhf_recipes[vllm]', "
                          f"or set {cfg.section}.use_vllm=false")


def make_trainer(cfg: GroupSampled, gen: Generation, model, tokenizer, queries: list[torch.Tensor], reward: RecipeReward,
                 steps: int, seed: int, work_dir: Path, processes: int, deepspeed=None):
    """TRL's GRPOTrainer or RLOOTrainer for a PEFT `model` (the reference is `model` with its adapters
    off), the section passed through, an optimizer and schedule for `steps` of our steps (each
    cfg.num_iterations updates), and the log-probs it computes recorded (record_log_probs).
    deepspeed: a DeepSpeed launch's plugin (driven.ready)."""
    from datasets import Dataset

    from ..components.data import no_progress_bars

    samples = cfg.batch_size * cfg.num_generations  # shared equally by the processes (loops.critic_free.refuse)
    updates = steps * cfg.num_iterations
    common = dict(
        output_dir=str(work_dir), learning_rate=cfg.learning_rate, beta=cfg.beta, num_generations=cfg.num_generations,
        per_device_train_batch_size=samples // (processes * cfg.gradient_accumulation_steps),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        steps_per_generation=cfg.gradient_accumulation_steps, num_iterations=cfg.num_iterations,
        epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, temperature=cfg.temperature,
        max_completion_length=gen.response_max_tokens, top_k=gen.top_k, top_p=gen.top_p,
        max_steps=updates, max_grad_norm=cfg.max_grad_norm or 0.0, lr_scheduler_type=cfg.lr_scheduler,
        **compat.warmup(cfg.warmup_ratio), weight_decay=0.0, seed=seed, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, **driven.device_args(), disable_dropout=True,
        use_vllm=cfg.use_vllm, vllm_mode="colocate", log_completions=False, shuffle_dataset=False,
        # TRL 1.x's defaults turned these on: the policy's own dtype, and checkpointing as asked
        bf16=False, fp16=False, **compat.checkpointing_args(cfg.gradient_checkpointing))
    if isinstance(cfg, GRPO):
        cls, args = _GRPO, GRPOConfig(loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
                                      mask_truncated_completions=cfg.mask_truncated_completions, **common)
    else:
        assert isinstance(cfg, RLOO)
        cls, args = _RLOO, RLOOConfig(normalize_advantages=cfg.normalize_advantages,
                                      reward_clip_range=cfg.reward_clip_range, **common)
    rows = Dataset.from_dict({"prompt": [str(i) for i in range(len(queries))]})
    with no_progress_bars(), trainable_dtypes_kept(model):
        trainer = cls(model=model, reward_funcs=[reward], args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.queries = queries
    driven.ready(trainer, cfg.gradient_checkpointing, updates, deepspeed)
    trainer.current_gradient_accumulation_steps = cfg.gradient_accumulation_steps  # read by the losses
    record_log_probs(trainer)
    return trainer


def record_log_probs(trainer) -> None:
    """Keep every per-token log-prob tensor the trainer computes, with whether it was the reference's
    (adapters off) and whether it carried a graph: the sequence KL is read from them, at no cost."""
    original = trainer._get_per_token_logps_and_entropies
    lora = next(m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer))
    trainer.recorded = []

    def recorded(model, *args, **kwargs):
        out = original(model, *args, **kwargs)
        trainer.recorded.append((bool(lora.disable_adapters), torch.is_grad_enabled(), out[0].detach()))
        return out

    trainer._get_per_token_logps_and_entropies = recorded


def sample_and_score(trainer, indices: list[int], step: int) -> dict:
    """This process's share of step `step` (0-based): num_generations responses to each prompt of
    `indices` (all processes' prompts, in order), sampled, scored by the reward and the reference,
    and the advantages from each prompt's group; TRL's metrics of it stay in trainer._metrics."""
    n, (rank, processes) = trainer.num_generations, distributed.world()
    # the updates so far: vLLM's copy of the weights is refreshed when this moves (use_vllm)
    trainer.state.global_step = step * trainer.num_iterations
    rows = [{"prompt": str(i)} for i in indices for _ in range(n)]
    share = len(rows) // processes
    trainer.recorded.clear()
    for store in trainer._metrics.values():
        store.clear()
    trainer.model.train()  # dropout is off (TRL's disable_dropout); as TRL's own loop samples
    batch = trainer._generate_and_score_completions(rows[rank * share:(rank + 1) * share])
    batch["sequence_kl"] = _sequence_kl(trainer, batch)
    return batch


def _sequence_kl(trainer, batch: dict) -> torch.Tensor | None:
    """(n,) log pi(y|x) - log ref(y|x), summed over each response's tokens, for the step's samples
    when the sampling policy's log-probs are already known (RLOO, or GRPO with num_iterations > 1);
    None otherwise (GRPO reads them in its first loss pass), or with beta 0 (no reference pass)."""
    mask = batch["completion_mask"]
    policy = [lp for ref, grad, lp in trainer.recorded if not ref and not grad]
    reference = [lp for ref, grad, lp in trainer.recorded if ref]
    if not reference or not policy:
        return None
    return ((policy[0] - reference[0]) * mask).sum(1)


def update(trainer, batch: dict) -> dict[str, float] | None:
    """The step's num_iterations updates on `batch` (from sample_and_score), each in
    gradient_accumulation_steps passes, the gradients averaged over processes; returns the mean
    loss, the gradient norm and the learning rate, and the per-sequence KL of the samples as
    `sequence_kl`; or None, with nothing changed, when a reward, a loss or a gradient norm is not
    finite on any process."""
    kl = batch.pop("sequence_kl")
    if distributed.any_process(not all_finite(trainer.reward_funcs[0].last)):
        return None
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    state = _before_update(trainer)
    losses, norms, rates, kls = [], [], [], []
    for iteration in range(trainer.num_iterations):
        losses.append(0.0)
        # as TRL's _prepare_inputs: shuffled, then split into the accumulation passes
        chunks = split_tensor_dict(shuffle_sequence_dict(batch), trainer.args.steps_per_generation)
        for k, chunk in enumerate(chunks):
            trainer.recorded.clear()
            loss = trainer.compute_loss(trainer.model_wrapped, chunk)  # DeepSpeed's engine, or the model
            if distributed.any_process(not bool(torch.isfinite(loss))):
                return _undo(trainer, state)
            driven.backward(trainer, loss, last=k == len(chunks) - 1)
            losses[-1] += float(loss.detach())  # scaled by TRL so that the passes add up to the update's loss
            if kl is None and iteration == 0 and "ref_per_token_logps" in chunk:  # GRPO, before its first update
                logps = next(lp for _, grad, lp in trainer.recorded if grad)
                kls.append(((logps - chunk["ref_per_token_logps"]) * chunk["completion_mask"]).sum(1))
        stepped = driven.optimizer_step(trainer, params)
        if stepped is None:
            return _undo(trainer, state)
        norms.append(stepped[0])
        rates.append(stepped[1])
    if kl is None and kls:
        kl = torch.cat(kls)
    means = torch.tensor([sum(losses) / len(losses), float(kl.mean()) if kl is not None else 0.0], dtype=torch.float64)
    distributed.average([means])
    out = {"loss": float(means[0]), "grad_norm": sum(norms) / len(norms), "learning_rate": rates[0]}
    if kl is not None:
        out["sequence_kl"] = float(means[1])
    return out


def _before_update(trainer) -> dict | None:
    """What a step with num_iterations > 1 changes before its last check: kept to undo it."""
    return None if trainer.num_iterations == 1 else trainer_state(trainer)  # one update: after every check


def _undo(trainer, state: dict | None) -> None:
    driven.drop_gradients(trainer)
    if state is not None:
        load_trainer_state(trainer, state)
    return None


def metrics(method: str, trl: dict[str, list[float]]) -> dict[str, float]:
    """TRL's metrics of a step under our keys, once: reward -> env/reward_mean, reward_std ->
    env/reward_std, completions/mean_length -> env/response_length, and the rest under the method's
    namespace (grpo/policy/entropy, grpo/policy/clip_ratio/region_mean, grpo/frac_reward_zero_std,
    grpo/policy/kl_token: TRL's own per-token KL, k3 for GRPO and the log-ratio for RLOO).
    Running counts (num_tokens) and the per-function copies of the one reward are left out."""
    renamed = {"reward": "env/reward_mean", "reward_std": "env/reward_std",
               "completions/mean_length": "env/response_length", "kl": f"{method}/policy/kl_token",
               "entropy": f"{method}/policy/entropy"}
    out = {}
    for key, values in trl.items():
        if not values or key == "num_tokens" or key.startswith("rewards/"):
            continue
        if key.startswith("clip_ratio/"):
            name = f"{method}/policy/{key}"
        else:
            name = renamed.get(key, f"{method}/{key}")
        out[name] = sum(values) / len(values)
    return out

