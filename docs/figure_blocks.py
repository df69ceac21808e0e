"""The blocks docs/figures.py writes into the README and docs/, one function a block. Each takes
the runs, by name (docs/figures.py, `load`), and gives the block's markdown, or None when a run it
needs is missing."""
from __future__ import annotations

import statistics


def cell(stat: dict) -> str:
    """mean ± the half-width of its 95% interval"""
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.2f} ± {(hi - lo) / 2:.2f}"


def gain(run: dict) -> float:
    """The change in the policy's mean reward, in the reference's standard deviations."""
    b, a = run["eval"]["before"], run["eval"]["after"]
    return (a["policy"]["reward"]["mean"] - b["policy"]["reward"]["mean"]) / a["reference"]["reward"]["std"]


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def quickstart(runs: dict) -> str:
    q = runs["quickstart"]
    ev, recipe, cost = q["eval"], q["recipe"], q["cost"]
    sft, rm = q["stages"]["sft"], q["stages"]["reward_model"]
    b, a = ev["before"], ev["after"]
    target, kl, steps = recipe["ppo"]["target"], a["policy"]["kl"], len(q["metrics"])
    how = f"{clock(cost['wall'])} wall, {cost['peak_gb']:.2f} GB peak memory: " if cost else ""
    text = f"""`python -m rlhf_recipes.run quickstart` in an empty directory, so every stage trained: {how}SFT
{sft['seconds']:.0f} s (held-out loss {sft['heldout_loss_before']:.2f} → {sft['heldout_loss_after']:.2f} nats a token), the reward model
{rm['seconds']:.0f} s (held-out pairs ranked right: {rm['heldout_accuracy_before']:.0%} → {rm['heldout_accuracy_after']:.0%}), PPO {steps} steps of
{recipe['ppo']['batch_size']} at a median {q['step']:.2f} s a step, with {2 + len(ev['during'])} evaluations. On {a['num_prompts']} held-out openings:

| | before PPO (the SFT model) | after {steps} PPO steps |
|---|---|---|
| mean reward (the reward model's logit) | {cell(b['policy']['reward'])} | {cell(a['policy']['reward'])} |
| change, in reference standard deviations ({a['reference']['reward']['std']:.2f}) | | **{gain(q):+.1f}** |
| share judged positive by the word list | {b['policy']['judged']['mean']:.1%} | **{a['policy']['judged']['mean']:.1%}** |
| KL(policy ‖ reference), nats (target {target:g}) | 0 | **{cell(kl)}** ({kl['mean'] / target:.2f} × target) |
| mean token entropy, nats | {cell(b['policy']['entropy'])} | {cell(a['policy']['entropy'])} |
| win rate over the reference | 0.50 | {a['win_rate']['mean']:.2f} |
"""
    seeds = [runs[s] for s in ("seed1", "seed2") if s in runs]
    if seeds:
        text += ("\nCells are mean ± the half-width of a 95% interval. Other seeds (`run.seed=1`, `2`: their own "
                 "SFT and reward models and held-out openings) gave " + " and ".join(f"{gain(s):+.1f}" for s in seeds)
                 + " reference standard deviations, " + " and ".join(
                     f"{s['eval']['before']['policy']['judged']['mean']:.0%} → {s['eval']['after']['policy']['judged']['mean']:.0%}"
                     for s in seeds) + " judged positive, and KL " + " and ".join(
                     f"{s['eval']['after']['policy']['kl']['mean']:.2f}" for s in seeds) + " nats.\n")
    return text


METHODS = [("quickstart", "PPO", "ppo", "target"), ("dpo", "DPO", "dpo", "beta"),
           ("grpo", "GRPO", "grpo", "beta"), ("rloo", "RLOO", "rloo", "beta")]


def methods(runs: dict) -> str | None:
    """The four quickstarts side by side: the same task, reward model, judge and held-out openings."""
    cols = [(runs[name], label, section, field) for name, label, section, field in METHODS if name in runs]
    if len(cols) < 2:
        return None

    def size(run: dict, section: str) -> str:
        s, steps = run["recipe"][section], len(run["metrics"])
        if section == "dpo":
            return f"{steps} × {s['batch_size']} pairs"
        return f"{steps} × {s['batch_size']}" + (f"×{s['num_generations']}" if "num_generations" in s else "") + " samples"

    def moved(run: dict, key: str, form: str) -> str:
        before, after = (run["eval"][w]["policy"][key] for w in ("before", "after"))
        return f"{before['mean']:{form}} → " + (cell(after) if form == ".2f" else f"{after['mean']:{form}}")

    after = lambda run: run["eval"]["after"]  # noqa: E731
    rows = [("mean reward, before → after", lambda run, _: moved(run, "reward", ".2f")),
            ("change, in reference standard deviations", lambda run, _: f"{gain(run):+.1f}"),
            ("share judged positive by the word list", lambda run, _: moved(run, "judged", ".1%")),
            ("KL(policy ‖ reference), nats, on the policy's samples", lambda run, _: cell(after(run)["policy"]["kl"])),
            (f"mean token entropy, nats (reference {after(cols[0][0])['reference']['entropy']['mean']:.2f})",
             lambda run, _: f"{after(run)['policy']['entropy']['mean']:.2f}"),
            ("win rate over the reference", lambda run, _: f"{after(run)['win_rate']['mean']:.2f}"),
            ("steps × batch, median time a step", lambda run, section: f"{size(run, section)}, {run['step']:.2f} s"),
            ("whole run (stages included), peak memory",
             lambda run, _: f"{clock(run['cost']['wall'])}, {run['cost']['peak_gb']:.2f} GB" if run["cost"] else "")]
    head = " | ".join(f"{label} (`{section}.{field}={run['recipe'][section][field]:g}`)"
                      for run, label, section, field in cols)
    return (f"| | {head} |\n|---|" + "---|" * len(cols) + "\n"
            + "".join(f"| {name} | " + " | ".join(fn(run, section) for run, _, section, _ in cols) + " |\n"
                      for name, fn in rows))


def dpo(runs: dict) -> str | None:
    """What DPO measures of itself on its held-out pairs."""
    if "dpo" not in runs:
        return None
    b, a = (runs["dpo"]["eval"][w]["heldout_pairs"] for w in ("before", "after"))
    return (f"| on DPO's held-out pairs | before | after |\n|---|---|---|\n"
            f"| `rewards/accuracies` (a tie counts as wrong) | {b['rewards/accuracies']:.1%} | {a['rewards/accuracies']:.1%} |\n"
            f"| `rewards/margins` | {b['rewards/margins']:.2f} | {a['rewards/margins']:.2f} |\n"
            f"| `logps/chosen`, nats | {b['logps/chosen']:.1f} | {a['logps/chosen']:.1f} |\n"
            f"| `logps/rejected`, nats | {b['logps/rejected']:.1f} | {a['logps/rejected']:.1f} |\n")


def entropy(runs: dict) -> str | None:
    """The quickstart with three entropy coefficients, on the same stages and seed."""
    rows = [(f"entropy_coef {runs[n]['recipe']['ppo']['entropy_coef']:g}{note}", runs[n])
            for n, note in (("entropy_0", " (TRL 0.11.4's objective)"), ("quickstart", " (shipped)"),
                            ("entropy_0.05", "")) if n in runs]
    if len(rows) < 2:
        return None

    def line(name: str, side: str, run: dict) -> str:
        e = run["eval"]["after"]
        kl = e[side]["kl"]["mean"] if side == "policy" else 0.0
        return (f"| {name} | {e[side]['reward']['mean']:.2f} | {kl:.2f} | {e[side]['length']['mean']:.2f} | "
                f"{e['corpus_distinct'][side]['distinct_2']:.2f} | {e[side]['entropy']['mean']:.2f} | "
                f"{e[side]['judged']['mean']:.1%} |\n")
    return ("| held-out, after PPO | reward | KL, nats | length, tokens | distinct-2 over all responses | "
            "token entropy, nats | judged positive |\n|---|---|---|---|---|---|---|\n"
            + line("the reference (SFT model)", "reference", runs["quickstart"])
            + "".join(line(name, "policy", run) for name, run in rows))


def seq2seq(runs: dict) -> str | None:
    """The causal and the encoder-decoder quickstarts side by side."""
    if "seq2seq" not in runs:
        return None

    def moved(run: dict, key: str, form: str) -> str:
        before, after = (run["eval"][w]["policy"][key]["mean"] for w in ("before", "after"))
        return f"{before:{form}} → {after:{form}}"

    def cost(run: dict) -> str:
        return f"{clock(run['cost']['wall'])}, {run['cost']['peak_gb']:.2f} GB" if run["cost"] else ""
    rows = [("mean reward, before → after", lambda r: moved(r, "reward", ".2f")),
            ("change, in reference standard deviations", lambda r: f"{gain(r):+.1f}"),
            ("share judged positive by the word list", lambda r: moved(r, "judged", ".1%")),
            ("KL(policy ‖ reference), nats (target 6)", lambda r: cell(r["eval"]["after"]["policy"]["kl"])),
            ("mean token entropy, nats, before → after", lambda r: moved(r, "entropy", ".2f")),
            ("win rate over the reference", lambda r: f"{r['eval']['after']['win_rate']['mean']:.2f}"),
            ("whole run, peak memory", cost)]
    return ("| | causal quickstart (GPT-2) | seq2seq quickstart (T5) |\n|---|---|---|\n"
            + "".join(f"| {name} | {fn(runs['quickstart'])} | {fn(runs['seq2seq'])} |\n" for name, fn in rows))


def frontier(runs: dict) -> str | None:
    """The frontier's points: reward (judged share) at KL, a row a sweep."""
    if "frontier" not in runs:
        return None
    f = runs["frontier"]
    sweeps: dict[str, list] = {}
    for p in f["points"]:
        if p.get("after"):
            sweeps.setdefault(f"{p['method'].upper()}, `{p['field']}`", []).append(p)
    width = max(len(ps) for ps in sweeps.values())
    point = lambda r, kl: f"{r['reward']['mean']:.2f} ({r['judged']['mean']:.0%}) at {kl:.1f}"  # noqa: E731
    text = "| | " + " | ".join(f"point {k + 1}" for k in range(width)) + " |\n|---|" + "---|" * width + "\n"
    for name, ps in sweeps.items():
        ps = sorted(ps, key=lambda p: p["after"]["kl"]["mean"])
        cells = [point(p["after"], p["after"]["kl"]["mean"]) for p in ps] + [""] * (width - len(ps))
        text += f"| {name} {', '.join(p['value'] for p in ps)} | " + " | ".join(cells) + " |\n"
    best = [b for b in f.get("best_of_n", []) if b["n"] >= 16][:width]
    if best:
        cells = [point(b, b["kl"]) for b in best] + [""] * (width - len(best))
        text += f"| best-of-N from the reference, N {', '.join(str(b['n']) for b in best)} | " + " | ".join(cells) + " |\n"
    verdict = "compare: their reference rewards agree" if f["comparable"] else "do NOT compare: their reference rewards differ"
    return text + f"\nReward (judged share) at KL in nats, each row in order of KL. `frontier.json` says the points {verdict} on every held-out prompt.\n"


def interpret(runs: dict) -> str | None:
    """What `rlhf_recipes.interpret` found in the quickstart's policy."""
    i = runs["quickstart"].get("interpret")
    if i is None:
        return None
    words = lambda rows: ", ".join(f"{token.strip() or token!r} {change:+.1f}" for token, change in rows[:6])  # noqa: E731
    shift = i["logit_shift"]["prompt_end"]
    lens = i["logit_lens"]
    dla = dict(zip(i["dla"]["components"], i["dla"]["difference"]))
    heads = [(f"L{layer}H{head}", v) for layer, row in enumerate(i["patching"]["recovered"]) for head, v in enumerate(row)]
    top = max(heads, key=lambda h: h[1])
    kl = i["kl_by_position"]["sampled"]
    return ("| | |\n|---|---|\n"
            f"| m (the final logits · the direction), reference → policy | {i['m']['reference']:+.1f} → {i['m']['policy']:+.1f} |\n"
            f"| rose most at an opening's end, nats | {words(shift['up'])} |\n"
            f"| fell most | {words(shift['down'])} |\n"
            f"| m by the logit lens after each block, reference | {', '.join(f'{v:+.1f}' for v in lens['reference']['m'])} |\n"
            f"| the same, policy | {', '.join(f'{v:+.1f}' for v in lens['policy']['m'])} |\n"
            f"| direct attribution of the change in m | {', '.join(f'{k} {v:+.2f}' for k, v in dla.items())} |\n"
            f"| the head that recovers most, patched alone | {top[0]}: {top[1]:.0%} of the change in m |\n"
            f"| the best {len(i['patching']['best'])} heads patched together | {', '.join(i['patching']['best'])}: {i['patching']['best_together']:.0%} |\n"
            f"| sampled KL by response position, nats | {', '.join(f'{v:.2f}' for v in kl[:4])} |\n"
            f"| analysis time (loading aside) | {i['seconds']['total']:.1f} s |\n")


RENDER = {"quickstart": quickstart, "methods": methods, "dpo": dpo, "entropy": entropy, "seq2seq": seq2seq,
          "frontier": frontier, "interpret": interpret}
