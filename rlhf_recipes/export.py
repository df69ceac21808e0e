"""A standalone model from a finished run: LoRA folded into the base, ready for
`AutoModelForCausalLM.from_pretrained` (or `AutoModelForSeq2SeqLM`, for an encoder-decoder policy)
and `transformers.pipeline`.

    python -m rlhf_recipes.export RUN_DIR OUT_DIR [--dtype float32|bfloat16|float16]

An 8-bit or 4-bit base is dequantized (the weights the adapter was trained on, not the original
full-precision ones) and the adapter merged into that, in the dtype asked for. The value head is
left out: it is for PPO, not for generating. The generation config is the recipe's plain sampling,
ending at the model's own end tokens (and, for BART, starting with its forced BOS).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from .components import seq2seq
from .components.loading import load_pretrained
from .components.policy import DTYPES, load_config, load_tokenizer, quantization_config
from .components.rollout import sampling_config
from .config.sections import RecipeError
from .cli import OneLineParser
from .runtime.rundir import MODEL, RECIPE, atomic_dir


def export(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Write the merged model, its tokenizer and a generation config to out_dir; returns out_dir."""
    from .evaluation import saved_recipe

    run, target = Path(run_dir), Path(out_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RecipeError(f"export: {str(target)!r} is not empty; choose a new directory")
    if dtype is not None and dtype not in DTYPES:
        raise RecipeError(f"export: --dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    recorded = json.loads((run / RECIPE).read_text()) if (run / RECIPE).is_file() else {}
    if recorded.get("policy", {}).get("quantization", "none") != "none" and dtype is None:
        raise RecipeError(f"export: {run} was trained on a {recorded['policy']['quantization']} base, which is "
                          "dequantized for export: choose its dtype with --dtype float32, bfloat16 or float16")
    recipe, device = saved_recipe(run)
    policy = recipe.policy
    dtype = dtype or policy.dtype
    quant = quantization_config(policy.quantization, policy.dtype)
    auto = AutoModelForSeq2SeqLM if seq2seq.is_encoder_decoder(load_config(policy)) else AutoModelForCausalLM
    base = load_pretrained("policy.model", auto.from_pretrained, policy.model,
                           dtype=DTYPES[dtype] if quant is None else DTYPES[policy.dtype], quantization_config=quant,
                           trust_remote_code=policy.trust_remote_code,
                           device_map={"": "cpu" if device.type == "cpu" else device} if quant else None)
    if quant is not None:
        base = base.dequantize()  # the int8 / nf4 weights the adapter learned on, as floats
    merged = PeftModel.from_pretrained(base, run / MODEL).merge_and_unload().to(DTYPES[dtype])
    if quant is not None:
        merged = _as_architecture(merged, auto)
    tokenizer = load_tokenizer("policy.model", str(run / MODEL))
    merged.generation_config = sampling_config(recipe.generation, recipe.generation.response_max_tokens, tokenizer,
                                               merged)
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _as_architecture(model, auto):
    """`model`'s weights in a fresh instance of its own architecture. Dequantizing turns GPT-2's
    Conv1D layers (weights stored in x out) into nn.Linear ones (out x in), which the saved
    config would then load transposed."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        fresh = auto.from_config(model.config, dtype=model.dtype)
    ours = dict(model.named_modules())
    flipped = {f"{n}.weight" for n, m in fresh.named_modules() if isinstance(m, Conv1D)
               and not isinstance(ours.get(n), Conv1D)}  # square ones too: shapes cannot tell
    weights = {k: v.T.contiguous() if k in flipped else v for k, v in model.state_dict().items()}
    fresh.load_state_dict(weights, assign=True, strict=False)  # tied embeddings appear once
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m rlhf_recipes.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run's output directory")
    parser.add_argument("out_dir", help="a new (or empty) directory for the merged model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="the exported weights' dtype (default: the policy's; "
                        "required for an 8-bit or 4-bit base)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out_dir, args.dtype)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if seq2seq.is_encoder_decoder(AutoConfig.from_pretrained(out)):
        print(f"exported a merged encoder-decoder to {out}: AutoModelForSeq2SeqLM.from_pretrained({str(out)!r}), "
              "then generate()")
    else:
        print(f"exported a merged model to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) or "
              f"pipeline('text-generation', model={str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
