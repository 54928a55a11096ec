#!/usr/bin/env bash
# The GPU run of issue 22, one command:   benchmarks/gpu.sh [--dry-run] [--out benchmarks/results-gpu.json]
#
# On a CUDA machine it installs what it needs into venvs of its own, then runs, each step writing one JSON part:
#   1. benchmarks.gpu_bench   DPO, reward model and SFT in bf16 at 0.5B- and 1.5B-like shapes against TRL, with and
#                             without Liger kernels (GRPO: no benchmark scenario yet, listed as missing)
#   2. benchmarks.gpu_matrix  every architecture under every attention kernel the GPU has, bf16
#   3. benchmarks.vllm_check  the vLLM backend against the transformers one (bf16, then fp32), in its own venv
#                             (vLLM pins its own torch)
# and merges the parts into benchmarks/results-gpu.json. A failing step is recorded there; the others still run.
#
# --dry-run (run by tests/test_gpu_script.py): no GPU, no installs (their commands are printed), the current
# interpreter ($PYTHON, default .venv/bin/python); the plan is checked and tiny versions of every step run on
# the CPU, parts and merged result in a temporary folder unless --out says where.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

GPU_VENV=${GPU_VENV:-.venv-gpu}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
LIGER_SPEC=${LIGER_SPEC:-liger-kernel==0.8.5}
VLLM_SPEC=${VLLM_SPEC:-vllm==0.33.0}
BASE_PYTHON=${BASE_PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

if [ "$DRY" = 1 ]; then
    PARTS=$(mktemp -d)
    if [ -n "$OUT" ]; then trap 'rm -rf "$PARTS"' EXIT; else OUT=$PARTS/results-gpu.json; fi
    PY=${PYTHON:-.venv/bin/python}
    VPY=$PY
else
    PARTS=benchmarks/gpu-parts
    OUT=${OUT:-benchmarks/results-gpu.json}
    PY=$GPU_VENV/bin/python
    VPY=$VLLM_VENV/bin/python
    mkdir -p "$PARTS"
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
        echo "gpu.sh: no CUDA device here (nvidia-smi fails); run benchmarks/gpu.sh --dry-run on a CPU" >&2
        exit 2
    fi
fi

# Each step: printed; installs only run for real, checks run in both modes.
install() {
    echo "+ $*"
    if [ "$DRY" = 0 ]; then "$@"; fi
}
FAILED=()
step() {
    local name=$1; shift
    echo "== $name: $*"
    if ! "$@"; then
        echo "== $name FAILED" >&2
        FAILED+=("$name")
    fi
}

echo "== install (torch's CUDA build from PyPI, preftune with its test extra (TRL), Liger; vLLM in its own venv)"
install "$BASE_PYTHON" -m venv "$GPU_VENV"
install "$GPU_VENV/bin/python" -m pip install --quiet --upgrade pip
install "$GPU_VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
install "$GPU_VENV/bin/python" -m pip install --quiet -e ".[test]" --constraint containers/requirements.lock
install "$GPU_VENV/bin/python" -m pip install --quiet "$LIGER_SPEC"
install "$BASE_PYTHON" -m venv "$VLLM_VENV"
install "$VLLM_VENV/bin/python" -m pip install --quiet --upgrade pip
install "$VLLM_VENV/bin/python" -m pip install --quiet "$VLLM_SPEC" peft safetensors

if [ "$DRY" = 1 ]; then
    step scenarios "$PY" -m benchmarks.gpu_bench --dry-run --out "$PARTS/gpu-bench.json"
    step matrix "$PY" -m benchmarks.gpu_matrix --dry-run --arch llama --out "$PARTS/gpu-matrix.json"
    # No vLLM in this interpreter: the check must stop with the backend's "needs vLLM" refusal (exit 3).
    rc=0; "$VPY" -m benchmarks.vllm_check --out "$PARTS/gpu-vllm.json" 2>"$PARTS/vllm.err" || rc=$?
    if [ "$rc" = 3 ] && grep -q "vllm" "$PARTS/vllm.err"; then
        echo "== vllm: refused without vLLM, as it should here: $(tail -1 "$PARTS/vllm.err")"
        echo '{"ok": true, "dry_run": true, "refused": "vLLM not installed in the dry run interpreter"}' \
            >"$PARTS/gpu-vllm.json"
    elif [ "$rc" != 0 ]; then
        echo "== vllm FAILED (exit $rc): $(tail -5 "$PARTS/vllm.err")" >&2
        FAILED+=(vllm)
    fi
    PART_FILES=("$PARTS/gpu-bench.json" "$PARTS/gpu-matrix.json" "$PARTS/gpu-vllm.json")
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$PARTS/gpu.txt"
    step scenarios "$PY" -m benchmarks.gpu_bench --out "$PARTS/gpu-bench.json"
    step matrix "$PY" -m benchmarks.gpu_matrix --out "$PARTS/gpu-matrix.json"
    step vllm-bf16 "$VPY" -m benchmarks.vllm_check --dtype bfloat16 --out "$PARTS/gpu-vllm-bf16.json"
    step vllm-fp32 "$VPY" -m benchmarks.vllm_check --dtype float32 --out "$PARTS/gpu-vllm-fp32.json"
    PART_FILES=("$PARTS/gpu-bench.json" "$PARTS/gpu-matrix.json" "$PARTS/gpu-vllm-bf16.json" \
        "$PARTS/gpu-vllm-fp32.json")
fi

step merge "$PY" -m benchmarks.gpu_bench --merge "${PART_FILES[@]}" --out "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu.sh: failed steps: ${FAILED[*]} (see $OUT)" >&2
    exit 1
fi
echo "gpu.sh: all steps passed; wrote $OUT"
