"""A batch over the token budget runs as several forward passes, with the same losses, gradients and adapter."""

import json

import pytest

from conftest import assert_same_adapter, logged_losses, run_script, synthetic_train_json

TRAIN = ("--model_id=tiny-random", "--train_json_path=train.json", "--val_json_path=", "--lora_dropout=0.0",
         "--max_steps=3", "--save_steps=3", "--logging_steps=1", "--num_workers=0", "--swanlab_mode=disabled")


def test_split_batches_train_as_whole_ones(tmp_path):
    synthetic_train_json(tmp_path, 48, seed=3)
    whole = run_script("train.py", *TRAIN, "--output_dir=whole", cwd=tmp_path)
    split = run_script("train.py", *TRAIN, "--output_dir=split", "--max_tokens_per_forward=1200", cwd=tmp_path)
    assert "16 per forward pass x 1 accumulation" in whole.stdout
    assert "a batch of over 1,200 tokens is split" in split.stdout
    results = json.loads((tmp_path / "split" / "train_results.json").read_text())
    assert results["split_batches"] == 3 and results["max_tokens_per_forward"] == 1200
    whole_losses, whole_norms = logged_losses(tmp_path / "whole" / "checkpoint-3")
    split_losses, split_norms = logged_losses(tmp_path / "split" / "checkpoint-3")
    assert split_losses == pytest.approx(whole_losses, rel=1e-5) and split_norms == pytest.approx(whole_norms, rel=1e-5)
    assert_same_adapter(tmp_path / "split", tmp_path / "whole")


def test_the_token_budget_and_a_fixed_micro_batch_are_refused_together(tmp_path):
    result = run_script("train.py", "--model_id=tiny-random", "--max_tokens_per_forward=1000", "--micro_batch_size=4",
                        cwd=tmp_path, check=False)
    assert result.returncode != 0 and "--max_tokens_per_forward" in result.stderr and "Use one of the two" in result.stderr
