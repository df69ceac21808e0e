"""The reward-KL frontier: PPO, DPO, GRPO and RLOO (or any recipes) on one task, by the same evaluation.

    python -m rlhf_recipes.frontier OUT \\
        --sweep quickstart ppo.target=2,4,8 --sweep quickstart_dpo dpo.beta=0.5,0.1,0.02 \\
        --sweep quickstart_grpo grpo.beta=0.2,0.04 [--set eval.every=10 ...] [--best-of 1,2,4,8,16]

Each --sweep takes a recipe, the one field that trades reward against KL with its values
(PPO: ppo.target, or ppo.init_kl_coef with ppo.adap_kl_ctrl=false; DPO: dpo.beta; GRPO and
RLOO: grpo.beta, rloo.beta), and any
fixed overrides; --set applies to every recipe. Every point is a normal run, evaluated as
always: the recipe's reward and KL(policy || reference) of the policy's own samples on the
held-out prompts, with 95% intervals, after training and at each eval.every step.

    OUT/<recipe>/<field>=<value>/   each point's run directory
    OUT/stages/                     the stages every point shares (trained once while inputs agree)
    OUT/frontier.json, frontier.png reward (and judged share) against KL, one curve per sweep
    OUT/best_of_n.json              the baseline, reused while N and the reference are unchanged

A finished point is reused, a stopped one resumed, and a failing one recorded while the
others go on. Best-of-N sampling from the reference is the training-free baseline: the
expected reward of the best of N samples (the unbiased estimate from the largest N drawn),
at its analytic KL of log N - (N-1)/N. The points compare only if they share the held-out
prompts, the reference and the reward: frontier.json says whether the reference's rewards,
which depend on all three, agree.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .components.loading import first_line
from .config.recipe import apply_overrides, load_recipe
from .config.sections import Recipe, RecipeError
from .reporting.console import console
from .reporting.metrics import best_of_n_kl, expected_best_of, summarize
from .cli import OneLineParser
from .runtime.rundir import EVAL, RECIPE, STAGES, check_same_recipe
from .runtime.stopping import RunStopped

FRONTIER, FIGURE = "frontier.json", "frontier.png"


@dataclass(frozen=True)
class Point:
    """One run of a sweep: a recipe with one field set to one value."""

    sweep: str
    """The curve it belongs to, e.g. 'quickstart_dpo: dpo.beta'."""
    field: str
    value: str
    recipe: Recipe
    out: Path


def plan(out: Path, sweeps: list[list[str]], common: list[str]) -> list[Point]:
    """Every point of the sweeps, its recipe resolved and checked before anything trains."""
    points = []
    for sweep in sweeps:
        if len(sweep) < 2 or "=" not in sweep[1]:
            raise RecipeError(f"--sweep {' '.join(sweep)}: give a recipe and section.field=V1,V2,..., "
                              "e.g. --sweep quickstart_dpo dpo.beta=0.5,0.1")
        name, (field, _, values), fixed = sweep[0], sweep[1].partition("="), sweep[2:]
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not values:
            raise RecipeError(f"--sweep {name} {field}=: give one or more comma-separated values")
        base = load_recipe(name)
        for value in values:
            where = out / base.name / f"{field}={value}"
            recipe = apply_overrides(base, [*common, *fixed, f"{field}={value}", f"run.output_dir={where}"])
            points.append(Point(f"{base.name}: {field}", field, value, recipe, where))
    return points


def run_point(point: Point, shared_stages: Path) -> str:
    """Train the point, or reuse or resume its run: 'reused', 'trained', 'resumed' or 'failed: why'."""
    from .loops.training import train

    out = point.out
    if (out / RECIPE).is_file():
        try:
            check_same_recipe(out, point.recipe)
        except RecipeError as err:
            return f"failed: {str(err).replace('--resume: ', '')}"
        if (json.loads((out / EVAL).read_text()) if (out / EVAL).is_file() else {}).get("after"):
            return "reused"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / STAGES).exists():
        (out / STAGES).symlink_to(shared_stages.absolute(), target_is_directory=True)
    resume = (out / RECIPE).is_file()
    console.rule(f"{point.sweep}={point.value}")
    try:
        train(point.recipe, resume=resume)
    except RunStopped as stop:
        if stop.exit_code != 1:  # a signal: the sweep stops too, to be resumed
            raise
        return f"failed: {stop}"
    except Exception as err:  # noqa: BLE001 - recorded; the other points go on
        return f"failed: {err}" if isinstance(err, RecipeError) else f"failed: {type(err).__name__}: {first_line(err)}"
    return "resumed" if resume else "trained"


def curve_point(record: dict) -> dict:
    """What a frontier plots of one evaluation: its step, and the policy's reward, KL and judged share."""
    pol = record["policy"]
    return {"step": record["step"], **{k: pol[k] for k in ("reward", "kl", "judged") if k in pol}}


def best_of_n(run_dir: Path, ns: list[int]) -> list[dict]:
    """Best-of-N from the reference of a finished run, on its held-out prompts, scored by its reward
    (and judge): max(ns) samples a prompt, one generate pass over all of them."""
    import torch

    from .evaluation import load_run
    from .config.recipe import resolve_callable
    from .components.reward import build_reward, reward_inputs
    from .components.rollout import decode_pairs, evaluating, generate
    from .runtime.rundir import read_heldout
    from .components.seq2seq import is_encoder_decoder

    run = load_run(run_dir, weights=False)  # fresh adapters: the reference
    recipe, ev, gen = run.recipe, run.recipe.eval, run.recipe.generation
    queries, m = read_heldout(run.out), max(ns)
    lengths = np.random.default_rng(ev.seed).integers(gen.response_min_tokens, gen.response_max_tokens + 1,
                                                      size=len(queries)).tolist()  # as the evaluation draws them
    repeated = [q for q in queries for _ in range(m)]
    torch.manual_seed(ev.seed + 1)
    with evaluating(run.policy):
        responses = generate(run.policy, run.tokenizer, repeated, [n for n in lengths for _ in range(m)],
                             dataclasses.replace(gen, batch_size=ev.batch_size), run.device)
    prompts, texts = decode_pairs(run.tokenizer, repeated, responses, is_encoder_decoder(run.policy))
    rewards = np.asarray(build_reward(recipe.reward, run.device, recipe.policy)(reward_inputs(recipe.reward, prompts, texts)),
                         dtype=float).reshape(len(queries), m)
    judge = resolve_callable(ev.judge, "eval.judge") if ev.judge is not None else None
    judged = np.asarray([float(bool(judge(t))) for t in texts]).reshape(rewards.shape) if judge else None
    out = []
    for n in sorted(ns):
        row = {"n": n, "kl": best_of_n_kl(n), "reward": summarize(expected_best_of(rewards, n))}
        if judged is not None:
            row["judged"] = summarize(expected_best_of(rewards, n, judged))
        out.append(row)
    return out


def cached_best_of_n(out: Path, run_dir: Path, reference: list[float], ns: list[int]) -> list[dict]:
    """best_of_n, kept in OUT/best_of_n.json and reused while N and the reference's held-out
    rewards (which pin the prompts, the reference and the reward) are unchanged."""
    path, key = out / "best_of_n.json", {"ns": sorted(ns), "reference_reward": reference}
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("key", {}).get("ns") == key["ns"] and np.allclose(saved["key"]["reference_reward"], reference):
        return saved["rows"]
    rows = best_of_n(run_dir, ns)
    path.write_text(json.dumps({"key": key, "rows": rows}) + "\n")
    return rows


def references_agree(references: list[list[float]]) -> bool:
    """Whether the runs' references scored every held-out prompt alike (to float noise): only then
    did they share the prompts, the reference model and the reward, and their points compare."""
    return all(len(r) == len(references[0]) and np.allclose(r, references[0], rtol=1e-5, atol=1e-6)
               for r in references[1:])


def collect(points: list[Point], statuses: dict[Path, str], ns: list[int], out: Path, baseline: bool = True) -> dict:
    """frontier.json: each point's evaluations, the best-of-N baseline (baseline=False: only a saved
    one), and whether the points compare."""
    rows, references, finished, judges = [], [], [], []
    for p in points:
        result = json.loads((p.out / EVAL).read_text()) if (p.out / EVAL).is_file() else {}
        row = {"sweep": p.sweep, "method": p.recipe.method, "field": p.field,
               "value": p.value, "run_dir": str(p.out), "status": statuses.get(p.out, "not run")}
        if result.get("after"):
            row["after"] = curve_point(result["after"])
            row["during"] = [curve_point(r) for r in result.get("during", [])]
            references.append(result["after"]["per_sample"]["reference_reward"])
            finished.append(p.out)
            judges.append(result["after"].get("judge"))
        rows.append(row)
    same = references_agree(references)
    bon = []
    if finished and ns and baseline:
        bon = cached_best_of_n(out, finished[0], references[0], ns)
    elif (out / "best_of_n.json").is_file():
        bon = json.loads((out / "best_of_n.json").read_text())["rows"]
    frontier = {"points": rows, "comparable": same, "judge": judges[0] if judges else None, "best_of_n": bon}
    if not same:
        frontier["warning"] = ("the points' references score differently on the held-out prompts: they differ in "
                               "held-out prompts, reference model or reward, and do not compare")
    return frontier


def plot(frontier: dict, path: Path) -> None:
    """frontier.png: reward (and judged share, where a judge is set) against KL, a curve per sweep,
    95% intervals both ways, the evaluations during training faint, best-of-N dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in frontier["points"] if "after" in p]
    keys = ["reward"] + (["judged"] if done and "judged" in done[0]["after"] else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, sweep in enumerate(dict.fromkeys(p["sweep"] for p in done)):
            mine = sorted((p for p in done if p["sweep"] == sweep), key=lambda p: p["after"]["kl"]["mean"])
            color = f"C{i}"
            for p in mine:
                xs = [d["kl"]["mean"] for d in p["during"]]
                ax.plot(xs, [d[key]["mean"] for d in p["during"]], "o", color=color, alpha=0.25, markersize=4)
            x = [p["after"]["kl"] for p in mine]
            y = [p["after"][key] for p in mine]
            ax.errorbar([s["mean"] for s in x], [s["mean"] for s in y], fmt="o-", color=color, capsize=3,
                        xerr=_half_widths(x), yerr=_half_widths(y), label=sweep)
            for p in mine:
                ax.annotate(p["value"], (p["after"]["kl"]["mean"], p["after"][key]["mean"]), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
        bon = [b for b in frontier["best_of_n"] if key in b]
        if bon:
            ax.errorbar([b["kl"] for b in bon], [b[key]["mean"] for b in bon], yerr=_half_widths([b[key] for b in bon]),
                        fmt="s--", color="black", capsize=3, label="best-of-N from the reference")
            for b in bon:
                ax.annotate(f"N={b['n']}", (b["kl"], b[key]["mean"]), fontsize=8, xytext=(4, -10),
                            textcoords="offset points")
        ax.set_xlabel("KL(policy ‖ reference), nats, on held-out samples")
        ax.set_ylabel("reward" if key == "reward" else f"share judged {frontier.get('judge') or ''}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _half_widths(stats: list[dict]) -> np.ndarray:
    """Asymmetric error bars (2, n) from summaries' 95% intervals."""
    return np.array([[s["mean"] - s["ci95"][0] for s in stats], [s["ci95"][1] - s["mean"] for s in stats]]).clip(0)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m rlhf_recipes.frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the sweep's directory: its points' runs, frontier.json and frontier.png")
    parser.add_argument("--sweep", nargs="+", action="append", required=True,
                        metavar="RECIPE FIELD=V1,V2 [OVERRIDE]", help="a curve: recipe, swept field and values")
    parser.add_argument("--set", nargs="+", default=[], metavar="OVERRIDE", help="overrides for every recipe")
    parser.add_argument("--best-of", default="1,2,4,8,16", help="N for the best-of-N baseline ('' for none)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        ns = [int(n) for n in args.best_of.split(",") if n.strip()]
        if any(n < 1 for n in ns):
            raise ValueError
    except ValueError:
        print(f"error: --best-of expects positive integers, e.g. 1,2,4,8, got {args.best_of!r}", file=sys.stderr)
        return 2
    try:
        points = plan(out, args.sweep, args.set)
        shared = out / STAGES
        shared.mkdir(parents=True, exist_ok=True)
        (shared / ".shared").touch()  # never empty, so a failed first stage cannot remove it
        statuses, stopped = {}, True
        try:
            for point in points:
                statuses[point.out] = run_point(point, shared)
                console.print(f"{point.sweep}={point.value}: {statuses[point.out]}", soft_wrap=True)
            stopped = False
        finally:  # what is done is written, also when a signal stops the sweep (without new sampling)
            frontier = collect(points, statuses, ns, out, baseline=not stopped)
            (out / FRONTIER).write_text(json.dumps(frontier, indent=1) + "\n")
            if any("after" in p for p in frontier["points"]):
                plot(frontier, out / FIGURE)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        print(f"error: {stop}; run the same command again to resume the sweep", file=sys.stderr)
        return stop.exit_code
    failed = [p for p in frontier["points"] if p["status"].startswith("failed")]
    for p in failed:
        print(f"error: {p['sweep']}={p['value']}: {p['status'][len('failed: '):]}", file=sys.stderr)
    console.print(f"wrote {out / FRONTIER} and {out / FIGURE}" + ("" if frontier["comparable"] else
                                                               f"; warning: {frontier['warning']}"), soft_wrap=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
