#!/usr/bin/env bash
# GPU run of the comparison: ckptd, torch.save, DCP and safetensors on CUDA tensors, pinned
# D2H/H2D copies, scaling and goodput, in about five minutes on a machine with torch and a GPU.
#
#   benches/gpu.sh OUTDIR          (env: PYTHON=python3, SIZES=256MiB,1GiB, REPS=3, RANKS=1,2,4,8)
#
# It builds the release binaries (ckptd for the sidecar agent, ckptd-benches), makes the ckptd
# Python package importable (a release wheel built with maturin into OUTDIR/venv, which sees the
# system's torch) unless it already imports, and runs `compare --device cuda`, which stops with a
# clear message when torch sees no GPU. Results: OUTDIR/results.json, results.md, *.png, run.log.
set -euo pipefail

out=${1:?usage: benches/gpu.sh OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
start=$(date +%s)

"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch.cuda.is_available() is False: no GPU here")'

cargo build --release -p ckptd -p ckptd-benches

if ! "$py" -c 'import ckptd' 2>/dev/null; then
    "$py" -m venv --system-site-packages "$out/venv"
    py="$out/venv/bin/python"
    "$py" -m pip install -q maturin
    "$py" -m maturin build --release -m python-bindings/Cargo.toml -o "$out/wheel"
    "$py" -m pip install -q "$out"/wheel/ckptd-*.whl
fi

# Checkpoints go next to the results, on the node's local disk (not /tmp, often tmpfs).
mkdir -p "$out/data"
target/release/ckptd-benches compare --device cuda --python "$py" --install-peers \
    --sizes "${SIZES:-256MiB,1GiB}" --reps "${REPS:-3}" --ranks "${RANKS:-1,2,4,8}" \
    --out "$out" --dir "$out/data" 2>&1 | tee "$out/run.log"
rm -rf "$out/data" "$out/wheel"
echo "gpu.sh: done in $(( $(date +%s) - start )) s; results in $out"
