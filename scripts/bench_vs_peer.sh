#!/usr/bin/env bash
# Train-step throughput of moescope and of the PyTorch peer (kept outside this repository; docs/SPEED.md),
# measured side by side in one run, alternating (ours, peer, ours, peer, ...)
# so that machine noise hits both. Prints each round, then one JSON line with
# the medians, their ratio, and both processes' peak memory.
#
#   scripts/bench_vs_peer.sh [tiny|small|paper]   (env: STEPS, WARMUP, THREADS, ROUNDS, PEER_PY, PEER, ENGINE)
#
# `tiny` and `small` are the peer's configs of the same names. The peer needs
# torch outside the repo (see docs/SPEED.md):
#   python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip install torch numpy
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-tiny}
case "$PRESET" in
  small) DEF_STEPS=20; DEF_WARMUP=4 ;;
  *) DEF_STEPS=40; DEF_WARMUP=10 ;;
esac
STEPS=${STEPS:-$DEF_STEPS}; WARMUP=${WARMUP:-$DEF_WARMUP}; THREADS=${THREADS:-2}; ROUNDS=${ROUNDS:-3}
PEER_PY=${PEER_PY:-/tmp/peer-venv/bin/python}
# Set PEER to the peer's nanogpt_moe.py (default: the project machines' copy).
PEER=${PEER:-../shared/bench/nanogpt_moe.py}
ENGINE=${ENGINE:-fused}
if [ ! -x "$PEER_PY" ] || ! "$PEER_PY" -c 'import torch' 2>/dev/null; then
  echo "skip: no peer virtualenv with torch at $PEER_PY (set PEER_PY; see docs/SPEED.md)"
  exit 0
fi
if [ ! -f "$PEER" ]; then
  echo "skip: the peer script $PEER is missing (set PEER)"
  exit 0
fi
cargo build --release -q
BIN=./target/release/moescope
# Runs a command and prints its peak RSS in MB (children's ru_maxrss) on stderr.
peak() { python3 -c 'import resource,subprocess,sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
sys.stdout.write(r.stdout)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, file=sys.stderr)
sys.exit(r.returncode)' "$@"; }
ours_all=(); peer_all=(); peer_mem=()
for r in $(seq "$ROUNDS"); do
  ours=$($BIN bench train --preset "$PRESET" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" --engine "$ENGINE" 2>/dev/null | tail -1)
  cmd=$(printf '%s' "$ours" | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_command"])')
  peer=$( { peak "$PEER_PY" "$PEER" ${cmd#python nanogpt_moe.py } | tail -1; } 2>/tmp/moescope-peer-mem.$$ )
  mem=$(tail -1 /tmp/moescope-peer-mem.$$); rm -f /tmp/moescope-peer-mem.$$
  echo "round $r ours: $ours" | cut -c1-300
  echo "round $r peer: $peer" | cut -c1-300
  ours_all+=("$ours"); peer_all+=("$peer"); peer_mem+=("$mem")
done
python3 - "$PRESET" "${#ours_all[@]}" "${ours_all[@]}" "${peer_all[@]}" "${peer_mem[@]}" <<'PY'
import json, statistics, sys
preset, n = sys.argv[1], int(sys.argv[2])
ours = [json.loads(s) for s in sys.argv[3:3 + n]]
peer = [json.loads(s) for s in sys.argv[3 + n:3 + 2 * n]]
peer_mem = [float(m) for m in sys.argv[3 + 2 * n:]]
o = statistics.median(r["tokens_per_s"] for r in ours)
p = statistics.median(r["tokens_per_s"] for r in peer)
print(json.dumps({"preset": preset, "threads": ours[0]["threads"], "engine": ours[0]["engine"],
                  "ours_tokens_per_s": [round(r["tokens_per_s"], 1) for r in ours],
                  "peer_tokens_per_s": [round(r["tokens_per_s"], 1) for r in peer],
                  "ours_median": round(o, 1), "peer_median": round(p, 1),
                  "ratio_ours_over_peer": round(o / p, 3),
                  "ours_gflops": round(statistics.median(r["gflops"] for r in ours), 1),
                  "peer_gflops": round(statistics.median(r["gflops"] for r in peer), 1),
                  "gemm_ceiling_gflops": round(statistics.median(r["gemm_ceiling_gflops"] for r in ours), 1),
                  "ours_peak_rss_mb": round(max(r["peak_rss_mb"] for r in ours)),
                  "peer_peak_rss_mb": round(max(peer_mem)),
                  "ours_cpu_util": [round(r["cpu_util"], 2) for r in ours],
                  "peer_cpu_util": [round(r["cpu_util"], 2) for r in peer]}))
PY
