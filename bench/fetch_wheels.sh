#!/usr/bin/env bash
# Fetch this project's stack, and TRL 0.11.4's for the baselines, as wheels into bench/wheels/ and
# bench/wheels-trl011/ (both git-ignored), for a GPU machine with no internet (Python 3.12, x86_64,
# torch/accelerate/peft and transformers 5.x preinstalled); bench/gpu.sh installs them there with
# --target, each set ahead of that machine's own packages.
#
#   bash bench/fetch_wheels.sh        # from the repo root, on a machine that reaches PyPI
#
# Idempotent: a wheel already there is not fetched again, and the bitsandbytes wheel is cut down
# (CPU + CUDA 13.0 libraries only) once. PIP=... picks the pip (default: .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PIP:-}" ]]; then
  if [[ -x .venv/bin/pip ]]; then PIP=.venv/bin/pip; else PIP="python3 -m pip"; fi
fi
PY="${PYTHON:-python3}"

# This project's stack on the machine's own transformers 5.x and hub client: TRL 1.x and what the
# machine lacks. Its torch + accelerate + peft + transformers 5 + hub + pandas/pyarrow/rich already
# bring numpy, packaging, pyyaml, filelock, tqdm, jinja2, psutil, safetensors, regex and the hub's
# own needs; not datasets' dill, multiprocess and xxhash. fsspec is pinned because datasets caps
# it and the machine's is unknown. datasets 5.2 needs a hub client >= 1.31: gpu.sh's versions step
# shows the machine's.
WHEELS=(
  trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
  xxhash==4.1.0
)
# The baselines' stack (bench/throughput.py's plain loops, bench/memory.py's full fine-tuning):
# TRL 0.11.4, the last with the classic PPOTrainer, on transformers 4.57, with what those bring in
# (transformers 4.57, hub 0.36 and datasets import requests; TRL 0.11.4 imports tyro).
WHEELS_TRL011=(
  trl==0.11.4 transformers==4.57.6 huggingface-hub==0.36.2 tokenizers==0.22.2 datasets==5.0.1
  dill==0.4.1 multiprocess==0.70.19 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
  fsspec==2026.6.0 xxhash==4.1.0 requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3
)

fetch() {  # fetch DEST SPEC...
  local dest=$1; shift
  mkdir -p "$dest"
  shopt -s nocaseglob nullglob
  for spec in "$@"; do
    name=${spec%%==*} version=${spec##*==}
    have=("$dest/${name//-/_}-${version}-"*.whl)
    if (( ${#have[@]} )); then
      echo "have   ${have[0]##*/}"
      continue
    fi
    echo "fetch  $spec"
    $PIP download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$dest" "$spec"
  done
  shopt -u nocaseglob nullglob
}
fetch bench/wheels "${WHEELS[@]}"
fetch bench/wheels-trl011 "${WHEELS_TRL011[@]}"
DEST=bench/wheels

# bitsandbytes ships one library per CUDA version (~10 MiB each): keep the CPU one and CUDA 13.0's
# (the GPU machine's torch is built for CUDA 13), and drop the others' lines from RECORD.
"$PY" - "$DEST" <<'EOF'
import glob, os, re, sys, zipfile

KEEP = {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"}
LIB = re.compile(r"^bitsandbytes/(libbitsandbytes_[^/]+\.so)$")
(wheel,) = glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl"))
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    drop = {n for n in names if (m := LIB.match(n)) and m[1] not in KEEP}
    kept_libs = sorted(n for n in names if LIB.match(n) and n not in drop)
    if {n.rsplit("/", 1)[1] for n in kept_libs} != KEEP:
        sys.exit(f"error: {wheel} lacks one of {sorted(KEEP)}: has {kept_libs}")
    if not drop:
        print(f"bitsandbytes wheel already cut down: {', '.join(kept_libs)}")
        sys.exit(0)
    tmp = wheel + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            if info.filename in drop:
                continue
            data = z.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if l.split(",", 1)[0] not in drop).encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
os.replace(tmp, wheel)
print(f"bitsandbytes wheel cut down: dropped {len(drop)} libraries, kept {', '.join(kept_libs)}")
EOF

ls -l bench/wheels/*.whl bench/wheels-trl011/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $9}'
du -ch bench/wheels/*.whl bench/wheels-trl011/*.whl | tail -1 | sed 's/total$/total in bench\/wheels*\//'
