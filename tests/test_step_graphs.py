"""The steps CUDA graphs replay (padded to fixed shapes, the gradients added into buffers) train as the plain ones.

There is no GPU here, so nothing is captured: --cuda_graphs=true runs the same padded steps directly."""

import json

import pytest

from conftest import assert_same_adapter, logged_losses, run_script, synthetic_train_json

pytestmark = pytest.mark.slow  # runs the scripts as a user does

TRAIN = ("--model_id=tiny-random", "--train_json_path=train.json", "--val_json_path=", "--lora_dropout=0.0",
         "--max_steps=4", "--save_steps=4", "--logging_steps=1", "--num_workers=0", "--swanlab_mode=disabled")


@pytest.mark.parametrize("micro_batch", [16, 8])
def test_padded_graph_steps_train_as_plain_ones(tmp_path, micro_batch):
    synthetic_train_json(tmp_path, 40, seed=5)  # 40 = 2 batches of 16 and a short one of 8, a shape of its own
    batch = (f"--micro_batch_size={micro_batch}",)
    run_script("train.py", *TRAIN, *batch, "--output_dir=plain", "--cuda_graphs=false", cwd=tmp_path)
    run_script("train.py", *TRAIN, *batch, "--output_dir=graphs", "--cuda_graphs=true", cwd=tmp_path)
    assert not json.loads((tmp_path / "plain" / "train_results.json").read_text())["cuda_graphs_on"]
    assert json.loads((tmp_path / "graphs" / "train_results.json").read_text())["cuda_graphs_on"]
    plain_losses, plain_norms = logged_losses(tmp_path / "plain" / "checkpoint-4")
    graph_losses, graph_norms = logged_losses(tmp_path / "graphs" / "checkpoint-4")
    assert len(graph_losses) == 4
    assert graph_losses == pytest.approx(plain_losses, rel=1e-5) and graph_norms == pytest.approx(plain_norms, rel=1e-5)
    assert_same_adapter(tmp_path / "graphs", tmp_path / "plain")
    results = json.loads((tmp_path / "graphs" / "train_results.json").read_text())
    assert results["cuda_graphs"] == 0  # no GPU: nothing captured


def test_the_plain_path_trains_as_the_fast_one(tmp_path):
    """--fast=false (the stock Trainer, the model's own loss, no cache, no graphs, no fused kernels) is the reference:
    the fast path's losses, gradient norms and adapter are its own."""
    synthetic_train_json(tmp_path, 24, seed=9)
    run_script("train.py", *TRAIN, "--output_dir=plain", "--fast=false", cwd=tmp_path)
    run_script("train.py", *TRAIN, "--output_dir=fast", "--cuda_graphs=true", cwd=tmp_path)
    plain = json.loads((tmp_path / "plain" / "train_results.json").read_text())
    assert not plain["fast"] and not plain["vision_cache"] and not plain["cuda_graphs_on"]
    plain_losses, plain_norms = logged_losses(tmp_path / "plain" / "checkpoint-4")
    fast_losses, fast_norms = logged_losses(tmp_path / "fast" / "checkpoint-4")
    assert fast_losses == pytest.approx(plain_losses, rel=1e-5) and fast_norms == pytest.approx(plain_norms, rel=1e-5)
    assert plain_losses[0] != plain_losses[-1]
    assert_same_adapter(tmp_path / "fast", tmp_path / "plain")
