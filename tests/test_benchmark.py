"""The throughput benchmarks (training, decoding) run with one command each and print their ratios (tiny sizes here)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_prints_the_hf_ratio_and_mfu(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--rounds", "1",
                          "--n-layer", "1", "--n-embd", "64", "--block", "32", "--batch", "2", "--vocab", "256",
                          "--json", str(tmp_path / "bench.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "labkit / HF tokens/s:" in out.stdout and "labkit MFU:" in out.stdout, out.stdout
    assert (tmp_path / "bench.json").exists()


def test_decode_benchmark_prints_the_bounds_the_table_and_both_targets(tmp_path):
    """Tiny mode: a random 2-layer Llama, every torch stack once; ORT and llama.cpp say they skipped."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_throughput.py"), "--tiny", "--rounds", "1",
                          "--prompt-tokens", "8", "--new-tokens", "6", "--json", str(tmp_path / "decode.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("memcpy:", "weight-streaming floor, [out, in]", "weight-streaming floor, [in, out]",
                 "target, labkit fp32, fused step:", "skipped in --tiny mode"):
        assert line in out.stdout, f"missing {line!r} in:\n{out.stdout}"
    result = json.loads((tmp_path / "decode.json").read_text())
    stacks = result["stacks"]
    assert set(stacks) == {"HF generate, eager", "HF generate, sdpa", "labkit fp32, modules",
                           "labkit fp32, fused step", "labkit int8, fused step", "labkit int4, fused step"}
    assert all(s["tokens_per_s"] > 0 and s["bytes_per_token"] > 0 for s in stacks.values())
    assert stacks["labkit int4, fused step"]["bytes_per_token"] < stacks["labkit fp32, fused step"]["bytes_per_token"]
