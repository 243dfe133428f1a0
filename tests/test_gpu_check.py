"""benchmarks/gpu_check.sh --cpu-dry-run: the prepared GPU command keeps working between GPU loans (same steps, toy
sizes, on the CPU; the gpu-marked tests skip with their reason)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,  # hang guard: about 40 s on 2 idle cores
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    steps = {line.split(":")[0]: line for line in summary if ": rc=" in line}
    assert set(steps) == {"env", "tests", "bench_train", "bench_predict"}, summary
    assert all(": rc=0," in line for line in steps.values()), summary
    tests_log = (tmp_path / "tests.log").read_text()
    assert "4 skipped" in tests_log and "no CUDA device visible" in tests_log
    train_log = (tmp_path / "bench_train.log").read_text()
    rows = [line for line in train_log.splitlines() if line.startswith("| Unet/resnet18 |")]
    assert len(rows) == 2 and "ratio loader / raw decode" in train_log  # channels_last off and on
    predict_log = (tmp_path / "bench_predict.log").read_text()
    assert "| eager |" in predict_log and "| exported |" in predict_log
