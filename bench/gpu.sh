#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine without internet that has torch, accelerate
# and peft but not this project's stack: the pinned wheels in bench/wheels/ (bench/fetch_wheels.sh)
# are installed into $SITE ahead of the machine's own packages, and TRL 0.11.4's stack (the
# baselines' classic PPOTrainer, bench/wheels-trl011/) into $SITE011, then the opt-in GPU tests and the
# GPU benchmarks run, each under its own timeout and all within $BUDGET_S seconds; a failed step
# does not stop the others. Logs, versions, nvidia-smi, summary.txt (rc and seconds per step) and,
# with RECORD=1, the updated RESULTS.md go to $OUT.
#
#   bash bench/gpu.sh               # from the repo root, on the GPU machine
#   bash bench/gpu.sh --rehearse    # here, on a CPU: the current env as is, the smallest shapes,
#                                   # what needs CUDA skipped; a few minutes
#
# Environment: OUT (default bench/gpu_out), PYTHON (python3; python with --rehearse), BUDGET_S (480),
# LARGE_SHAPES ("pythia-1b"; add pythia-6.9b for the 7B question: 14 GB written once, minutes more),
# RECORD (1 on the GPU, 0 with --rehearse: pass --record, so bench/RESULTS.md is rewritten and copied
# to $OUT), SITE (/tmp/site), SITE011 (/tmp/site011), SRC (/tmp/rlhf_src), INSTALL (1 on the GPU, 0
# with --rehearse, where the baselines use .venv-trl011 from bench/trl011_venv.sh; INSTALL=1
# --rehearse with a transformers-5 python rehearses the GPU machine's shadowing on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
case "${1:-}" in
  --rehearse) REHEARSE=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--rehearse]" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE=${SITE:-/tmp/site}
SITE011=${SITE011:-/tmp/site011}
SRC=${SRC:-/tmp/rlhf_src}
BUDGET_S=${BUDGET_S:-480}
LARGE_SHAPES=${LARGE_SHAPES:-pythia-1b}
if (( REHEARSE )); then PY=${PYTHON:-python}; RECORD=${RECORD:-0}; else PY=${PYTHON:-python3}; RECORD=${RECORD:-1}; fi
REC=(); (( RECORD )) && REC=(--record)
INSTALL=${INSTALL:-$(( 1 - REHEARSE ))}
START=$(date +%s)
SUMMARY=$OUT/summary.txt
echo "# bench/gpu.sh$( (( REHEARSE )) && echo ' --rehearse'), $(date -u +%FT%TZ), budget ${BUDGET_S}s" > "$SUMMARY"

# (a) the pinned wheels, ahead of the machine's packages; the package as setup.cfg lays it out
# (recipes/ ships as rlhf_recipes.recipes, which a plain PYTHONPATH=$PWD would not give; and `python -m`
# runs get -P, or the repo root, first on sys.path, would shadow it with a rlhf_recipes lacking recipes)
install() {  # install DIR WHEEL...: the wheels into DIR, ahead of the machine's own packages
  local dir=$1; shift
  rm -rf "$dir"  # pip install --target silently keeps what is already there
  if "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target "$dir" "$@"
  else  # no pip: a wheel is a zip of site-packages (only dill's scripts/ lie outside it, and are not needed)
    "$PY" -c 'import sys, zipfile
for w in sys.argv[2:]:
    z = zipfile.ZipFile(w)
    z.extractall(sys.argv[1], [n for n in z.namelist() if ".data/" not in n.split("/", 1)[0] + "/"])' "$dir" "$@"
  fi
}
if (( INSTALL )); then
  t0=$(date +%s)
  { install "$SITE" bench/wheels/*.whl && install "$SITE011" bench/wheels-trl011/*.whl; } > "$OUT/install.log" 2>&1 \
    || { echo "install 1 $(( $(date +%s) - t0 ))s" >> "$SUMMARY"; cat "$OUT/install.log"; exit 1; }
  echo "install 0 $(( $(date +%s) - t0 ))s" >> "$SUMMARY"
fi
rm -rf "$SRC" && mkdir -p "$SRC"
cp -r rlhf_recipes "$SRC/" && rm -rf "$SRC/rlhf_recipes/recipes" && cp -r recipes "$SRC/rlhf_recipes/recipes"
if (( INSTALL )); then
  PP=$SITE:$SRC
  # the baselines' python: the same interpreter with TRL 0.11.4's stack first (bench/common.trl011_python)
  export RLHF_RECIPES_TRL011_PYTHON="env PYTHONPATH=$SITE011:$SRC $PY"
else
  PP=$SRC
fi
export PYTHONPATH=$PP${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RLHF_RECIPES_GPU_TESTS=1  # tests/test_gpu.py is opt-in

# (b) what this machine is
{
  echo "## python"; "$PY" -P -c "import sys; print(sys.executable, sys.version)"
  echo "## packages"
  "$PY" -P - <<'EOF' || true
import importlib, importlib.metadata as md
for name in ("torch", "transformers", "huggingface_hub", "tokenizers", "datasets", "trl", "peft", "accelerate",
             "bitsandbytes", "safetensors", "fsspec", "rlhf_recipes"):
    try:
        m = importlib.import_module(name)
        print(f"{name:16} {getattr(m, '__version__', '?'):14} {m.__file__}")
    except Exception as err:
        print(f"{name:16} IMPORT FAILED: {type(err).__name__}: {err}")
import torch
print("cuda:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
from rlhf_recipes import load_recipe, shipped_recipes
print("shipped recipes:", shipped_recipes()); load_recipe("imdb_positive")
EOF
  echo "## nvidia-smi"; nvidia-smi 2>&1 || true
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

# (c) the steps: step NAME SECONDS CMD...; each under min(SECONDS, what is left of the budget)
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "$name skipped-budget 0s" | tee -a "$SUMMARY"; return 0
  fi
  local t0=$(date +%s) rc=0
  echo ">>> $name (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  (( rc == 124 || rc == 137 )) && rc="$rc-timeout"
  echo "$name $rc $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
  tail -n 15 "$OUT/$name.log"
}
skip() { echo "$1 skipped-$2 0s" | tee -a "$SUMMARY"; }

if (( REHEARSE )); then
  step test_gpu 120 "$PY" -P -m pytest -q -p no:cacheprovider tests/test_gpu.py
  skip large no-cuda
  step memory 240 "$PY" bench/memory.py --shape tiny --batch 8 "${REC[@]}"
  step throughput 240 "$PY" bench/throughput.py --shape tiny --batch 8 --mini-batch 8,4 --epochs 1 \
    --min-tokens 4 --max-tokens 8 --steps 1 --warmup 0 --per-prompt --also ppo.pack_rows=false \
    --also generation.compile=true "${REC[@]}"
  skip generation_pythia-1b no-cuda
  step generation_small 120 "$PY" bench/generation.py --shape tiny --tokens 8 --repeats 1 "${REC[@]}"
  step critic_free 120 "$PY" bench/critic_free.py --shape tiny --prompts 4 --generations 4 --steps 1 --warmup 0 \
    --rounds 1 "${REC[@]}"
else
  step test_gpu 150 "$PY" -P -m pytest -q -p no:cacheprovider tests/test_gpu.py
  # shellcheck disable=SC2086
  step large 150 "$PY" bench/large.py --shapes $LARGE_SHAPES "${REC[@]}"
  step memory 120 "$PY" bench/memory.py --shape gpt2-small --batch 16 "${REC[@]}"
  step throughput 240 "$PY" bench/throughput.py --shape gpt2-small --batch 64 --mini-batch 64,16 --steps 5 \
    --warmup 2 --per-prompt --also ppo.pack_rows=false --also generation.compile=true --target 0.8 "${REC[@]}"
  step generation_pythia-1b 90 "$PY" bench/generation.py --shape pythia-1b --dtype float16 "${REC[@]}"
  step generation_small 60 "$PY" bench/generation.py --shape gpt2-small "${REC[@]}"
  # our GRPO step against TRL's GRPOTrainer on a GPU; grpo.use_vllm is tested by tests/test_gpu.py
  # where vLLM is installed (its CUDA wheels are too large to carry in bench/wheels)
  step critic_free 90 "$PY" bench/critic_free.py --shape gpt2-small --prompts 8 --generations 8 --steps 3 \
    --warmup 1 --rounds 2 "${REC[@]}"
fi
(( RECORD )) && [[ -f bench/RESULTS.md ]] && cp bench/RESULTS.md "$OUT/RESULTS.md"
echo "total $(( $(date +%s) - START ))s" >> "$SUMMARY"
echo "=== $SUMMARY"; cat "$SUMMARY"
