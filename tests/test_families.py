"""Qwen2.5-VL and Qwen3-VL through the same recipe, on a tiny random model of each family.

Per family: image tokens counted up front match the processor's, labels cover the answer and its end token
only, LoRA stays out of the vision tower; the four scripts run end to end. The learning test runs on every
family in tests/test_pipeline.py.
"""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import LORA_TARGETS, assert_same_adapter, run_script
from latexocr import chat, families, modeling
from latexocr.data import read_conversations

ADAPTER_DIR = "output/Qwen2-VL-2B-LatexOCR"
FAMILY_MODELS = {"tiny-random-qwen2.5-vl": "qwen2_5_vl", "tiny-random-qwen3-vl": "qwen3_vl"}
# What each family's Instruct chat template puts before the image: Qwen3-VL has no default system turn.
PROMPT_START = {
    "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>",
    "qwen3_vl": "<|im_start|>user\n<|vision_start|>",
}


def formula_image(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    for x in range(width // 10, width - width // 10):
        image.putpixel((x, height // 2), (0, 0, 0))
    return image


def default_sizing(family: families.Family) -> dict:
    """train.py's default sizing for this family: 32 to 512 image tokens."""
    return chat.sizing(chat.MIN_IMAGE_TOKENS * family.token_px ** 2, chat.MAX_IMAGE_TOKENS * family.token_px ** 2,
                       token_px=family.token_px)


@pytest.fixture(scope="module", params=list(FAMILY_MODELS))
def tiny_family(request, offline_cache):
    """(model id, model folder, family, processor) of one tiny family model, built once per test session."""
    model_dir = modeling.resolve_model(request.param)
    return request.param, model_dir, families.detect(model_dir), AutoProcessor.from_pretrained(model_dir)


def test_the_family_comes_from_config_json_and_matches_the_processor(tiny_family):
    model_id, _, family, processor = tiny_family
    assert family.model_type == FAMILY_MODELS[model_id]
    image_processor = processor.image_processor
    assert family.token_px == image_processor.patch_size * image_processor.merge_size
    assert family.token_px == {"qwen2_5_vl": 28, "qwen3_vl": 32}[family.model_type]


def test_an_unsupported_model_type_is_refused_with_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(SystemExit, match="'llava'.*qwen2_vl.*qwen2_5_vl.*qwen3_vl"):
        families.detect(tmp_path)


def test_image_tokens_counted_from_the_size_match_the_processor(tiny_family):
    _, _, family, processor = tiny_family
    fixed = chat.sizing(image_size="500x100", token_px=family.token_px)
    for size, image_sizing in [((300, 60), default_sizing(family)), ((1500, 90), default_sizing(family)),
                               ((40, 20), default_sizing(family)), ((3000, 600), default_sizing(family)),
                               ((300, 60), fixed)]:
        image = chat.load_image(formula_image(*size), image_sizing)
        assert image.size[0] % family.token_px == 0 and image.size[1] % family.token_px == 0, size
        example = chat.encode_example(processor, image, "x", chat.PROMPT)
        counted = (example["input_ids"] == processor.image_token_id).sum().item()
        assert chat.image_tokens(*size, image_sizing) == counted, size
        if image_sizing is not fixed:  # the bounds mean the same number of tokens in every family
            assert chat.MIN_IMAGE_TOKENS <= counted <= chat.MAX_IMAGE_TOKENS, size


def test_labels_cover_the_answer_and_the_end_token_only(tiny_family):
    _, _, family, processor = tiny_family
    answer = r"\frac { a } { b } + x ^ { 2 }"
    example = chat.encode_example(processor, chat.load_image(formula_image(300, 60), default_sizing(family)),
                                  answer, chat.PROMPT)
    labels, input_ids, tokenizer = example["labels"], example["input_ids"], processor.tokenizer
    assert tokenizer.decode(labels[labels != chat.IGNORE_INDEX]) == answer + "<|im_end|>"
    first = (labels != chat.IGNORE_INDEX).nonzero()[0].item()
    assert (labels[first:] == input_ids[first:]).all()
    prompt = tokenizer.decode(input_ids[:first])
    assert prompt.startswith(PROMPT_START[family.model_type])
    assert prompt.endswith("<|vision_end|>" + chat.PROMPT + "<|im_end|>\n<|im_start|>assistant\n")
    assert (example["mm_token_type_ids"] == (input_ids == processor.image_token_id).long()).all()


@pytest.mark.parametrize("model_id", list(modeling.TINY_MODELS))
def test_rotary_positions_computed_on_the_cpu_equal_the_models_own(model_id):
    # train.py hands the model these positions so that the GPU never stops to compute them.
    model_dir = modeling.resolve_model(model_id)
    family, processor = families.detect(model_dir), AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    images = [formula_image(*size) for size in [(500, 100), (60, 20), (100, 300), (900, 300), (120, 120)]]
    examples = [chat.encode_example(processor, chat.load_image(image, default_sizing(family)), "x ^ { 2 }" * (i + 1),
                                    chat.PROMPT) for i, image in enumerate(images)]  # unequal lengths: padding
    batch = chat.pad_examples(examples, processor.tokenizer.pad_token_id)
    expected, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                             attention_mask=batch["attention_mask"])
    grids = batch["image_grid_thw"][:, 1:]
    assert (grids[:, 0] > grids[:, 1]).any() and (grids[:, 0] < grids[:, 1]).any()  # tall and wide images
    assert torch.equal(chat.rope_positions(batch, family.merge_size), expected)


def test_lora_adapts_the_language_model_only(tiny_family):
    _, model_dir, family, processor = tiny_family
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    vision_layers = {name.split(".")[-1] for name, _ in model.model.visual.named_modules()}
    # Qwen2.5-VL's vision blocks have gate/up/down_proj too: the target names alone would adapt them.
    assert bool(vision_layers & set(LORA_TARGETS)) == (family.model_type == "qwen2_5_vl")
    lora = LoraConfig(r=8, target_modules=LORA_TARGETS, exclude_modules=families.LORA_EXCLUDE_MODULES)
    model = get_peft_model(model, lora)
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    assert all(".model.language_model.layers." in name for name in adapted)
    assert len(adapted) == len(LORA_TARGETS) * model.config.text_config.num_hidden_layers
    image = chat.load_image(formula_image(300, 60), default_sizing(family))
    batch = chat.pad_examples([chat.encode_example(processor, image, "x ^ { 2 }", chat.PROMPT)],
                              processor.tokenizer.pad_token_id)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in name for name in trained)


@pytest.fixture(scope="module", params=list(FAMILY_MODELS))
def family_run(request, tmp_path_factory):
    """The offline pipeline with only --model_id changed (and few steps and tokens), in an empty folder."""
    folder = tmp_path_factory.mktemp("family_run")
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=24", cwd=folder)
    run_script("csv2json.py", cwd=folder)
    outputs = {
        "train": run_script("train.py", f"--model_id={request.param}", "--max_steps=2", "--batch_size=4",
                            "--eval_max_new_tokens=8", "--swanlab_mode=disabled", cwd=folder),
        "infer": run_script("infer.py", "--max_new_tokens=8", "--render_formulas=false", cwd=folder),
        "uncached": run_script("train.py", f"--model_id={request.param}", "--max_steps=2", "--batch_size=4",
                               "--vision_cache_gib=0", "--val_json_path=", "--output_dir=uncached",
                               "--swanlab_mode=disabled", cwd=folder),
    }
    return request.param, folder, outputs


@pytest.mark.slow
def test_the_vision_cache_trains_the_same_adapter_as_the_vision_tower_in_every_step(family_run):
    # Qwen3-VL's vision tower also feeds early language-model layers (deepstack); the cache must carry those too.
    _, folder, outputs = family_run
    assert json.loads((folder / ADAPTER_DIR / "train_results.json").read_text())["vision_cache"]
    assert not json.loads((folder / "uncached" / "train_results.json").read_text())["vision_cache"]
    cached = assert_same_adapter(folder / ADAPTER_DIR, folder / "uncached")
    trained = [name for name in cached if "lora_B" in name]
    assert all(cached[name].abs().max() > 1e-4 for name in trained)  # B starts at zero: both runs moved it


@pytest.mark.slow
def test_train_saves_a_language_model_adapter_and_records_the_family(family_run):
    model_id, folder, outputs = family_run
    adapter = folder / ADAPTER_DIR
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in name and ".language_model.layers." in name for name in weights)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == set(LORA_TARGETS)
    assert adapter_config["exclude_modules"] == families.LORA_EXCLUDE_MODULES
    config = json.loads((adapter / "train_config.json").read_text())
    family = families.FAMILIES[FAMILY_MODELS[model_id]]
    assert config["model_id"] == model_id and config["family"] == family.record()
    assert config["min_pixels"] == chat.MIN_IMAGE_TOKENS * family.token_px ** 2
    assert config["image_sizing"] == default_sizing(family)
    assert f"({family.name})" in outputs["train"].stdout and "step 1/2 | loss" in outputs["train"].stdout


@pytest.mark.slow
def test_infer_predicts_the_val_set_of_each_family(family_run):
    _, folder, outputs = family_run
    predictions = [json.loads(line) for line in (folder / ADAPTER_DIR / "infer" / "predictions.jsonl").open()]
    val = read_conversations(folder / "latex_ocr_val.json")
    assert val and [p["reference"] for p in predictions] == [s.text for s in val]
    assert all(isinstance(p["prediction"], str) for p in predictions)
    assert 0 < outputs["infer"].stdout.count("predicted:") <= 5  # the worst and the best; the report has them all
