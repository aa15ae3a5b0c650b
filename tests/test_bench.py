"""The speed benchmark in its CPU smoke mode, so that it never rots. No timing is asserted."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from latexocr.data import read_conversations

pytestmark = pytest.mark.slow  # runs the scripts as a user does


def test_benchmark_smoke_run_measures_every_row(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--tiny=true",
                             f"--results_dir={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    for name in ("tutorial", "ours_tutorial_size", "ours"):
        row = results[name]
        assert row["steady_samples_per_s"] > 0 and row["two_epochs_s"] > 0 and 0 < row["mfu"] < 1
    for name in ("ours_tutorial_size", "ours"):  # padding left out: fewer tokens, less of the GPU's work counted
        row = results[name]
        assert 0 < row["real_tokens_per_sample"] < row["tokens_per_sample"] and 0 < row["mfu_real_tokens"] < row["mfu"]
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
    assert names == ["the model's own code, with the padding mask", "no attention mask", "+ fused RMSNorm",
                     "+ LoRA multiply-add", "+ Liger SwiGLU (GPU only)", "no LoRA, the model's own code"]
    assert all(float(row[1]) > 0 for row in rows[1:])
    assert [row[3].strip(" |") for row in rows[1:-1]] == ["yes"] * 5  # every fused row computes the first row's output


def test_peer_benchmark_smoke_run_measures_train_py_and_trl(tmp_path):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL is not installed here (the project does not need it): to run this test, pip install "
                    "trl==1.16.0 into a folder and put it on PYTHONPATH (docs/peers.md)")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "--tiny=true", "--peers=trl",
                             f"--results_dir={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "peers.json").read_text())["rows"]
    for name in ("train.py", "trl"):
        row = rows[name]
        assert "failed" not in row, row["failed"]
        assert row["samples_per_s"] > 0 and row["wall_to_adapter_s"] > 0
        assert row["losses"] and all(loss > 0 for loss in row["losses"])
    assert rows["trl"]["adapter_parameters"] == rows["train.py"]["adapter_parameters"]  # the same LoRA
    assert rows["trl"]["train_py_samples_per_s"] == rows["train.py"]["samples_per_s"]  # the ratio's own train.py
    assert "| trl |" in (tmp_path / "peers.md").read_text()


def test_memory_benchmark_runs_each_setting_through_train_py(tmp_path):
    """Each TUNER x TRAIN_VISION row is a real train.py run: what trains grows from LoRA on the language model to
    every weight, and a setting train.py refuses becomes a row saying why instead of stopping the table."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--tiny=true",
                             "--settings=lora/none,lora/all,full/all,full/sideways", f"--results_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {(r["tuner"], r["train_vision"]): r for r in json.loads((tmp_path / "memory.json").read_text())["rows"]}
    lora, lora_all, full = rows["lora", "none"], rows["lora", "all"], rows["full", "all"]
    assert 0 < lora["trainable_parameters"] < lora_all["trainable_parameters"] < full["trainable_parameters"]
    assert lora["steady_samples_per_s"] > 0 and lora["vision_cache"] and not full["vision_cache"]
    assert "sideways" in rows["full", "sideways"]["failed"]
    assert "| full / all | whole GPU |" in (tmp_path / "memory.md").read_text()


def test_from_scratch_speedrun_smoke_run_scores_held_out_formulas_at_each_checkpoint(tmp_path):
    """The speedrun's CPU mode: rendered formulas, train.py from random weights, infer.py on the held-out ones (none
    of them trained on), a held-out point per checkpoint on the curve, and the picture."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "from_scratch.py"), "--tiny=true",
                             f"--results_dir={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "from_scratch.json").read_text())
    train, test = ({s.text for s in read_conversations(tmp_path / f"{name}.json")} for name in ("train", "test"))
    assert summary["test_samples"] == len(test) > 0 and not train & test
    assert [point["step"] for point in summary["curve"]] == [6, 12]  # --save_steps=6 of 12 in the CPU mode
    assert all(0 <= point["bleu"] <= 1 for point in summary["curve"])
    assert summary["seconds"]["train_py"] > 0 and (tmp_path / "curve.png").stat().st_size > 10_000


def test_generation_benchmark_smoke_run_measures_every_mode(tmp_path):
    """On a CPU the compiled modes run the static KV cache eagerly: the path a GPU compiles."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "generation.py"), "--tiny=true",
                             f"--results_dir={tmp_path}", "--profile=bfloat16_compiled"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "generation.json").read_text())
    profile = (tmp_path / "generation_profile.txt").read_text()  # the profiled mode's operations, by time taken
    assert profile.startswith("bfloat16_compiled: one call of 3 images") and "aten::mm" in profile
    assert list(results["rows"]) == ["float32", "float32_compiled", "tfloat32", "tfloat32_compiled", "bfloat16",
                                     "bfloat16_compiled"]
    for row in results["rows"].values():
        assert row["images_per_s"] > 0 and row["first_call_s"] > 0 and row["prompt_s_per_batch"] > 0
    assert "| bfloat16_compiled |" in (tmp_path / "generation.md").read_text()
