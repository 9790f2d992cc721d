"""benchmarks/gpu_check.py's CPU path on tiny sizes, so that the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu(tmp_path):
    from phalanx.training import METHODS

    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["tiny"]
    assert res["tests"]["returncode"] == 0 and res["tests"]["counts"].get("failed", 0) == 0
    assert set(res["training"]) == set(METHODS.names())
    bad = {k: v["error"] for k, v in res["training"].items() if not v["ok"]}
    assert not bad
    for name in ("pgd50", "autoattack"):
        a = res["attacks"][name]
        assert a["perturbation_inside_ball"] and a["attack_s"] > 0 and a["bare_forward_backward_s"] > 0
    assert res["ddp"]["backend"] == "gloo" and res["ddp"]["two_process_epoch_s"] > 0
