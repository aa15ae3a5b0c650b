"""An interrupted training run continues from its last complete checkpoint and lands where an
uninterrupted one does."""

import json
import shutil

import torch
from safetensors.torch import load_file

import pytest

from conftest import run_script

pytestmark = pytest.mark.slow  # runs the scripts as a user does

ADAPTER = "output/Qwen2-VL-2B-LatexOCR"
# A constant learning rate, so that stopping after 4 of 6 steps (as a crash would) leaves the schedule alone.
COMMON = ["--model_id=tiny-random", "--batch_size=4", "--save_steps=2", "--swanlab_mode=disabled",
          "--val_json_path=", "--learning_rate=1e-3", "--lr_scheduler_type=constant"]  # DataLoader workers: the default


def test_resume_lands_on_the_same_step_and_adapter(tmp_path):
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=30", cwd=tmp_path)
    run_script("csv2json.py", cwd=tmp_path)
    straight = run_script("train.py", *COMMON, "--max_steps=6", "--output_dir=straight", cwd=tmp_path)
    assert "resuming" not in straight.stdout

    run_script("train.py", *COMMON, "--max_steps=4", "--output_dir=resumed", cwd=tmp_path)
    # A crash while writing checkpoint-6 leaves a folder without the Trainer's state: it must be passed over.
    half = tmp_path / "resumed" / "checkpoint-6"
    shutil.copytree(tmp_path / "resumed" / "checkpoint-4", half)
    (half / "trainer_state.json").unlink()
    resumed = run_script("train.py", *COMMON, "--max_steps=6", "--output_dir=resumed", cwd=tmp_path)
    assert "resuming from resumed/checkpoint-4 (step 4)" in resumed.stdout  # what the user is told
    assert json.loads((tmp_path / "resumed" / "train_results.json").read_text())["resumed_from_step"] == 4

    state = json.loads((tmp_path / "resumed" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    steps_run = [json.loads((tmp_path / name / "train_results.json").read_text())["steps_this_run"]
                 for name in ("straight", "resumed")]
    assert steps_run == [6, 2]  # the resumed run did only what was left
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    assert any(a[name].abs().sum() > 0 for name in a if "lora_B" in name)  # training moved the adapter

    again = run_script("train.py", *COMMON, "--max_steps=6", "--output_dir=straight", cwd=tmp_path)
    assert "nothing left to train, checkpoint-6 is the last of the 6 steps (--resume=false starts over)" in again.stdout
    assert "plan: none, nothing is left to train" in again.stdout  # no time spent on a run that is done
    c = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert all(torch.equal(a[name], c[name]) for name in a)  # saved again from checkpoint-6, unchanged


def test_resume_refuses_checkpoints_of_other_settings(tmp_path):
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=30", cwd=tmp_path)
    run_script("csv2json.py", cwd=tmp_path)
    run_script("train.py", *COMMON, "--max_steps=2", cwd=tmp_path)
    other = run_script("train.py", *COMMON, "--max_steps=4", "--lora_rank=8", cwd=tmp_path, check=False)
    assert other.returncode != 0 and "lora_rank: 64 -> 8" in other.stderr
    assert "model:" not in other.stdout  # refused before the weights were loaded
    fresh = run_script("train.py", *COMMON, "--max_steps=2", "--lora_rank=8", "--resume=false", cwd=tmp_path)
    assert "resuming" not in fresh.stdout


def test_a_full_fine_tune_resumes_to_the_same_weights(tmp_path):
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=30", cwd=tmp_path)
    run_script("csv2json.py", cwd=tmp_path)
    full = [*COMMON, "--tuner=full", "--train_vision=merger"]
    run_script("train.py", *full, "--max_steps=6", "--output_dir=straight", cwd=tmp_path)
    run_script("train.py", *full, "--max_steps=4", "--output_dir=resumed", cwd=tmp_path)
    resumed = run_script("train.py", *full, "--max_steps=6", "--output_dir=resumed", cwd=tmp_path)
    assert json.loads((tmp_path / "resumed" / "train_results.json").read_text())["resumed_from_step"] == 4
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and any(name.startswith("visual.merger.") for name in a)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), name
    again = run_script("train.py", *full, "--max_steps=6", "--output_dir=resumed", cwd=tmp_path)
    assert "nothing left to train" in again.stdout and "saved: model and processor" in again.stdout
    c = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(b[name], c[name]) for name in b)  # saved again from checkpoint-6, unchanged
    assert "resuming" in resumed.stdout and "keys in the checkpoint" not in resumed.stderr  # nothing alarming said


def test_a_time_limit_stops_and_saves_and_the_run_resumes_to_its_planned_steps(tmp_path):
    """--max_minutes stops at the first step past the limit with the weights saved as at a last step (an adapter a
    user can score), and the same command without the limit continues from there to the steps planned."""
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=30", cwd=tmp_path)
    run_script("csv2json.py", cwd=tmp_path)
    stopped = run_script("train.py", *COMMON, "--max_steps=6", "--max_minutes=0.0001", cwd=tmp_path)
    assert "time limit: 0.0001 minutes of training reached at step 1 of 6; saving" in stopped.stdout
    results = json.loads((tmp_path / ADAPTER / "train_results.json").read_text())
    assert (results["steps"], results["planned_steps"]) == (1, 6)
    assert (tmp_path / ADAPTER / "adapter_model.safetensors").is_file()
    assert (tmp_path / ADAPTER / "checkpoint-1" / "trainer_state.json").is_file()
    resumed = run_script("train.py", *COMMON, "--max_steps=6", cwd=tmp_path)
    assert "resuming from" in resumed.stdout and "(step 1)" in resumed.stdout
    results = json.loads((tmp_path / ADAPTER / "train_results.json").read_text())
    assert (results["steps"], results["resumed_from_step"]) == (6, 1)
