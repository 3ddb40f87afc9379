"""Python against Rust: the same measure on 8 experts of 2048 × 512 (float32),
called from Python (numpy in, conversion and GIL release included) and from
Rust directly (moescope._native.bench_*, no Python in the loop).

    python python/benches/bench_measures.py [--reps N]

Prints one line per measure with both times and their ratio (goal ≤ 1.2).
"""

import argparse
import time

import numpy as np

import moescope
from moescope import _native

E, R, C = 8, 2048, 512


def per_call(f, reps):
    f()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    w = (np.random.default_rng(0).random((E, R, C), dtype=np.float32) - 0.5)
    rows = []
    for g in ("flat", "rows", "cols"):
        py = per_call(lambda: moescope.weight_overlap(w, g), a.reps)
        rs = _native.bench_weight_overlap(E, R, C, g, a.reps)
        rows.append((f"weight_overlap {g}", py, rs))
    py = per_call(lambda: moescope.orth_loss(w), a.reps)
    rs = _native.bench_orth_loss(E, R, C, a.reps)
    rows.append(("orth_loss flat (value + gradient)", py, rs))
    print(f"{'measure (8 experts of 2048x512, f32)':<36} {'python ms':>10} {'rust ms':>10} {'ratio':>6}")
    for name, py, rs in rows:
        print(f"{name:<36} {py * 1e3:>10.2f} {rs * 1e3:>10.2f} {py / rs:>6.2f}")


if __name__ == "__main__":
    main()
