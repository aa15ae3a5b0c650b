"""The speed benchmark in its CPU smoke mode, so that it never rots. No timing is asserted."""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_smoke_run_measures_every_row(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--tiny=true",
                             f"--results_dir={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    for name in ("tutorial", "ours_tutorial_size", "ours"):
        row = results[name]
        assert row["steady_samples_per_s"] > 0 and row["two_epochs_s"] > 0 and 0 < row["mfu"] < 1
    assert results["tutorial"]["preprocess_s"] > 0  # the tutorial's .map over the data set
    assert results["ours_tutorial_size"]["patches_per_sample"] == results["tutorial"]["patches_per_sample"] == 288
    assert results["eval"]["batched_equals_one_by_one"] is True  # fp32 on CPU: exactly equal
    table = (tmp_path / "bench.md").read_text()
    assert "| tutorial |" in table and "| ours |" in table and "x speed" in table
