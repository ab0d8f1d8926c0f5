"""``tools/gpu_run_20.sh`` (issue 20's GPU run) in its CPU smoke mode: every stage runs or
says why not, within the deadline, and writes the files the device tool brings back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_run_20.sh"


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPT.is_file(), reason="tools/ is not part of an installed package")
def test_gpu_run_20_smoke(tmp_path):
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=600)
    log = (tmp_path / "run.log").read_text()
    assert done.returncode == 0, done.stderr + log
    assert "== reference: skipped (needs CUDA)" in log
    assert "== precision fp16: skipped" in log
    for stage in ("bench gpu", "precision bf16", "bench compile"):
        assert f"== {stage}: exit 0" in log, log
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["bench_compile.json", "bench_gpu.json", "gpu.txt", "precision_bf16.json",
                     "run.log"]
    assert len(names) <= 8  # the device tool brings back at most 8 files
    bench = json.loads((tmp_path / "bench_gpu.json").read_text())
    r = bench["results"]
    assert r["static-eager-bf16"]["quality"]["psnr_vs_fp32"] > 0
    assert "needs a CUDA device" in r["cuda-graph-bf16"]["skipped"]
    comp = json.loads((tmp_path / "bench_compile.json").read_text())
    assert "needs a CUDA device" in comp["results"]["compile+cuda-graph-bf16"]["skipped"]
    prec = json.loads((tmp_path / "precision_bf16.json").read_text())
    assert set(prec["runs"]) == {"fp32", "fast-bf16", "bf16"}
    assert "reference: tools/reference_nti_gpu.py" in (tmp_path / "gpu.txt").read_text() or \
        "reference_nti_gpu.py sha256" in (tmp_path / "gpu.txt").read_text()
