#!/usr/bin/env bash
# Train-step throughput of moescope and of the PyTorch peer (../shared/bench),
# measured side by side in one run, alternating (ours, peer, ours, peer) so that
# machine noise hits both. Prints each result and the ratio of medians.
#
#   scripts/bench_vs_peer.sh [tiny|small|paper]      (env: STEPS, WARMUP, THREADS, ROUNDS, PEER_PY, PEER)
#
# The peer needs torch outside the repo (see ../shared/bench/README.md):
#   python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip install torch numpy
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-tiny}
STEPS=${STEPS:-40}; WARMUP=${WARMUP:-10}; THREADS=${THREADS:-2}; ROUNDS=${ROUNDS:-2}
PEER_PY=${PEER_PY:-/tmp/peer-venv/bin/python}
PEER=${PEER:-../shared/bench/nanogpt_moe.py}
cargo build --release -q
BIN=./target/release/moescope
ours_all=(); peer_all=()
for r in $(seq "$ROUNDS"); do
  ours=$($BIN bench train --preset "$PRESET" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" 2>/dev/null | tail -1)
  cmd=$(printf '%s' "$ours" | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_command"])')
  peer=$("$PEER_PY" "$PEER" ${cmd#python nanogpt_moe.py } | tail -1)
  echo "round $r ours: $ours" | cut -c1-400
  echo "round $r peer: $peer" | cut -c1-400
  ours_all+=("$ours"); peer_all+=("$peer")
done
python3 - "$PRESET" "${#ours_all[@]}" "${ours_all[@]}" "${peer_all[@]}" <<'PY'
import json, statistics, sys
preset, n = sys.argv[1], int(sys.argv[2])
ours = [json.loads(s) for s in sys.argv[3:3 + n]]
peer = [json.loads(s) for s in sys.argv[3 + n:]]
o = statistics.median(r["tokens_per_s"] for r in ours)
p = statistics.median(r["tokens_per_s"] for r in peer)
print(json.dumps({"preset": preset, "ours_tokens_per_s": round(o, 1), "peer_tokens_per_s": round(p, 1),
                  "ratio_ours_over_peer": round(o / p, 3),
                  "ours_cpu_util": [round(r["cpu_util"], 2) for r in ours],
                  "peer_cpu_util": [round(r["cpu_util"], 2) for r in peer]}))
PY
