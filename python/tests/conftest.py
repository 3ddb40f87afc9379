"""Fixtures: the moescope binary, a micro run trained with it, and a tiny
random Hugging Face (Mixtral-layout) checkpoint written by it."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _binary():
    """The CLI to compare with: $MOESCOPE_BIN, else the one `cargo test` built."""
    env = os.environ.get("MOESCOPE_BIN")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"MOESCOPE_BIN={env} does not exist")
        return Path(env)
    for profile in ("debug", "release"):
        p = REPO / "target" / profile / "moescope"
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="session")
def moescope_bin():
    b = _binary()
    if b is None:
        pytest.skip("no moescope binary: run `cargo build` (or set MOESCOPE_BIN) to compare with the CLI")
    return b


def run_cli(binary, *args):
    o = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True)
    assert o.returncode == 0, f"moescope {' '.join(map(str, args))}\n{o.stderr}"
    return o


@pytest.fixture(scope="session")
def micro_run(moescope_bin, tmp_path_factory):
    """A three-step run of a one-layer model on the built-in corpus."""
    d = tmp_path_factory.mktemp("micro")
    out = d / "run"
    sets = [
        "data.builtin_bytes=40000",
        f"data.cache_dir={json.dumps(str(d / 'cache'))}",
        "model.n_layer=1",
        "model.d_model=32",
        "model.d_ff=32",
        "model.seq_len=32",
        "train.max_steps=3",
        "train.eval_tokens=256",
        "train.batch_size=2",
    ]
    args = ["train", "--preset", "tiny", "--out", out, "-q"]
    for s in sets:
        args += ["--set", s]
    run_cli(moescope_bin, *args)
    return out


@pytest.fixture(scope="session")
def tiny_hf(moescope_bin, tmp_path_factory):
    """A random Mixtral-layout checkpoint with tiny shapes, and token ids for it."""
    d = tmp_path_factory.mktemp("hf")
    ck = d / "mixtral-tiny"
    run_cli(moescope_bin, "bench", "hf", "--dir", ck, "--layers", "1", "--tiny")
    cfg = json.loads((ck / "config.json").read_text())
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], size=256)
    tokens = d / "ids.json"
    tokens.write_text(json.dumps(ids.tolist()))
    return ck, tokens
