#!/usr/bin/env bash
# A venv with TRL 0.11.4, the last TRL with the classic PPOTrainer, and transformers 4.57, at
# .venv-trl011: the live reference of tests/test_parity.py (which needs only the first install
# line), and the baseline loops of bench/throughput.py and bench/memory.py (which also import
# rlhf_recipes there, installed without its dependencies: its own pin is the newest TRL).
#   bash bench/trl011_venv.sh            # from the repo root; about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-trl011
.venv-trl011/bin/pip install -q torch==2.13.0
# rich: TRL 0.11.4 imports it without declaring it
.venv-trl011/bin/pip install -q trl==0.11.4 transformers==4.57.6 huggingface-hub==0.36.2 datasets==5.0.1 \
  tokenizers==0.22.2 "peft>=0.21" "accelerate>=1.15" "rich>=13"
if [[ "${1:-}" != "--reference-only" ]]; then
  .venv-trl011/bin/pip install -q "bitsandbytes>=0.50" "evaluate>=0.4.6" "matplotlib>=3.8"
  .venv-trl011/bin/pip install -q --no-deps -e .
fi
echo ".venv-trl011: $(.venv-trl011/bin/python -c 'import trl, transformers; print("trl", trl.__version__, "transformers", transformers.__version__)')"
