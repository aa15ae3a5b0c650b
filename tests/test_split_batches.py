"""A batch over the token budget runs as several forward passes, with the same losses, gradients and adapter."""

import json

import pytest

from conftest import assert_same_adapter, logged_losses, run_script, synthetic_train_json

pytestmark = pytest.mark.slow  # runs the scripts as a user does

TRAIN = ("--model_id=tiny-random", "--train_json_path=train.json", "--val_json_path=", "--lora_dropout=0.0",
         "--max_steps=3", "--save_steps=3", "--logging_steps=1", "--num_workers=0", "--swanlab_mode=disabled")


def test_split_batches_train_as_whole_ones(tmp_path):
    synthetic_train_json(tmp_path, 48, seed=3)
    run_script("train.py", *TRAIN, "--output_dir=whole", cwd=tmp_path)
    run_script("train.py", *TRAIN, "--output_dir=split", "--max_tokens_per_forward=1200", cwd=tmp_path)
    whole_plan = json.loads((tmp_path / "whole" / "train_results.json").read_text())
    assert (whole_plan["micro_batch_size"], whole_plan["max_tokens_per_forward"]) == (16, 0)
    results = json.loads((tmp_path / "split" / "train_results.json").read_text())
    assert results["split_batches"] == 3 and results["max_tokens_per_forward"] == 1200
    whole_losses, whole_norms = logged_losses(tmp_path / "whole" / "checkpoint-3")
    split_losses, split_norms = logged_losses(tmp_path / "split" / "checkpoint-3")
    assert split_losses == pytest.approx(whole_losses, rel=1e-5) and split_norms == pytest.approx(whole_norms, rel=1e-5)
    assert_same_adapter(tmp_path / "split", tmp_path / "whole")
