"""`make demo` (scripts/demo.sh) end to end, shrunk: synth → train → eval → held-out eval → predict,
on the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_runs_the_main_job_end_to_end(tmp_path):
    env = {
        **os.environ,
        "BIN": str(Path(sys.executable).parent),  # the medcli this test runs with
        "DEMO_DIR": str(tmp_path / "demo"),
        "DEMO_DEPTH": "tiny",
        "DEMO_SUBJECTS": "12",
        "DEMO_SIZE": "16",
        "DEMO_EPOCHS": "2",
        "DEMO_HELDOUT": "6",
        "OMP_NUM_THREADS": "1",
        "MEDCLI_HOME": str(tmp_path / "home"),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    fold = tmp_path / "demo" / "runs" / "demo" / "fold0"
    held = "eval/test-heldout"
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "eval/eval.json", "eval/roc.png"):
        assert (fold / name).stat().st_size > 0, name
    for name in ("eval.json", "roc.png", "predictions.csv"):  # step 4: the held-out set
        assert (fold / held / name).stat().st_size > 0, name
    assert json.loads((fold / held / "eval.json").read_text())["pooled"]["n"] == 6
    assert "held-out test set" in proc.stdout
    assert "== done in" in proc.stdout
    assert "P(HGG)" in proc.stdout  # the prediction table of step 5: a held-out subject's
    assert "BraTS19_SYN_" in proc.stdout and "trained or validated on" not in proc.stderr
