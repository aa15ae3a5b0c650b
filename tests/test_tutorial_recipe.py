"""The tutorial recipe the benchmark compares against: it trains, labels as the tutorial did, and predicts."""

import json
import math

import pytest
import torch

from conftest import logged_losses, run_script, synthetic_train_json
from bench.tutorial_recipe import TUTORIAL_PROMPT, predict_tutorial, process_func, train_tutorial

N_SAMPLES = 48  # three optimizer steps of 4 x 4
PATCHES_PER_IMAGE = 36 * 8  # 500 x 100 px becomes 504 x 112 px: 36 x 8 patches of 14 px


@pytest.fixture(scope="module")
def train_json(tmp_path_factory):
    return synthetic_train_json(tmp_path_factory.mktemp("tutorial_data"), N_SAMPLES, seed=0)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, train_json, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("tutorial_output")
    return output_dir, train_tutorial(tiny_model_dir, train_json, output_dir, max_steps=3, device="cpu")


@pytest.mark.slow
def test_three_steps_of_sixteen_samples(trained):
    output_dir, result = trained
    assert result["steps"] == 3 and result["samples"] == 3 * 16
    assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])
    assert result["preprocess_s"] > 0 and result["train_s"] > 0 and result["samples_per_s"] > 0
    assert result["image_patches"] == 48 * PATCHES_PER_IMAGE
    assert 0 < result["tokens"] <= result["padded_tokens"]
    assert result["peak_allocated_gib"] == 0.0 and result["versions"]["transformers"]
    assert json.loads(json.dumps(result)) == result  # plain data, for writing out as is
    assert not list(output_dir.glob("datasets_cache_*")), "the .map cache must not outlive the run"


def example(train_json, index=0):
    return json.loads(train_json.read_text(encoding="utf-8"))[index]


def test_labels_end_with_the_pad_token_as_in_the_tutorial(processor, train_json):
    tokenizer = processor.tokenizer
    record = example(train_json)
    features = process_func(record, processor, train_json)
    answer_ids = tokenizer(record["conversations"][1]["value"], add_special_tokens=False)["input_ids"]
    labels, input_ids = features["labels"].tolist(), features["input_ids"].tolist()
    assert labels[-1] == input_ids[-1] == tokenizer.pad_token_id
    assert labels[-len(answer_ids) - 1:-1] == answer_ids
    assert set(labels[:-len(answer_ids) - 1]) == {-100}
    assert len(input_ids) == len(features["attention_mask"]) == len(features["mm_token_type_ids"]) == len(labels)
    assert features["mm_token_type_ids"].sum().item() == PATCHES_PER_IMAGE // 4  # 2 x 2 patches per image token
    assert features["image_grid_thw"].tolist() == [1, 36, 8]
    assert features["pixel_values"].shape == (PATCHES_PER_IMAGE, 3 * 2 * 14 * 14)


def test_labels_can_end_with_im_end_instead(processor, train_json):
    features = process_func(example(train_json), processor, train_json, end_token="im_end")
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != processor.tokenizer.pad_token_id
    assert features["labels"][-1].item() == features["input_ids"][-1].item() == im_end
    with pytest.raises(ValueError, match="end_token"):
        process_func(example(train_json), processor, train_json, end_token="eos")


def test_prompt_and_resize_are_parameters(processor, train_json):
    default = process_func(example(train_json), processor, train_json)
    other = process_func(example(train_json), processor, train_json, prompt="LaTeX:", resized_height=112,
                         resized_width=504)
    assert other["image_grid_thw"].tolist() == [1, 8, 36]
    assert len(other["input_ids"]) < len(default["input_ids"])  # the tutorial's prompt is longer
    assert TUTORIAL_PROMPT in processor.tokenizer.decode(default["input_ids"])


def test_predict_gives_one_string_per_image(tiny_model_dir, processor, train_json):
    from transformers import Qwen2VLForConditionalGeneration
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    images = sorted((train_json.parent / "images").glob("*.png"))[:2]
    predictions = predict_tutorial(model, processor, images, max_new_tokens=4)
    assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)


@pytest.mark.slow
def test_train_py_computes_the_tutorials_losses_at_its_inputs(tiny_model_dir, tmp_path):
    """train.py changes how the work is done, not the math: set to the tutorial's image size, prompt and
    16 samples per step (without dropout's random masks), its first 10 losses equal the recipe's on the
    same samples in the same order, though it runs them as one micro-batch of 16 instead of 4 x 4. So do
    the padded steps a GPU replays as CUDA graphs (run here without capturing)."""
    synthetic_train_json(tmp_path, 160, seed=1)
    tutorial = train_tutorial(tiny_model_dir, tmp_path / "train.json", tmp_path / "tutorial", max_steps=10,
                              end_token="im_end", lora_dropout=0.0, device="cpu")
    for graphs in ("false", "true"):
        run_script("train.py", "--model_id=tiny-random", "--train_json_path=train.json", "--val_json_path=",
                   "--image_size=500x100", f"--prompt={TUTORIAL_PROMPT}", "--lora_dropout=0.0",
                   "--max_steps=10", "--logging_steps=1", "--lr_scheduler_type=linear", "--num_workers=0",
                   "--swanlab_mode=disabled", f"--output_dir=ours_{graphs}", f"--cuda_graphs={graphs}",
                   cwd=tmp_path)
        plan = json.loads((tmp_path / f"ours_{graphs}" / "train_results.json").read_text())
        assert (plan["micro_batch_size"], plan["gradient_accumulation_steps"]) == (16, 1)
        assert plan["vision_cache"] and plan["fast"]  # not the model's own path
        assert plan["cuda_graphs_on"] == (graphs == "true")  # the padded steps the graphs would replay
        our_losses, our_grad_norms = logged_losses(tmp_path / f"ours_{graphs}" / "checkpoint-10")
        assert len(our_losses) == len(tutorial["losses"]) == 10
        # Seen: equal to 1e-7 (fp32 summation order). Losses move by ~2e-3 from step to step, and the gradient
        # norms by ~5%, so a shuffled order, a lost sample or a changed label would break these bounds.
        for step in range(10):
            assert our_losses[step] == pytest.approx(tutorial["losses"][step], rel=1e-4), f"loss at {step + 1}"
            assert our_grad_norms[step] == pytest.approx(tutorial["grad_norms"][step], rel=1e-4), f"grad at {step + 1}"
        assert our_losses[0] != our_losses[-1]  # the steps trained, so a later mismatch would show
