"""The evaluation, written for machines and people: eval.json, report.md and two plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..config.sections import Generation
from ..runtime.rundir import EVAL, MODEL, RECIPE, REPORT
from ..runtime.startup import sampling_note

ROWS = [("reward", "reward"), ("kl", "KL(policy ‖ ref), nats"), ("length", "response length (tokens)"),
        ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("entropy", "mean token entropy")]


def num(x: float, digits: int = 3) -> str:
    """`x` to `digits` places, with no minus sign on a value that rounds to zero ("0.000", not "-0.000")."""
    return f"{round(x, digits) + 0.0:.{digits}f}"


def _cell(stat: dict | None) -> str:
    if not stat or not math.isfinite(stat["mean"]):
        return "-"
    lo, hi = stat["ci95"]
    return f"{num(stat['mean'])} ± {num((hi - lo) / 2)}" if math.isfinite(lo) else num(stat["mean"])


def reward_gain(result: dict) -> float:
    """How far the mean reward moved during training, in reference standard deviations."""
    b, a = result["before"], result["after"]
    std = a["reference"]["reward"]["std"]
    return (a["policy"]["reward"]["mean"] - b["policy"]["reward"]["mean"]) / std if std > 0 else math.nan


def summary_line(result: dict) -> str:
    """One line: reward before -> after with the paired improvement, KL, win rate and any judge."""
    b, a = result["before"], result["after"]
    imp = a["reward_improvement"]
    judged = (f"{a['judge']} {b['policy']['judged']['mean']:.0%} -> {a['policy']['judged']['mean']:.0%} | "
              if a.get("judge") else "")
    signed = lambda x: ("+" if round(x, 3) >= 0 else "") + num(x)  # noqa: E731
    return (f"reward {num(b['policy']['reward']['mean'])} -> {num(a['policy']['reward']['mean'])} "
            f"({reward_gain(result) + 0.0:+.1f} ref std; improvement {signed(imp['mean'])}, "
            f"95% CI {signed(imp['ci95'][0])}..{signed(imp['ci95'][1])}) | {judged}"
            f"KL {num(a['policy']['kl']['mean'])} | win rate {a['win_rate']['mean']:.2f} | "
            f"{a['num_prompts']} held-out prompts")


def markdown(result: dict, note: str | None = None) -> str:
    b, a = result["before"], result["after"]
    lines = [f"# {result['recipe']}: evaluation on {a['num_prompts']} held-out prompts", "",
             f"Policy before training (step {b['step']}) and after (step {a['step']}), each against the "
             "frozen reference (the same model, adapters off), sampling with the same seed. "
             "Cells are mean ± the half-width of a 95% confidence interval.", "",
             *([f"**Note:** {note}.", ""] if note else []),
             "| metric | reference | policy before | policy after | change |", "|---|---|---|---|---|"]
    rows = ROWS + ([("judged", f"share judged {a['judge']}")] if a.get("judge") else [])
    for key, label in rows:
        before, after = b["policy"].get(key), a["policy"].get(key)
        change = f"{after['mean'] - before['mean']:+.3f}" if before and after else "-"
        lines.append(f"| {label} | {_cell(a['reference'].get(key))} | {_cell(before)} | {_cell(after)} | {change} |")
    lines += [f"| reward improvement over reference (paired) | | {_cell(b['reward_improvement'])} | "
              f"{_cell(a['reward_improvement'])} | |",
              f"| win rate over reference | | {_cell(b['win_rate'])} | {_cell(a['win_rate'])} | |", "",
              *_pair_lines(b, a),
              "![training](training.png)", "", "![rewards before and after](reward_hist.png)", "",
              "## Samples after training", "",
              "| prompt | reference | policy | reward (ref) | reward (policy) |", "|---|---|---|---|---|"]
    clean = lambda t: t.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    for s in a["samples"]:
        lines.append(f"| {clean(s['prompt'])} | {clean(s['reference'])} | {clean(s['policy'])} | "
                     f"{s['reference_reward']:.3f} | {s['policy_reward']:.3f} |")
    return "\n".join(lines) + "\n"


def _pair_lines(before: dict, after: dict) -> list[str]:
    """A DPO run's own metrics on its held-out preference pairs, before and after, if it has them."""
    b, a = before.get("heldout_pairs"), after.get("heldout_pairs")
    if not (a and b):
        return []
    return [f"DPO's own metrics on its held-out preference pairs (log-ratios on the dataset's answers, not "
            f"samples): accuracy {b['rewards/accuracies']:.1%} -> {a['rewards/accuracies']:.1%} (a tie counts as "
            f"wrong), margin {num(b['rewards/margins'])} -> {num(a['rewards/margins'])}, "
            f"loss {num(b['loss'])} -> {num(a['loss'])}.", ""]


def plot(out: Path, result: dict, metrics: list[dict]) -> None:
    """training.png: reward, KL (with the adaptive controller's target) and KL coefficient per step,
    with the held-out evaluations; reward_hist.png: rewards before vs after."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    recipe = json.loads((out / RECIPE).read_text()) if (out / RECIPE).exists() else {}
    dpo = bool(recipe.get("dpo"))  # no sampled batches to plot: DPO's own margin on its training pairs instead
    panels = ([(None, "reward (held-out samples)"), (None, "KL (held-out samples)"),
               ("rewards/margins", "DPO margin (training pairs)")] if dpo else
              [("env/reward_mean", "reward"), ("objective/kl", "KL: training batch, and held-out samples"),
               ("objective/kl_coef", "KL coefficient")])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    steps = [m["step"] for m in metrics]
    for ax, (key, title) in zip(axes, panels):
        if key is not None:
            ax.plot(steps, [m.get(key, math.nan) for m in metrics], marker="." if len(steps) < 50 else None,
                    label="training batch")
        ax.set_title(title)
        ax.set_xlabel(f"{next((m.upper() for m in ('dpo', 'grpo', 'rloo') if recipe.get(m)), 'PPO')} step")
    evals = [result["before"], *result.get("during", []), result["after"]]
    for ax, key in zip(axes, ("reward", "kl")):
        ax.plot([e["step"] for e in evals], [e["policy"][key]["mean"] for e in evals], "s--", label="held-out eval")
    if (recipe.get("ppo") or {}).get("adap_kl_ctrl"):  # the KL the adaptive controller steers towards
        axes[1].axhline(recipe["ppo"]["target"], color="grey", linestyle=":", label="target")
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    before, after = result["before"]["per_sample"]["policy_reward"], result["after"]["per_sample"]["policy_reward"]
    ax.hist([before, after], bins=30, label=["before", "after"], alpha=0.8)
    ax.set_xlabel("reward")
    ax.set_ylabel("held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_hist.png", dpi=100)
    plt.close(fig)


def model_card(result: dict, recipe: dict, model_dir: Path) -> str:
    """model/README.md: what the adapter is, what it was trained against, how it scored, how to load it."""
    b, a = result["before"], result["after"]
    policy, reward, stages = recipe["policy"], recipe["reward"], [s for s in ("sft", "reward_model") if recipe.get(s)]
    judged = (f"| share judged {a['judge']} | {_cell(b['policy']['judged'])} | {_cell(a['policy']['judged'])} |\n"
              if a.get("judge") else "")
    base = (f"the sft stage's output `{(model_dir.parent / 'stages' / 'sft').absolute()}`, fine-tuned from "
            f"`{policy['model']}`" if recipe.get("sft") else f"`{policy['model']}`")
    rewarded_by = (f"`{reward['model']}`, label `{reward['label']}`" if reward.get("model") else
                   f"`{reward['function']}`" if reward.get("function") else "the reward model trained in its stage")
    method = next((m.upper() for m in ("dpo", "grpo", "rloo") if recipe.get(m)), "PPO")
    if recipe.get("dpo"):
        rewarded_by = f"preference pairs from `{recipe['dpo']['dataset']}`; evaluated with " + rewarded_by
    head = ("The value head PPO trained is in `value_head.safetensors`; it is not needed to generate." if method == "PPO"
            else f"{method} trains no value head, so there is none here.")
    return (f"# {recipe['name']}: a LoRA adapter trained with {method}\n\n"
            f"Made by rlhf_recipes from the recipe `{recipe['name']}`"
            f"{' after its ' + ' and '.join(stages) + ' stage' + ('s' if len(stages) > 1 else '') if stages else ''}. "
            f"Base model: {base}{' (' + policy['quantization'] + ')' if policy['quantization'] != 'none' else ''}"
            f", as recorded in `adapter_config.json`. Reward: {rewarded_by} (input: {reward['input']}). "
            f"{head}\n\n"
            f"## Held-out evaluation ({a['num_prompts']} prompts never trained on)\n\n"
            f"| | before (the reference) | after {method} |\n|---|---|---|\n"
            f"| reward | {_cell(b['policy']['reward'])} | {_cell(a['policy']['reward'])} |\n"
            f"| KL(policy ‖ reference), nats | {_cell(b['policy']['kl'])} | {_cell(a['policy']['kl'])} |\n"
            f"{judged}| win rate over the reference | | {_cell(a['win_rate'])} |\n\n"
            "Mean ± the half-width of a 95% interval; see the run's `report.md` for the rest.\n\n"
            "## Load it\n\n```python\nfrom peft import AutoPeftModelForCausalLM\n"
            "from transformers import AutoTokenizer\n\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({str(model_dir.absolute())!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(model_dir.absolute())!r})\n```\n")


KEPT = ("<!-- interpret -->", "<!-- /interpret -->")
"""The markers of report.md's interpretability section (rlhf_recipes.interpret), which a rewrite keeps."""


def write_report(out: Path, result: dict, metrics: list[dict]) -> None:
    """eval.json always; report.md, the plots and the model card once there is an 'after'."""
    (out / EVAL).write_text(json.dumps(result, indent=1) + "\n")
    if result.get("after"):
        recipe = json.loads((out / RECIPE).read_text()) if (out / RECIPE).exists() else {}
        gen = recipe.get("generation")
        old = (out / REPORT).read_text() if (out / REPORT).exists() else ""
        begin, end = KEPT
        kept = old[old.index(begin):old.index(end) + len(end)] + "\n" if begin in old and end in old else ""
        (out / REPORT).write_text(markdown(result, sampling_note(Generation(**gen)) if gen else None)
                                  + ("\n" + kept if kept else ""))
        plot(out, result, metrics)
        if recipe and (out / MODEL).is_dir():
            (out / MODEL / "README.md").write_text(model_card(result, recipe, out / MODEL))
