"""bench/gpu.py runs on a lent GPU once, with no second try: its whole code path must keep working.
`--cpu-smoke` runs it on tiny models of both families on the CPU (it stubs the repository and the
storage with in-memory ones, which must follow the real ones' signatures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_benchmark_runs_its_whole_path_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCMQ_")} | {"LCMQ_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--cpu-smoke", "--out", str(tmp_path / "gpu.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    figures = dict(pair.split("=") for pair in last.split())
    assert float(figures["sd15_64_smoke_lcmq_img_s"]) > 0 and float(figures["sdxl_64_smoke_lcmq_img_s"]) > 0
    assert (tmp_path / "gpu.json").stat().st_size > 0
