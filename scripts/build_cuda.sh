#!/usr/bin/env bash
# Builds moescope with the CUDA backend, offline-capable, on a machine
# without a GPU, and prints the binary's path on the last line.
#
#   scripts/build_cuda.sh            (env: CUDA_VENV, CUDA_COMPUTE_CAP, CUDA_TARGET)
#
# What it does (docs/DESIGN.md, "CUDA"):
# 1. installs NVIDIA's CUDA 13.0 compiler and libraries from PyPI into a
#    virtual environment outside the repository (CUDA_VENV, reused when it
#    has them). Every wheel is pinned to 13.0: an unpinned nvidia-nvvm emits
#    PTX that the 13.0 assembler and a CUDA 13.0 driver reject;
# 2. copies the locked candle-core and candle-kernels from cargo's registry and
#    patches them so that the binary loads CUDA at run time instead of
#    linking it: cudarc's `dynamic-loading` instead of `dynamic-linking`, and
#    the CUDA runtime linked statically (it opens the driver itself, lazily).
#    The binary then starts on machines without a driver; `--device cuda`
#    there fails with a message naming what is missing;
# 3. builds the release binary with `--features cuda` for Hopper (sm_90;
#    CUDA_COMPUTE_CAP to change) from a copy of the working tree, so that
#    the patch never touches this checkout's Cargo.lock, into CUDA_TARGET.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CUDA_VENV=${CUDA_VENV:-$HOME/.cache/moescope/cuda-venv}
CUDA_TARGET=${CUDA_TARGET:-$ROOT/target/cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
WHEELS=("nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
  "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*"
  "nvidia-cuda-nvrtc==13.0.*" "nvidia-curand==10.4.0.*")

say() { echo "build_cuda: $*" >&2; }

# 1. The toolkit.
if [ ! -x "$CUDA_VENV/bin/python" ]; then
  say "creating $CUDA_VENV"
  python3 -m venv "$CUDA_VENV"
fi
CU=$("$CUDA_VENV/bin/python" -c 'import os, sysconfig; print(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13"))')
if [ ! -x "$CU/bin/nvcc" ] || [ ! -f "$CU/lib/libcudart_static.a" ]; then
  say "installing the CUDA 13.0 wheels into $CUDA_VENV"
  "$CUDA_VENV/bin/pip" install -q "${WHEELS[@]}"
fi
"$CU/bin/nvcc" --version | tail -1 >&2

# 2. The patched crates: the locked candle-core and candle-kernels, copied
#    from cargo's registry (their folders are named <crate>-<version>).
PATCHED=$CUDA_TARGET/patched
cargo fetch --locked -q
CRATES=$(cargo metadata --format-version 1 --locked --features cuda |
  python3 -c 'import json, os, sys
m = json.load(sys.stdin)
for name in ("candle-core", "candle-kernels"):
    print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == name))') ||
  { say "cargo metadata could not locate candle-core and candle-kernels"; exit 1; }
read -r CORE_SRC KERNELS_SRC <<<"$(echo $CRATES)"
CORE=$PATCHED/$(basename "$CORE_SRC")
KERNELS=$PATCHED/$(basename "$KERNELS_SRC")
rm -rf "${PATCHED:?}"
mkdir -p "$PATCHED"
cp -rp "$CORE_SRC" "$CORE"
cp -rp "$KERNELS_SRC" "$KERNELS"
sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$CORE/Cargo.toml"
grep -q '"dynamic-loading"' "$CORE/Cargo.toml" ||
  { say "could not switch candle-core's cudarc to dynamic-loading"; exit 1; }
sed -i 's|println!("cargo:rustc-link-lib=dylib=cudart");|println!("cargo:rustc-link-search=native={}", std::env::var("MOESCOPE_CUDA_LIB").unwrap()); println!("cargo:rustc-link-lib=static=cudart_static"); println!("cargo:rustc-link-lib=dylib=dl"); println!("cargo:rustc-link-lib=dylib=rt");|' "$KERNELS/build.rs"
grep -q cudart_static "$KERNELS/build.rs" || { say "could not link candle-kernels' CUDA runtime statically"; exit 1; }

# 3. The build, from a copy of the working tree.
SRC=$CUDA_TARGET/src
rm -rf "${SRC:?}"  # a fresh copy: files deleted here must not linger there
mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard |
  tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$SRC"
cat >> "$SRC/Cargo.toml" <<EOF

[patch.crates-io]
candle-core = { path = "$CORE" }
candle-kernels = { path = "$KERNELS" }
EOF
export PATH=$CU/bin:$PATH CUDA_ROOT=$CU CUDA_PATH=$CU CUDA_HOME=$CU MOESCOPE_CUDA_LIB=$CU/lib
export LIBRARY_PATH=$CU/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
# A portable x86-64 binary: the GPU machine's CPU is not this one.
export RUSTFLAGS="-C target-cpu=x86-64-v3"
say "building (about 10 minutes on 2 cores; compute capability $CUDA_COMPUTE_CAP)"
(cd "$SRC" && CARGO_TARGET_DIR=$CUDA_TARGET/target cargo build --release --features cuda -p moescope)
BIN=$CUDA_TARGET/target/release/moescope
DEPS=$(ldd "$BIN") || { say "ldd failed on $BIN"; exit 1; }
if grep -Eq 'libcuda|libcublas|libcudart|libnvrtc|libcurand' <<<"$DEPS"; then
  say "the binary links CUDA libraries at start-up; the run-time loading patch did not take"
  echo "$DEPS" >&2
  exit 1
fi
echo "$BIN"
