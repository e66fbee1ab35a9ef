#!/usr/bin/env bash
# One prepared check for a lent GPU (H100/H200, jax with CUDA), at most ~8 minutes, all output
# in one folder:
#   (a) the kernel tests compiled on the GPU (JAX_PLATFORMS=cuda turns tests/pallas_mode.py's
#       interpret mode off for the GPU kernels: state_passing, the fused outputs, every linear
#       op's pallas backend, flash attention), against the same references as on CPU;
#   (b) benchmarks/kernels.py at (4, 4096, 16, 128) bf16 for gated_delta_rule and gla:
#       xla / pallas / fla side by side (fla = flash-linear-attention's Triton
#       chunk_gated_delta_rule / chunk_gla through torch);
#   (c) full causal vs window 1024 attention at T = 16384 (xla, flash, cuDNN through "auto").
#
#   bash benchmarks/device_check.sh [OUT_DIR]        # default benchmarks/results/device
#
# fla is not on the device image: put its wheel (and nothing else it lacks) in .whl/ of the
# checkout and carry .whl; this script installs whatever .whl holds into /tmp/site first.
# Each part has its own time limit, so one hanging part cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/device}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD:${PYTHONPATH:-}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" 2>&1
  python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1; } | tee "$OUT/env.txt"

status=0
echo "== (a) kernel tests, compiled on the GPU" | tee "$OUT/summary.txt"
timeout 200 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:benchmark -x \
  tests/test_state_passing.py tests/test_op_pallas.py tests/test_attention_kernels.py \
  -k "not tpu and not splash" > "$OUT/kernel_tests.txt" 2>&1 || status=1
tail -3 "$OUT/kernel_tests.txt" | tee -a "$OUT/summary.txt"

echo "== (b) linear ops at 4x4096x16x128 bf16: xla / pallas / fla" | tee -a "$OUT/summary.txt"
timeout 170 python3 benchmarks/kernels.py --ops gated_delta_rule gla --backends xla pallas fla \
  --shapes 4x4096x16x128 --dtype bfloat16 --repeats 5 --skip_attention --out "$OUT/linear" \
  > "$OUT/linear.log" 2>&1 || status=1
cat "$OUT/linear/kernels_gpu.md" 2>/dev/null | tee -a "$OUT/summary.txt" || tail -20 "$OUT/linear.log"

echo "== (c) attention at T=16384: full causal vs window 1024" | tee -a "$OUT/summary.txt"
timeout 110 python3 benchmarks/kernels.py --skip_linear --attn_T 16384 --window 1024 \
  --attn_backends auto xla flash --dtype bfloat16 --repeats 5 --out "$OUT/attention" \
  > "$OUT/attention.log" 2>&1 || status=1
cat "$OUT/attention/kernels_gpu.md" 2>/dev/null | tee -a "$OUT/summary.txt" || tail -20 "$OUT/attention.log"
exit $status
