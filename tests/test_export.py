"""export.py: the merged model, loaded with plain transformers, predicts what base model + adapter predict."""

import json

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import run_script
from latexocr import chat, modeling
from latexocr.data import read_conversations

pytestmark = pytest.mark.slow  # runs the scripts as a user does

ADAPTER_DIR = "output/Qwen2-VL-2B-LatexOCR"
MERGED_DIR = "output/Qwen2-VL-2B-LatexOCR-merged"
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A briefly trained adapter, exported twice: the second export (float32) must replace the first (bfloat16)."""
    folder = tmp_path_factory.mktemp("export")
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=40", cwd=folder)
    run_script("csv2json.py", cwd=folder)
    run_script("train.py", "--model_id=tiny-random", "--batch_size=4", "--max_steps=8", "--learning_rate=3e-3",
               "--lr_scheduler_type=constant", "--val_json_path=", "--swanlab_mode=disabled", "--num_workers=0",
               "--save_steps=1000", cwd=folder)
    run_script("export.py", "--dtype=bfloat16", cwd=folder)
    result = run_script("export.py", "--dtype=float32", "--device=cpu", cwd=folder)
    return folder, result


def test_export_writes_a_standalone_safetensors_folder(exported):
    folder, result = exported
    merged = folder / MERGED_DIR
    assert f"done: {MERGED_DIR}" in result.stdout
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "train_config.json", "processor_config.json",
            "tokenizer.json", "chat_template.jinja"} <= names
    weights = [name for name in names if name.endswith(".safetensors")]
    assert weights and not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert not [name for name in names if name.startswith("adapter_")]  # merged in, nothing left for peft
    assert json.loads((merged / "train_config.json").read_text()) == \
        json.loads((folder / ADAPTER_DIR / "train_config.json").read_text())
    assert all(t.dtype == torch.float32 for t in load_file(merged / weights[0]).values())  # the second export
    # The saved processor sizes raw images as training did, for servers that get images unsized.
    train_config = json.loads((merged / "train_config.json").read_text())
    sizing = chat.sizing(train_config["min_pixels"], train_config["max_pixels"], train_config["image_size"])
    image_processor = AutoProcessor.from_pretrained(merged).image_processor
    for size in [(2000, 300), (50, 20), (500, 100)]:
        grid = image_processor(images=[Image.new("RGB", size, "white")], return_tensors="pt")["image_grid_thw"][0]
        assert int(grid.prod()) // image_processor.merge_size**2 == chat.image_tokens(*size, sizing), size
    # Replaced whole: no staging folder or earlier export left beside it.
    assert sorted(p.name for p in (folder / "output").iterdir()) == ["Qwen2-VL-2B-LatexOCR",
                                                                      "Qwen2-VL-2B-LatexOCR-merged"]


def test_merged_model_predicts_like_base_model_plus_adapter(exported, tiny_model_dir):
    folder, _ = exported
    adapter = load_file(folder / ADAPTER_DIR / "adapter_model.safetensors")
    assert any(adapter[name].abs().max() > 0 for name in adapter if "lora_B" in name)  # training moved the adapter

    # Plain transformers, as any other tool would load it: no peft, nothing of this project.
    merged = AutoModelForImageTextToText.from_pretrained(folder / MERGED_DIR).eval()
    merged_processor = AutoProcessor.from_pretrained(folder / MERGED_DIR)
    base, processor = modeling.load_base_model(tiny_model_dir, "cpu")
    with_adapter = PeftModel.from_pretrained(base, folder / ADAPTER_DIR).eval()

    train_config = json.loads((folder / MERGED_DIR / "train_config.json").read_text())
    prompt = train_config["prompt"]
    sizing = chat.sizing(train_config["min_pixels"], train_config["max_pixels"], train_config["image_size"])
    images = [s.image for s in read_conversations(folder / "latex_ocr_val.json")]
    inputs = chat.encode_prompts(merged_processor, [chat.load_image(image, sizing) for image in images], prompt)
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
        adapter_logits = with_adapter(**inputs).logits
        with with_adapter.disable_adapter():
            base_logits = with_adapter(**inputs).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4, rtol=0)
    assert (base_logits - adapter_logits).abs().max() > 1e-2  # so the match above is the adapter's, not the base's

    settings = dict(prompt=prompt, image_sizing=sizing, max_new_tokens=MAX_NEW_TOKENS, show_progress=False)
    expected = modeling.predict(with_adapter, processor, images, **settings)
    assert modeling.predict(merged, merged_processor, images, **settings) == expected
    with with_adapter.disable_adapter():
        assert modeling.predict(with_adapter, processor, images, **settings) != expected  # the adapter decides
    assert len(images) >= 4 and any(expected)

    result = run_script("infer.py", f"--output_dir={MERGED_DIR}", "--image=latex_ocr_val.json",
                        f"--max_new_tokens={MAX_NEW_TOKENS}", "--render_formulas=false", cwd=folder)
    assert "(whole model)" in result.stdout
    predictions = [json.loads(line) for line in (folder / MERGED_DIR / "infer" / "predictions.jsonl").open()]
    assert [p["prediction"] for p in predictions] == expected


def test_export_needs_a_trained_adapter(tmp_path):
    result = run_script("export.py", "--output_dir=nothing_here", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "not a folder written by train.py" in result.stderr


def test_a_full_fine_tune_exports_and_predicts_as_it_was_trained(tmp_path):
    """--tuner=full saves the whole model: export.py writes it as a standalone folder in the dtype asked for, and
    infer.py gives the same predictions from either folder, and as train.py's own evaluation."""
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=30", cwd=tmp_path)
    run_script("csv2json.py", cwd=tmp_path)
    run_script("train.py", "--model_id=tiny-random", "--tuner=full", "--train_vision=merger", "--batch_size=4",
               "--max_steps=6", "--learning_rate=3e-3", "--lr_scheduler_type=constant", "--swanlab_mode=disabled",
               f"--eval_max_new_tokens={MAX_NEW_TOKENS}", "--save_steps=1000", cwd=tmp_path)
    result = run_script("export.py", "--dtype=float32", cwd=tmp_path)
    assert "(trained whole)" in result.stdout
    merged = tmp_path / MERGED_DIR
    weights = load_file(next(merged.glob("*.safetensors")))
    trained = load_file(tmp_path / ADAPTER_DIR / "model.safetensors")
    assert weights.keys() == trained.keys() and all(torch.equal(weights[k], trained[k]) for k in trained)
    assert json.loads((merged / "train_config.json").read_text())["tuner"] == "full"
    settings = (f"--max_new_tokens={MAX_NEW_TOKENS}", "--render_formulas=false", "--image=latex_ocr_val.json")
    for folder in (ADAPTER_DIR, MERGED_DIR):
        run_script("infer.py", f"--output_dir={folder}", *settings, cwd=tmp_path)
    predicted = [[json.loads(line)["prediction"] for line in (tmp_path / folder / sub / "predictions.jsonl").open()]
                 for folder, sub in ((ADAPTER_DIR, "infer"), (MERGED_DIR, "infer"), (ADAPTER_DIR, "eval"))]
    assert predicted[0] == predicted[1] == predicted[2] and len(predicted[0]) == 3


def test_a_whole_model_loads_in_the_dtype_it_was_saved_in(monkeypatch, tmp_path):
    """On a GPU a base model loads in bf16; a whole model (a full fine-tune's fp32 weights) must not be rounded so."""
    from latexocr import predictor
    asked = {}

    def load(model_dir, device, place=True, processor=None, dtype=None):
        asked["dtype"] = dtype
        raise SystemExit("stop here")
    monkeypatch.setattr(modeling, "load_base_model", load)
    monkeypatch.setattr(modeling, "check_device", lambda device: "cuda")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "train_config.json").write_text(json.dumps(dict(model_id="tiny-random", prompt="p", min_pixels=1,
                                                                max_pixels=2, image_size="", tuner="full")))
    with pytest.raises(SystemExit, match="stop here"):
        predictor.load(tmp_path)
    assert asked["dtype"] == "auto"
