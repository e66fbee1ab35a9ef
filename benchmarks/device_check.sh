#!/usr/bin/env bash
# The one prepared check for a lent GPU (H100/H200, Python 3.12, jax 0.11 with CUDA, torch and
# triton installed, no network), about 9.5 minutes, all output in one folder:
#   (a) kernel tests compiled on the GPU against the same references as on CPU: our Pallas
#       kernels (state sweep, flash attention, NSA's selected blocks), jax-linear-attention's Mosaic GPU kernels in
#       bf16 on packed rows, tokamax's attention and cuDNN's;
#   (b) every linear op at B4 T4096 H16 D128 and B1 T8192 H16 D128 bf16, forward and
#       forward+backward, side by side: xla / pallas / jla (ours and the library's kernels
#       behind our signature) / fla (flash-linear-attention's Triton) / flashqla (FlashQLA,
#       Gated DeltaNet only), ms, TFLOP/s and each row over the fastest;
#   (c) attention full causal vs window 1024 at T 4096 and 16384: auto / xla / flash / cudnn /
#       tokamax; NSA (the paper's blocks; its XLA gathered form and its Pallas kernels) beside
#       them at 16384 and 65536 against the fastest full-causal backend;
#   (d) train-step tokens/s of configs/presets/gdn_swa_125m.yaml at seq 4096: "auto" (what it
#       picks on this GPU: jla and cuDNN on an H100) against everything on "xla".
#
#   bash benchmarks/device_check.sh [OUT_DIR]        # default benchmarks/results/device
#
# Packages the device image lacks (jax-linear-attention, tokamax, fla, flash-qla and FlashQLA's
# tilelang with its apache-tvm-ffi and torch-c-dlpack-ext): put their wheels in .whl/ of the
# checkout and carry .whl (pip download --no-deps ... -d .whl); this script installs whatever
# .whl holds into /tmp/site first. A peer that still cannot import is a "skipped" row with the
# reason. Each part has its own time limit, so one hanging part cannot eat the others' time.
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
  for m in jla tokamax fla flash_qla; do
    python3 -c "import $m; print('$m', getattr($m, '__version__', 'installed'))" 2>&1 | tail -1
  done; } | tee "$OUT/env.txt"

status=0
echo "== (a) kernel tests, compiled on the GPU" | tee "$OUT/summary.txt"
timeout 100 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:benchmark -rs \
  tests/test_state_passing.py tests/test_op_pallas.py tests/test_attention_kernels.py \
  tests/test_library_backends.py tests/test_op_nsa_kernels.py -k "not tpu and not splash and not deltanet_tpu" \
  > "$OUT/kernel_tests.txt" 2>&1 || status=1
tail -3 "$OUT/kernel_tests.txt" | tee -a "$OUT/summary.txt"

echo "== (b) linear ops, bf16: xla / pallas / jla / fla / flashqla" | tee -a "$OUT/summary.txt"
timeout 170 python3 benchmarks/kernels.py --backends xla pallas jla fla flashqla \
  --shapes 4x4096x16x128 1x8192x16x128 --dtype bfloat16 --repeats 5 --skip_attention \
  --out "$OUT/linear" > "$OUT/linear.log" 2>&1 || status=1
cat "$OUT/linear/kernels_gpu.md" 2>/dev/null | tee -a "$OUT/summary.txt" || tail -20 "$OUT/linear.log"

echo "== (c) attention at T 4096 / 16384: full causal vs window 1024" | tee -a "$OUT/summary.txt"
timeout 90 python3 benchmarks/kernels.py --skip_linear --attn_T 4096 16384 --window 1024 \
  --attn_backends auto xla flash cudnn tokamax --dtype bfloat16 --repeats 5 --skip_nsa \
  --out "$OUT/attention" > "$OUT/attention.log" 2>&1 || status=1
cat "$OUT/attention/kernels_gpu.md" 2>/dev/null | tee -a "$OUT/summary.txt" || tail -20 "$OUT/attention.log"
timeout 90 python3 benchmarks/kernels.py --skip_linear --attn_T 16384 65536 --window 1024 \
  --attn_backends cudnn flash --dtype bfloat16 --repeats 3 \
  --out "$OUT/nsa" > "$OUT/nsa.log" 2>&1 || status=1
cat "$OUT/nsa/kernels_gpu.md" 2>/dev/null | tee -a "$OUT/summary.txt" || tail -20 "$OUT/nsa.log"

echo "== (d) train step, gdn_swa_125m at seq 4096: auto vs xla" | tee -a "$OUT/summary.txt"
timeout 110 python3 benchmarks/train_step.py configs/presets/gdn_swa_125m.yaml --seq_len 4096 \
  --batch 2 --variants auto xla --repeats 5 --out "$OUT/train_step" \
  > "$OUT/train_step.log" 2>&1 || status=1
cat "$OUT/train_step/train_step_gpu.md" 2>/dev/null | tee -a "$OUT/summary.txt" \
  || tail -20 "$OUT/train_step.log"
exit $status
