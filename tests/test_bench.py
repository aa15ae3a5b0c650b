"""The speed benchmark in its CPU smoke mode, so that it never rots. No timing is asserted."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # runs the scripts as a user does


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
    assert results["eval"]["float32"]["equal_to_one_by_one"] == results["eval"]["compared_images"] == 4
    assert results["eval"]["bfloat16"]["images_per_s"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "| tutorial |" in table and "| ours |" in table and "x speed" in table


def test_profiler_reports_the_steps_of_train_py_as_a_user_runs_it(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "data2csv.py"), "--source=synthetic", "--max_data_number=40"],
                   cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "csv2json.py")], cwd=tmp_path, check=True, capture_output=True)
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_train.py"), "--model_id=tiny-random",
                             "--val_json_path=", "--max_steps=2", "--swanlab_mode=disabled"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PROFILE_FROM="2", PROFILE_STEPS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "aten::mm" in result.stdout  # the operator table: the LoRA and base matrix products ran under it
    assert "ms per optimizer step" in result.stdout and "reads back from the GPU" in result.stdout
    assert (tmp_path / "output" / "Qwen2-VL-2B-LatexOCR" / "adapter_model.safetensors").is_file()  # train.py finished


def test_layer_benchmark_rows_compute_the_same_output(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "layers.py"), "--tiny=true"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [row[0].strip("| ") for row in rows[1:]]
    assert names == ["the model's own code, with the padding mask", "no attention mask", "+ LoRA multiply-add",
                     "+ Liger RMSNorm and SwiGLU (GPU only)", "no LoRA, the model's own code"]
    assert all(float(row[1]) > 0 for row in rows[1:])
    assert [row[3].strip(" |") for row in rows[1:-1]] == ["yes"] * 4  # every fused row computes the first row's output
