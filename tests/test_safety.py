"""Weights load only from safetensors, secrets stay out of what a run writes, and a seed fixes a run."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_script

pytestmark = pytest.mark.slow  # runs the scripts as a user does


def test_pickled_weights_are_refused(tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=12", cwd=tmp_path)
    run_script("csv2json.py", cwd=tmp_path)
    result = run_script("train.py", f"--model_id={pickled}", "--device=cpu", "--swanlab_mode=disabled",
                        cwd=tmp_path, check=False)
    assert result.returncode != 0 and "no *.safetensors weights" in result.stderr
    assert "Traceback" not in result.stderr


def test_same_seed_same_split_and_same_first_losses_and_no_secret_written(tmp_path):
    secret = "sk-test-0123456789-do-not-log"
    env = dict(os.environ, SWANLAB_API_KEY=secret, HF_TOKEN=secret)
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=30", cwd=tmp_path)
    histories, outputs = [], []
    for run in ("a", "b"):
        subprocess.run([sys.executable, str(ROOT / "csv2json.py"), f"--train_json_path=train_{run}.json",
                        f"--val_json_path=val_{run}.json"], cwd=tmp_path, check=True, capture_output=True)
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--model_id=tiny-random", f"--train_json_path=train_{run}.json",
             "--val_json_path=", f"--output_dir=out_{run}", "--max_steps=3", "--batch_size=4", "--logging_steps=1",
             "--swanlab_mode=disabled", "--num_workers=0"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(result.stdout + result.stderr)
        state = json.loads((tmp_path / f"out_{run}" / "checkpoint-3" / "trainer_state.json").read_text())
        histories.append([entry["loss"] for entry in state["log_history"] if "loss" in entry])
    assert (tmp_path / "train_a.json").read_text() == (tmp_path / "train_b.json").read_text()
    assert (tmp_path / "val_a.json").read_text() == (tmp_path / "val_b.json").read_text()
    assert len(histories[0]) == 3 and histories[0] == histories[1]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".csv", ".txt")]
    assert written and not any(secret in p.read_text(errors="ignore") for p in written)
    assert not any(secret in output for output in outputs)
