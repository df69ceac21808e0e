"""The recipe: typed, frozen, self-validating sections.

A recipe file builds one `Recipe` from these sections. Every section checks its own
fields when it is built (and again when a command-line override replaces a field), so a
bad value fails at start-up with an error that names the field, never mid-run.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from .section import RecipeError, Section, _positive, template_fields
from .methods import GRPO, RLOO
from .stages import DPO, SFT, RewardModel


# ---------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class Policy(Section):
    """The causal LM that PPO trains: a frozen base, LoRA adapters and a value head.

    The reference model is this same base with its adapters switched off, so it costs no
    second copy. Dropout is switched off in the base when it loads: PPO's ratio and the
    KL penalty assume that the policy that sampled is the policy that is scored.
    """

    section: typing.ClassVar[str] = "policy"
    model: str
    """Hub id or local directory of a causal LM."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """Load the frozen base in 8-bit or 4-bit (nf4) with bitsandbytes; LoRA and value head stay fp32."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the base weights (and of 4-bit compute). Adapters and value head are always fp32."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    """Must be 0: PPO scores the old log-probs and the KL without dropout, and a live dropout in
    the gradient pass would make the PPO ratio compare two different functions."""
    lora_target_modules: Optional[tuple[str, ...]] = None
    """Module names to adapt; none means PEFT's default for the architecture."""
    trust_remote_code: bool = False

    def check(self) -> None:
        self.require(bool(self.model.strip()), "model", "must name a Hub id or a local directory")
        _positive(self, "lora_r", "lora_alpha")
        self.require(self.lora_dropout == 0, "lora_dropout",
                     "must be 0: PPO's ratio and KL assume the policy that sampled is the one trained")
        self.require(not (self.dtype == "float16" and self.quantization == "none"), "dtype",
                     "float16 without quantization trains with no loss scaling, so small gradients underflow; "
                     "use policy.dtype=bfloat16 (or float32), or float16 with policy.quantization=8bit/4bit")
        self.require(self.lora_target_modules != (), "lora_target_modules", "must not be empty")


@dataclass(frozen=True)
class Reward(Section):
    """Turns generated texts into float rewards: a text classifier, or any Python callable.

    With a classifier, the reward is the score of the label named by `label`, looked up by
    name in the classifier's config (never by position: the HF text-classification
    pipeline sorts labels by score, which silently turns training into noise).
    """

    section: typing.ClassVar[str] = "reward"
    model: Optional[str] = None
    """Hub id or local directory of a sequence-classification model."""
    label: Optional[str] = None
    """Label whose score is the reward; may be none only for a single-output classifier."""
    function: Union[str, Callable, None] = None
    """Instead of a classifier: a callable (list of texts -> list of floats) or 'module:function'."""
    score: Literal["logit", "probability"] = "logit"
    scale: float = 1.0
    """The reward is scale * score; a negative scale flips the sign."""
    input: Literal["prompt+response", "response"] = "prompt+response"
    batch_size: int = 32
    max_length: Optional[int] = None
    """Truncate texts to this many classifier tokens; none means the classifier's own limit."""
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """The classifier's dtype; none means policy.dtype (stated, so transformers 4.57 and 5.x, which
    load a checkpoint in fp32 and in its own dtype, score alike)."""
    quantization: Optional[Literal["none", "8bit", "4bit"]] = None
    """Load the classifier in 8-bit or 4-bit; none means policy.quantization."""

    def check(self) -> None:
        if self.model and self.function is not None:
            raise RecipeError(f"reward takes reward.model (a classifier) or reward.function (a callable), not both; "
                              f"got model={self.model!r}, function={self.function!r}: to use the function, "
                              "also set reward.model=none (or reward.function=none to keep the classifier)")
        self.require(self.scale != 0 and math.isfinite(self.scale), "scale", "must be a finite non-zero number")
        _positive(self, "batch_size", "max_length")
        if isinstance(self.function, str):
            self.require(":" in self.function, "function", "must look like 'package.module:function'")


@dataclass(frozen=True)
class Prompts(Section):
    """Prompts from `datasets`: a Hub id or local csv/json/jsonl/parquet file(s).

    Each prompt is the first N tokens of a text, N drawn uniformly from
    [query_min_tokens, query_max_tokens]. The first `eval.num_prompts` prompts of a
    seeded shuffle are held out for evaluation and never trained on.
    """

    section: typing.ClassVar[str] = "prompts"
    dataset: str
    split: str = "train"
    subset: Optional[str] = None
    """The dataset's configuration name, for Hub datasets that have several."""
    text_column: str = "text"
    """Column holding the text; a dotted path reads a nested field (e.g. 'prompt.text')."""
    filter: Union[str, Callable, None] = None
    """Keep only rows (dicts) for which this returns true: a callable or 'module:function'."""
    query_min_tokens: int = 2
    query_max_tokens: int = 8
    max_prompts: Optional[int] = None
    """Use at most this many prompts after filtering (quick runs); none means all."""
    template: Optional[str] = None
    """A format string over dataset columns that makes each prompt, e.g.
    'Summarize the following conversation.\n\n{dialogue}\n\nSummary:'; none means text_column."""
    max_source_tokens: int = 512
    """Encoder-decoder policies: the prompt (the encoder's input) is the whole text, cut to this
    many tokens with its EOS kept; query_min/max_tokens are for causal policies."""
    chat_template: bool = False
    """Instruct models: each prompt (cut to its query length first) becomes the user's turn of a
    conversation in the tokenizer's own chat template, with the assistant's turn opened, and the
    policy writes the reply. Used alike by training (every method), evaluation, sample and
    interpret. The decoded prompt then includes the template's text (role names), so a classifier
    usually reads the reply alone (reward.input=response)."""
    system: Optional[str] = None
    """With chat_template: a system message before the user's turn; none means the template's own default."""

    def check(self) -> None:
        template_fields(self, "template")
        self.require(self.system is None or self.chat_template, "system",
                     "is put into the chat template: set prompts.chat_template=true too, or leave this none")
        self.require(self.system is None or bool(self.system.strip()), "system", "must not be empty; use none")
        _positive(self, "max_source_tokens")
        self.require(bool(self.dataset.strip()), "dataset", "must name a Hub dataset or local file(s)")
        self.require(bool(self.text_column.strip()), "text_column", "must name a column")
        _positive(self, "query_min_tokens", "max_prompts")
        if isinstance(self.filter, str):
            self.require(":" in self.filter, "filter", "must look like 'package.module:function'")
        self.require(self.query_max_tokens >= self.query_min_tokens, "query_max_tokens",
                     f"must be >= prompts.query_min_tokens ({self.query_min_tokens})")


@dataclass(frozen=True)
class Generation(Section):
    """How responses are sampled: plain sampling, batched.

    There is deliberately no min_new_tokens or no_repeat_ngram_size: both reshape the
    sampling distribution away from the policy's, which makes the sampled KL negative.
    Each response's length is drawn from [response_min_tokens, response_max_tokens];
    a batch is generated once to the longest and each response is cut to its own length.
    """

    section: typing.ClassVar[str] = "generation"
    response_min_tokens: int
    response_max_tokens: int
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    batch_size: Optional[int] = None
    """Prompts per generate call; none means the whole PPO batch at once."""
    compile: bool = False
    """Sample with transformers' static KV cache and the decoding step compiled (torch.compile;
    CUDA graphs on a GPU). Each new batch shape costs a compilation (about 20 s on a 2-core CPU),
    so prompts are padded to a multiple of 8 tokens and every batch runs to
    generation.response_max_tokens, which keeps the shapes few. On a 2-core CPU it sampled a
    batch of 64 in 0.80x the time on the tiny shape and 0.92x on GPT-2 small: worth it for long
    runs, not for a minute's (bench/RESULTS.md). The samples for a seed differ from the
    uncompiled ones in rare tokens, as the logits differ in their last bits."""

    def check(self) -> None:
        _positive(self, "response_min_tokens", "temperature", "batch_size")
        self.require(self.response_max_tokens >= self.response_min_tokens, "response_max_tokens",
                     f"must be >= generation.response_min_tokens ({self.response_min_tokens})")
        self.require(self.top_k >= 0, "top_k", "must be >= 0 (0 disables top-k)")
        self.require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")


@dataclass(frozen=True)
class PPO(Section):
    """Classic PPO (rlhf_recipes.ppo): TRL 0.11.4's PPOConfig, field for field, same names and meanings.

    The fields without a default must be set by every recipe: TRL's own defaults changed
    between versions (batch 256 / mini-batch 1 once, 128 / 128 later). The rest default to
    TRL 0.11.4's values.
    """

    section: typing.ClassVar[str] = "ppo"
    learning_rate: float
    batch_size: int
    mini_batch_size: int
    ppo_epochs: int
    adap_kl_ctrl: bool
    init_kl_coef: float
    target: float
    """Adaptive KL: the per-sequence KL the controller steers towards."""
    horizon: float
    """Adaptive KL: counted in samples. The coefficient moves by a factor of at most
    1 + 0.2 * batch / horizon a step (batch 128, horizon 10000: 0.26%); the run prints the most
    it can move over all its steps, and warns when that is under 2x."""
    gamma: float
    lam: float
    cliprange: float
    cliprange_value: float
    vf_coef: float
    entropy_coef: float = 0.0
    """c2 in L = L_clip + vf_coef * L_value - c2 * H: a bonus for the mean token entropy of the
    responses, which keeps the policy from collapsing onto a few phrasings (not in TRL 0.11.4:
    added by rlhf_recipes, logged as ppo/loss/entropy). 0 is TRL 0.11.4's objective."""
    gradient_accumulation_steps: int = 1
    kl_penalty: Literal["kl", "abs", "mse", "full"] = "kl"
    max_grad_norm: Optional[float] = None
    early_stopping: bool = False
    target_kl: float = 1.0
    ratio_threshold: float = 10.0
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: Optional[float] = None
    whiten_rewards: bool = False
    gradient_checkpointing: bool = False
    length_buckets: int = 1
    """Each scoring and minibatch pass runs as this many forward passes over rows of similar
    length, each padded only to its own longest (not in TRL 0.11.4: added by rlhf_recipes). 1 is TRL's
    one pass padded to the longest. More pays off where compute, not the number of calls,
    limits a pass: on a 2-core CPU, 2 made GPT-2 small's step 25% faster with mini-batch 64,
    2% with 16, and the tiny shape's 28% slower with 16 (bench/RESULTS.md). It changes the
    log-probs in their last bits (about 1e-6), as kernels differ with the padded width."""
    pack_rows: bool = True
    """Each scoring and minibatch pass lays its rows end to end, each sequence at positions 0, 1,
    ... of its own, so that no padding is computed (not in TRL: added by rlhf_recipes). Prompts
    of 2-8 tokens and responses of 4-16 padded to the longest are over a third padding: on a
    2-core CPU, packing made GPT-2 small's whole step 24% faster with mini-batch 64 and 20% with
    16, the tiny shape's 4-6% (bench/RESULTS.md). Used only where a start-up check finds that
    the model keeps packed rows apart (transformers' packed-sequence masks, from the position
    ids: GPT-2, GPT-NeoX, Llama and most others; GPT-Neo on transformers 5); otherwise, and for
    encoder-decoders, the run pads as TRL 0.11.4 did, and says why. An 8-bit base moves each row's
    numbers slightly with its neighbours, padded or packed alike (LLM.int8 picks its outlier
    columns over the whole batch), which the check allows. The log-probs move in their last bits (about 1e-6, as kernels differ with the
    shapes), the policy's and the reference's alike: the KL is still exactly 0 before the first
    update, and a seed still gives the same run. false gives TRL 0.11.4's scoring passes bit for bit."""

    def check(self) -> None:
        _positive(self, "learning_rate", "batch_size", "mini_batch_size", "ppo_epochs", "length_buckets",
                  "gradient_accumulation_steps", "target", "horizon", "cliprange",
                  "cliprange_value", "max_grad_norm", "score_clip", "target_kl", "ratio_threshold")
        self.require(0 <= self.init_kl_coef < math.inf, "init_kl_coef", "must be finite and >= 0")
        self.require(0 <= self.vf_coef < math.inf, "vf_coef", "must be finite and >= 0")
        self.require(0 <= self.entropy_coef < math.inf, "entropy_coef", "must be finite and >= 0")
        self.require(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        self.require(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        self.require(self.use_score_scaling or not self.use_score_norm, "use_score_norm",
                     "does nothing without ppo.use_score_scaling; set that true too, or leave this false")
        self.require(not (self.pack_rows and self.length_buckets > 1), "length_buckets",
                     "must be 1 with ppo.pack_rows, which already leaves out all padding; "
                     "set ppo.pack_rows=false to bucket instead")
        step = self.mini_batch_size * self.gradient_accumulation_steps
        self.require(self.batch_size % step == 0, "batch_size",
                     f"must be a multiple of ppo.mini_batch_size * ppo.gradient_accumulation_steps ({step})")

    def kl_coef_reach(self, steps: int, processes: int = 1) -> float:
        """The largest factor by which adaptive KL can move the coefficient over `steps` steps.

        The controller (TRL 0.11.4's) multiplies it by 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon a
        step, n the samples of the step (all processes'): at most (1 + 0.2 n / horizon) ** steps
        up, and as far down. 1.0 with a fixed coefficient.
        """
        if not self.adap_kl_ctrl:
            return 1.0
        return (1 + 0.2 * self.batch_size * processes / self.horizon) ** steps


@dataclass(frozen=True)
class Eval(Section):
    """Evaluation on held-out prompts (the evaluation module fills this section in)."""

    section: typing.ClassVar[str] = "eval"
    num_prompts: int = 256
    """Prompts held out from training for evaluation."""
    batch_size: int = 64
    seed: int = 1234
    every: int = 0
    """Also evaluate every N PPO steps; 0 means only before and after training."""
    judge: Union[str, Callable, None] = None
    """A yes/no check of each response text (e.g. 'is it positive?'), a callable or
    'module:function'; evaluation reports the share of responses that pass."""

    def check(self) -> None:
        _positive(self, "num_prompts", "batch_size")
        self.require(self.every >= 0, "every", "must be >= 0")
        self.require(0 <= self.seed < 2 ** 32, "seed", "must be in [0, 2**32)")
        if isinstance(self.judge, str):
            self.require(":" in self.judge, "judge", "must look like 'package.module:function'")


@dataclass(frozen=True)
class Run(Section):
    """Where outputs go, how long to train, and what to show."""

    section: typing.ClassVar[str] = "run"
    output_dir: str
    steps: Optional[int] = None
    """PPO steps, each of ppo.batch_size prompts (a PPO recipe must set it). DPO counts its
    steps from dpo.epochs; set here, it stops sooner."""
    seed: int = 0
    sample_every: int = 10
    """Print a table of samples every N steps (0: only at the end); PPO only."""
    sample_rows: int = 4
    overwrite: bool = False
    """Allow writing into a non-empty output directory (its old contents are removed)."""
    checkpoint_every: int = 25
    """Write a checkpoint every N PPO steps; one is also written at the end and when stopped."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    max_bad_batches: int = 3
    """Stop, with a checkpoint of the last good state, after this many batches in a row
    with non-finite rewards or losses (each one is skipped and rolled back)."""
    report_to: Union[str, tuple[str, ...]] = "none"
    """Experiment trackers, as in transformers: none, tensorboard, wandb, trackio, or several
    (comma-separated). Logs go to OUTPUT_DIR/trackers; each needs its own pip package."""
    run_name: Optional[str] = None
    """The run's name in the trackers; none means the recipe's name."""
    threads: Optional[int] = None
    """CPU threads for torch in each process. None: the CPUs this process may use
    (os.sched_getaffinity, divided between the processes of one machine), or OMP_NUM_THREADS
    where set. On a machine already busy with other work, fewer threads than CPUs avoids threads
    spinning at barriers; the run says so at start-up. Results can differ in their last bits
    with the thread count, so resume with the same one."""

    def check(self) -> None:
        if isinstance(self.report_to, str):
            object.__setattr__(self, "report_to", tuple(n.strip() for n in self.report_to.split(",") if n.strip()))
        unknown = [n for n in self.report_to if n not in ("none", "tensorboard", "wandb", "trackio")]
        self.require(not unknown and bool(self.report_to), "report_to",
                     "must be none, tensorboard, wandb or trackio (comma-separated for several)")
        self.require(bool(self.output_dir.strip()), "output_dir", "must name a directory")
        _positive(self, "steps", "sample_rows", "checkpoint_every", "keep_checkpoints", "max_bad_batches", "threads")
        self.require(0 <= self.seed < 2 ** 32, "seed", "must be in [0, 2**32)")
        self.require(self.sample_every >= 0, "sample_every", "must be >= 0")


SECTIONS: dict[str, type] = {c.section: c for c in (Policy, Reward, Prompts, Generation, PPO, DPO, GRPO, RLOO, Eval,
                                                     Run, SFT, RewardModel)}
PATH_FIELDS = {"policy": ("model",), "reward": ("model",), "prompts": ("dataset",), "sft": ("dataset",),
               "reward_model": ("dataset", "model"), "dpo": ("dataset",)}
"""Fields that name a model or dataset: a Hub id, or a local path."""
STAGES = ("sft", "reward_model")
"""Optional sections: stages that run, in this order, before PPO (or DPO)."""
METHODS = ("ppo", "dpo", "grpo", "rloo")
"""The training sections: a recipe has exactly one."""
SAMPLING_METHODS = ("ppo", "grpo", "rloo")
"""The methods that learn from the policy's own samples, a step at a time: they count run.steps."""


@dataclass(frozen=True)
class Recipe:
    """A whole run: what to train, against what reward, on which prompts, and how.

    The training method is the section the recipe gives, `ppo`, `dpo`, `grpo` or `rloo`: their
    fields have little in common, so a method switch would leave half of each unused. Whichever
    it is, the reward scores the evaluation, and `generation` samples it from the held-out prompts.
    """

    name: str
    policy: Policy
    reward: Reward
    prompts: Prompts
    generation: Generation
    run: Run
    ppo: Optional[PPO] = None
    dpo: Optional[DPO] = None
    grpo: Optional[GRPO] = None
    rloo: Optional[RLOO] = None
    eval: Eval = field(default_factory=Eval)
    sft: Optional[SFT] = None
    reward_model: Optional[RewardModel] = None

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls) and not (value is None and name in STAGES + METHODS):
                raise RecipeError(f"recipe.{name} must be a {cls.__name__}(...) section, got {type(value).__name__}")
        given_methods = [m for m in METHODS if getattr(self, m) is not None]
        if len(given_methods) != 1:
            raise RecipeError("a recipe trains with ppo=PPO(...), dpo=DPO(...), grpo=GRPO(...) or rloo=RLOO(...): "
                              "give exactly one" + (f", not {' and '.join(given_methods)} (recipe {self.name!r})"
                                                    if given_methods else ""))
        if self.method in SAMPLING_METHODS and self.run.steps is None:
            raise RecipeError(f"run.steps is required with {self.method.upper()}: how many steps to take")
        given = [k for k in ("model", "function") if getattr(self.reward, k) not in ("", None)]
        if self.reward_model is not None and given:
            raise RecipeError(f"reward.{given[0]} must be unset: the reward_model stage provides the reward")
        if self.reward_model is None and not given:
            raise RecipeError("reward needs reward.model (a classifier) or reward.function (a callable), "
                              "or a reward_model stage in the recipe")

    @property
    def method(self) -> str:
        """The training section's name: ppo, dpo, grpo or rloo."""
        return next(m for m in METHODS if getattr(self, m) is not None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; callables become 'module:qualname' strings."""
        out: dict[str, Any] = {"name": self.name}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = None if section is None else {
                f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
        return out


def _plain(value: Any) -> Any:
    if callable(value):
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', repr(value))}"
    return list(value) if isinstance(value, tuple) else value
