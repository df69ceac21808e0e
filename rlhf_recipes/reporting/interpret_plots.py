"""Figures and the report section of rlhf_recipes.interpret, from its JSON record alone."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .report import num


_NAMED = {",": "comma", ".": "full stop", ";": "semicolon", ":": "colon", "'": "apostrophe", "`": "backtick",
          "-": "hyphen", "!": "exclamation mark", "?": "question mark", "\"": "quote"}


def token_label(token: str) -> str:
    """A token as a tick label: quoted, and a lone punctuation mark named too (',' and '.' look
    alike at 8 points)."""
    name = _NAMED.get(token.strip())
    return f"{token!r} ({name})" if name else repr(token)


def plot_all(out: Path, result: dict) -> dict[str, str]:
    """Write the PNGs into `out`; {what: file name}."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    files = {}

    def save(fig, name, what):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files[what] = name

    shift = result["logit_shift"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.28 * 2 * len(shift["prompt_end"]["up"]) + 1.5))
    for ax, key in zip(axes, ("prompt_end", "samples")):
        rows = shift[key]["up"] + shift[key]["down"][::-1]
        ax.barh(range(len(rows)), [v for _, v in rows], color=["tab:green" if v > 0 else "tab:red" for _, v in rows])
        ax.set_yticks(range(len(rows)), [token_label(t) for t, _ in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title("log p(policy) - log p(reference) at the prompt's end:\nmost up, most down" if key == "prompt_end"
                     else "over the policy's samples: each token's share of KL(policy || ref) (up)\n"
                          "and of KL(ref || policy) (down), nats a position", fontsize=9)
    save(fig, "tokens.png", "tokens that rose and fell")

    kl = result["kl_by_position"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    positions = np.arange(len(kl["kl"]))
    ax.plot(positions, kl["kl"], "o-", label="KL over the vocabulary")
    ax.plot(positions, kl["sampled"], "s:", label="sampled log-ratio (sums to the eval's KL)")
    for x, (y, n) in enumerate(zip(kl["kl"], kl["count"])):
        ax.annotate(f"n={int(n)}", (x, y), fontsize=7, textcoords="offset points", xytext=(0, 5), ha="center")
    ax.set_xlabel("response position")
    ax.set_ylabel("KL(policy || reference), nats")
    ax.legend(fontsize=8)
    save(fig, "kl_by_position.png", "KL by response position")

    lens = result["logit_lens"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for side in ("reference", "policy"):
        axes[0].plot(lens["boundaries"], lens[side]["kl"], "o-", label=side)
        axes[1].plot(lens["boundaries"], lens[side]["m"], "o-", label=side)
    axes[0].set_title("logit lens: KL(final output || lens), nats", fontsize=9)
    axes[1].set_title("logit lens: m = logits . c", fontsize=9)
    axes[1].legend(fontsize=8)
    save(fig, "logit_lens.png", "logit lens")

    dla = result["dla"]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(dla["components"])), 3.5))
    ax.bar(dla["components"], dla["difference"], color=["tab:green" if v > 0 else "tab:red" for v in dla["difference"]])
    ax.axhline(0, color="grey", lw=0.5)
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    ax.set_title(f"direct logit attribution to m, policy - reference (m changes by {result['m']['change']:+.3f})",
                 fontsize=9)
    save(fig, "dla.png", "direct logit attribution")

    maps = [("per-head attribution, policy - reference", result["heads_dla"]["difference"], "RdBu_r"),
            (f"share of m's change recovered by patching\n({result['patching']['patched']})",
             result["patching"]["recovered"], "RdBu_r"),
            ("attention shift at the last position (TV)", result["attention_tv"], "viridis")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.35 * result["layers"] + 2.5))
    for ax, (title, grid, cmap) in zip(axes, maps):
        grid = np.asarray(grid, dtype=float)
        top = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
        image = ax.imshow(grid, cmap=cmap, aspect="auto", **({"vmin": -top, "vmax": top} if cmap == "RdBu_r" else {}))
        if grid.size <= 64:  # few enough to read: write the values in
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, "-" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                        bbox=dict(facecolor="white", alpha=0.7, lw=0))  # readable on any colour
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=8)
        fig.colorbar(image, ax=ax)
    save(fig, "heads.png", "heads")

    example = result["example"]
    if example["heads"]:
        fig, axes = plt.subplots(2, len(example["heads"]), figsize=(3.2 * len(example["heads"]), 6.4), squeeze=False)
        labels = [token_label(t) for t in example["tokens"]]
        for j, head in enumerate(example["heads"]):
            for i, side in enumerate(("policy", "reference")):
                ax = axes[i, j]
                ax.imshow(np.asarray(head[side]), cmap="Blues", vmin=0, vmax=1)
                ax.set_title(f"{head['head']} {side}", fontsize=9)
                ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(len(labels)), labels, fontsize=6)
        save(fig, "attention.png", "attention of the best heads on one prompt")
    return files


def markdown(result: dict, files: dict[str, str], prefix: str) -> str:
    """The report's section: a few sentences and the figures."""
    shift, m, lens, patching = result["logit_shift"], result["m"], result["logit_lens"], result["patching"]
    words = lambda rows: ", ".join(f"`{t!r}`" for t, _ in rows[:5])  # noqa: E731
    diff = np.subtract(lens["policy"]["m"], lens["reference"]["m"]) / (m["change"] or math.nan)
    along = ", ".join(f"{b} {_pct(d)}" for b, d in zip(lens["boundaries"], diff))
    best = ", ".join(f"{h} ({r:.0%})" for h, r in zip(patching["best"], _recovered(result)))
    lines = [f"## Inside the policy ({result['num_prompts']} held-out prompts)", "",
             "The policy (adapters on) against its reference (adapters off), by `python -m rlhf_recipes.interpret`; "
             "figures and `interpret.json` are in `interpret/`.", "",
             *([f"**Approximate:** {'; '.join(result['approximate'])}.", ""] if result["approximate"] else []),
             f"- At the prompt's end log-probability rose most for {words(shift['prompt_end']['up'])} and fell most "
             f"for {words(shift['prompt_end']['down'])}; over the policy's own samples "
             f"({shift['sample_positions']} positions) the KL is carried most by {words(shift['samples']['up'])}, "
             f"and the reference's most missed words are {words(shift['samples']['down'])}.",
             f"- m, the logit difference along {result['direction']['source']}, is {num(m['reference'])} in the "
             f"reference and {num(m['policy'])} in the policy.",
             f"- Logit lens, share of that change in the residual stream after each stage: {along}.",
             f"- Patching single heads' outputs from the policy into the reference ({patching['patched']}), most is "
             f"recovered by {best or 'no head'}; together they recover {_pct(patching['best_together'])}.", ""]
    lines += [f"![{what}]({prefix}/{name})" for what, name in files.items()]
    return "\n".join(lines) + "\n"


def _recovered(result: dict) -> list[float]:
    grid = result["patching"]["recovered"]
    return [grid[int(h[1:].split("H")[0])][int(h.split("H")[1])] for h in result["patching"]["best"]]


def _pct(x: float) -> str:
    return f"{x:.0%}" if math.isfinite(x) else "-"


def replace_section(text: str, body: str, begin: str, end: str) -> str:
    """`text` with the part between the markers replaced by `body` (appended, markers and all, if absent);
    what follows the section stays."""
    section = f"{begin}\n{body}{end}\n"
    if begin in text and end in text:
        return text[:text.index(begin)] + section + text[text.index(end) + len(end):].lstrip("\n")
    return text + ("\n" if text and not text.endswith("\n\n") else "") + section
