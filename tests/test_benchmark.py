"""The throughput benchmark runs with one command and prints its two ratios (tiny sizes here)."""
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
