"""A trained run loaded for prediction, as infer.py, app.py and train.py's evaluation all predict.

Everything comes from what training wrote: the base model, the prompt and the image sizing from
OUTPUT_DIR/train_config.json; the weights from the adapter (LoRA), or from OUTPUT_DIR itself when it holds a whole
model (export.py's merged folder, or a --tuner=full run). Nothing is declared twice.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from latexocr import chat, modeling


def read_train_config(output_dir: str | Path) -> dict:
    """OUTPUT_DIR/train_config.json, with a message saying what to do when it is missing or unreadable."""
    path = Path(output_dir) / "train_config.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: {output_dir} is not a folder written by train.py or export.py. "
                         "Train first, or pass --output_dir=<train.py's output_dir>.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise SystemExit(f"{path}: not readable JSON ({error}); it was cut short or edited. Train again, or restore "
                         "it from a copy.") from None
    needed = ("model_id", "prompt", "min_pixels", "max_pixels", "image_size")
    lacking = [key for key in needed if key not in config] if isinstance(config, dict) else list(needed)
    if lacking:
        raise SystemExit(f"{path}: lacks {', '.join(lacking)}; it was not written by this version of train.py. "
                         "Train again.")
    return config


def holds_whole_model(output_dir: str | Path) -> bool:
    """A folder with the model's own weights and config (export.py's, or a full fine-tune's), not an adapter."""
    return (Path(output_dir) / "config.json").is_file()


@dataclass
class Predictor:
    model: object
    processor: object
    prompt: str
    image_sizing: dict
    description: str  # what was loaded, for the user: "tiny-random + adapter output/...", "... (whole model)"
    train_config: dict

    def predict(self, images: list, batch_size: int = 64, max_new_tokens: int = 256,
                show_progress: bool = True) -> list[str]:
        return modeling.predict(self.model, self.processor, images, self.prompt, self.image_sizing, batch_size,
                                max_new_tokens, show_progress)


def load(output_dir: str | Path, adapter: str = "", model_id: str = "", precision: str = "float32",
         device: str = "auto") -> Predictor:
    """The run in output_dir ready to predict. adapter: another adapter folder, or "none" for the base model alone;
    model_id: another base model than the one training recorded."""
    train_config = read_train_config(output_dir)
    whole = holds_whole_model(output_dir)
    use_adapter = adapter.lower() != "none" and not whole
    adapter_dir = Path(adapter or output_dir)
    model_id = model_id or (str(output_dir) if whole else train_config["model_id"])
    if use_adapter and not (adapter_dir / "adapter_model.safetensors").is_file():  # before minutes of loading
        raise SystemExit(f"{adapter_dir}: no adapter_model.safetensors. Train first, or pass --adapter=<folder> "
                         "(--adapter=none predicts with the base model alone).")
    device = modeling.default_device() if device == "auto" else device
    dtype = modeling.generation_dtype(precision)
    model, processor = modeling.load_base_model(modeling.resolve_model(model_id), device)
    if use_adapter:
        model = modeling.load_adapter(model, adapter_dir, model_id)
    model = modeling.generation_model(model, dtype)
    description = model_id + (f" + adapter {adapter_dir}" if use_adapter else " (whole model)" if whole
                              else " (no adapter)") + f" on {device}, in {precision}"
    return Predictor(model, processor, train_config["prompt"], chat.recorded_sizing(train_config), description,
                     train_config)
