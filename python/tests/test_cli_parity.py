"""moescope.analyze and moescope.load_run against the command line's own output."""

import json
import math

import pytest

import moescope
from conftest import run_cli


def assert_same(a, b, path="report"):
    """Equal JSON values, floats to 1e-9 relative."""
    if isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None, path
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)), f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


def test_analyze_a_run_as_the_cli_does(micro_run, moescope_bin, tmp_path):
    out = tmp_path / "cli.json"
    run_cli(moescope_bin, "analyze", "--model", micro_run, "--tokens", 256, "--out", out, "--granularity", "flat,rows")
    cli = json.loads(out.read_text())
    py = moescope.analyze(micro_run, tokens=256, granularity=["flat", "rows"])
    assert py["layers"], "the analysis has layers"
    assert_same(py, cli)


def test_analyze_a_hugging_face_checkpoint_as_the_cli_does(tiny_hf, moescope_bin, tmp_path):
    ck, ids = tiny_hf
    out = tmp_path / "cli.json"
    args = ["--token-ids", ids, "--tokens", 128, "--seq-len", 32, "--jacobian", "exact", "--subspace", "4"]
    run_cli(moescope_bin, "analyze", "--model", ck, *args, "--out", out)
    cli = json.loads(out.read_text())
    py = moescope.analyze(ck, token_ids=ids, tokens=128, seq_len=32, jacobian="exact", subspace=4)
    assert py["layers"][0]["jacobian"]["mode"] == "exact"
    assert_same(py, cli)


def test_analyze_errors_are_python_exceptions(micro_run, tmp_path):
    with pytest.raises(ValueError, match="unknown option `tokenz`"):
        moescope.analyze(micro_run, tokenz=5)
    with pytest.raises(ValueError, match="jacobian: unknown Jacobian mode `fast`"):
        moescope.analyze(micro_run, jacobian="fast")
    with pytest.raises(ValueError, match="does-not-exist: no such file or folder"):
        moescope.analyze(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="subspace"):
        moescope.analyze(micro_run, subspace=0)
    with pytest.raises(ValueError, match="data and token_ids"):
        moescope.analyze(micro_run, data="x.txt", token_ids="ids.json")


def test_load_run_reads_the_metrics(micro_run):
    run = moescope.load_run(micro_run)
    lines = (micro_run / "metrics.jsonl").read_text().splitlines()
    assert len(run) == len(lines)
    assert run[0]["kind"] == "start"
    assert run == [json.loads(line) for line in lines]
    assert run.summary is not None
    pd = pytest.importorskip("pandas", reason="pandas is not installed; Run.frame() is not tested")
    frame = run.frame("train")
    assert list(frame["step"]) == [r["step"] for r in run if r["kind"] == "train"]


def test_load_run_names_a_corrupt_line(micro_run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text((micro_run / "metrics.jsonl").read_text() + "{not json\n")
    with pytest.raises(ValueError, match="metrics.jsonl"):
        moescope.load_run(bad)


def test_load_run_leaves_out_a_torn_last_line(micro_run, tmp_path):
    """A killed writer leaves half a line; the reader drops it, as the CLI does."""
    torn = tmp_path / "torn"
    torn.mkdir()
    text = (micro_run / "metrics.jsonl").read_text()
    (torn / "metrics.jsonl").write_text(text + '{"kind":"train","st')
    assert len(moescope.load_run(torn)) == len(text.splitlines())
