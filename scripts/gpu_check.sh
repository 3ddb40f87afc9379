#!/usr/bin/env bash
# The CUDA build checked on a GPU machine, in one short run (under 8 minutes
# on an H200). Two steps, on two machines:
#
#   PEER_SRC=/path/to/nanogpt_moe.py scripts/gpu_check.sh prepare
#                                  (here: scripts/build_cuda.sh, then the binary
#                                   stripped and xz-compressed, and a copy of
#                                   the PyTorch peer, into target/gpu-check/)
#   scripts/gpu_check.sh           (on the GPU machine, from the repository root,
#                                   with target/gpu-check/ carried along)
#
# On the GPU machine it prints:
# 1. `bench device`: a tiny model's loss and every parameter gradient on
#    CUDA against the CPU (fails above 1e-4 relative);
# 2. `bench train --preset paper --device cuda` and the peer's
#    `nanogpt_moe.py --config paper --device cuda` (same shapes, fp32, each
#    step timed after a synchronize), alternating, with the ratio;
# 3. what this build does not run on the GPU yet (analysis of Hugging Face
#    checkpoints), said rather than skipped silently.
#
# env: PY (a Python with torch and NVIDIA's cu13 libraries; default python3),
#      PEER (the peer script; default target/gpu-check/nanogpt_moe.py),
#      STEPS, WARMUP, ROUNDS.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=target/gpu-check

if [ "${1:-}" = prepare ]; then
  set -e
  BIN=$(scripts/build_cuda.sh | tail -1)
  mkdir -p "$DIR"
  strip -o "$DIR/moescope" "$BIN"
  xz -6 -T0 -f -k "$DIR/moescope"
  rm "$DIR/moescope"
  [ -f "${PEER_SRC:-}" ] || { echo "gpu_check: set PEER_SRC to the PyTorch peer's nanogpt_moe.py"; exit 1; }
  cp "$PEER_SRC" "$DIR/nanogpt_moe.py"
  ls -l "$DIR"
  exit 0
fi

PY=${PY:-python3}
PEER=${PEER:-$DIR/nanogpt_moe.py}
STEPS=${STEPS:-30}; WARMUP=${WARMUP:-5}; ROUNDS=${ROUNDS:-2}
BIN=$DIR/moescope
if [ ! -x "$BIN" ]; then
  xz -dc "$DIR/moescope.xz" > "$BIN" && chmod +x "$BIN" ||
    { echo "gpu_check: no $DIR/moescope.xz (run \`scripts/gpu_check.sh prepare\` first)"; exit 1; }
fi
# The CUDA libraries the binary loads at run time: the driver's (on the
# loader's path already) and NVIDIA's wheels beside torch.
CU_LIB=$("$PY" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=${CU_LIB:+$CU_LIB:}${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

LOG=$(mktemp -d)
echo "== 1. loss and gradients, CUDA against the CPU"
timeout 120 "$BIN" bench device --device cuda 2>"$LOG/device.err" | tail -1
status=$?
cat "$LOG/device.err"

echo "== 2. training step, paper preset, against the PyTorch peer"
for r in $(seq "$ROUNDS"); do
  ours=$(timeout 200 "$BIN" bench train --preset paper --device cuda --steps "$STEPS" --warmup "$WARMUP" 2>"$LOG/ours.err" | tail -1)
  peer=$(timeout 200 "$PY" "$PEER" --config paper --device cuda --steps "$STEPS" --warmup "$WARMUP" 2>"$LOG/peer.err" | tail -1)
  if ! "$PY" - "$r" "$ours" "$peer" <<'PY'
import json, sys
r, ours, peer = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    o, p = json.loads(ours), json.loads(peer)
except ValueError:
    print(f"round {r}: no result")
    sys.exit(1)
print(f"round {r}: moescope {o['tokens_per_s']:.0f} tokens/s ({o['engine']}), "
      f"peer {p['tokens_per_s']:.0f} tokens/s, ratio {o['tokens_per_s'] / p['tokens_per_s']:.3f}")
PY
  then
    status=1
    echo "-- ours (stderr, last lines):"; tail -5 "$LOG/ours.err"
    echo "-- peer (stderr, last lines):"; tail -5 "$LOG/peer.err"
  fi
done

echo "== 3. Hugging Face analysis on the GPU"
echo "not in this build: analysis of Hugging Face checkpoints runs on the CPU (docs/DESIGN.md, CUDA)"
exit $status
