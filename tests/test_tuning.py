"""What trains under each TUNER and TRAIN_VISION setting, for every family: exactly the parts asked for."""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from conftest import LORA_TARGETS
from latexocr import chat, modeling
from latexocr.engine import tuning
from latexocr.synth import synthetic_samples

TARGETS = LORA_TARGETS


def trained_parts(model) -> set[str]:
    """Which parts hold trainable weights: language, merger, tower."""
    return {tuning.vision_part(name) or "language" for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_id", list(modeling.TINY_MODELS))
@pytest.mark.parametrize("train_vision, parts", [("none", {"language"}), ("merger", {"language", "merger"}),
                                                  ("all", {"language", "merger", "tower"})])
def test_lora_adapts_the_parts_asked_for(model_id, train_vision, parts):
    model, _ = modeling.load_base_model(modeling.resolve_model(model_id), "cpu")
    model = tuning.prepare(model, "lora", train_vision, 8, 16, 0.0, TARGETS)
    assert trained_parts(model) == parts
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    in_language_model = [name for name in adapted if ".language_model." in name]
    assert len(in_language_model) == len(TARGETS) * model.config.text_config.num_hidden_layers
    if train_vision != "all":  # Qwen2.5-VL's vision blocks have gate/up/down_proj: kept out unless asked for
        assert not any(tuning.vision_part(name) == "tower" for name in adapted)
    assert tuning.outside_language_model("lora", train_vision) == ("" if train_vision == "none" else
                                                                    {"merger": "the merger",
                                                                     "all": "the vision tower"}[train_vision])


@pytest.mark.parametrize("model_id", list(modeling.TINY_MODELS))
@pytest.mark.parametrize("train_vision", ["none", "merger", "all"])
def test_full_fine_tuning_trains_every_weight_of_the_parts_asked_for(model_id, train_vision):
    model, _ = modeling.load_base_model(modeling.resolve_model(model_id), "cpu")
    model = tuning.prepare(model, "full", train_vision, 8, 16, 0.0, TARGETS)
    for name, parameter in model.named_parameters():
        part = tuning.vision_part(name)
        expected = part is None or train_vision == "all" or (train_vision == "merger" and part == "merger")
        assert parameter.requires_grad == expected, name
    assert model.get_input_embeddings().weight.requires_grad  # the head and the embeddings train with the rest
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert (frozen == 0) == (train_vision == "all")
    assert tuning.weights_file("full") == "model.safetensors" != tuning.weights_file("lora")


def test_an_image_in_the_vision_side_moves_the_weights_that_train():
    """With the merger training, a step's gradient reaches it; the tower stays as it was."""
    model, processor = modeling.load_base_model(modeling.resolve_model("tiny-random"), "cpu")
    model = tuning.prepare(model, "full", "merger", 8, 16, 0.0, TARGETS)
    image, text = next(synthetic_samples(1, seed=3))
    batch = chat.TrainCollator(processor, chat.PROMPT, chat.sizing()).pad(
        [chat.encode_example(processor, chat.load_image(image, chat.sizing()), text, chat.PROMPT)])
    model(**batch).loss.backward()
    grads = {tuning.vision_part(n) or "language": p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {"language", "merger"} and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.slow
def test_a_full_fine_tune_of_the_language_model_keeps_the_vision_cache_and_its_losses(tmp_path):
    """--tuner=full --train_vision=none trains the token embeddings but not the vision side: the vision tower's
    outputs, computed once, are those every step would compute, so the losses are the run's without the cache."""
    import json
    from conftest import logged_losses, run_script
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=24", cwd=tmp_path)
    run_script("csv2json.py", cwd=tmp_path)
    common = ["--model_id=tiny-random", "--tuner=full", "--batch_size=4", "--max_steps=4", "--logging_steps=1",
              "--save_steps=4", "--val_json_path=", "--swanlab_mode=disabled", "--num_workers=0"]
    cached = run_script("train.py", *common, "--output_dir=cached", cwd=tmp_path)
    run_script("train.py", *common, "--output_dir=uncached", "--vision_cache_gib=0", cwd=tmp_path)
    assert "vision cache: the vision tower's output for" in cached.stdout
    assert json.loads((tmp_path / "cached" / "train_results.json").read_text())["vision_cache"]
    losses, _ = logged_losses(tmp_path / "cached" / "checkpoint-4")
    expected, _ = logged_losses(tmp_path / "uncached" / "checkpoint-4")
    assert len(losses) == 4 and losses == pytest.approx(expected, rel=1e-4)
