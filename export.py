"""Merge the LoRA adapter that train.py saved into its base model: one standalone model folder.

Reads:  output/Qwen2-VL-2B-LatexOCR/ (the adapter, the processor, train_config.json naming the base model)
Writes: output/Qwen2-VL-2B-LatexOCR-merged/ with model*.safetensors, config.json, generation_config.json, the
        processor and train_config.json (prompt, image sizing): loads with plain transformers, serves with vLLM,
        and `python infer.py --output_dir=output/Qwen2-VL-2B-LatexOCR-merged` predicts with it
Run:    python export.py
        python export.py --dtype=float32        (full precision weights, e.g. to compare with the adapter)
The folder appears whole or not at all (written beside it, then renamed).
"""

import json
from pathlib import Path

from latexocr.config import apply_overrides

# -----------------------------------------------------------------------------
OUTPUT_DIR = "output/Qwen2-VL-2B-LatexOCR"  # train.py's output folder
ADAPTER = ""  # adapter folder; "" = OUTPUT_DIR
MODEL_ID = ""  # base model; "" = the one recorded in OUTPUT_DIR/train_config.json
EXPORT_DIR = ""  # the merged model folder; "" = OUTPUT_DIR + "-merged"
DTYPE = "auto"  # weights as saved: auto (bfloat16 on a GPU, float32 on a CPU) | bfloat16 | float16 | float32
DEVICE = "auto"  # where to merge: auto (CUDA if present) | cuda | cpu
MAX_SHARD_SIZE = "5GB"  # largest safetensors file; bigger models are split into several, with an index
# -----------------------------------------------------------------------------
config = apply_overrides(globals())

# --- setup -------------------------------------------------------------------
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from latexocr import chat, modeling  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
config_path = Path(OUTPUT_DIR) / "train_config.json"
adapter_dir = Path(ADAPTER or OUTPUT_DIR)
export_dir = Path(EXPORT_DIR or f"{Path(OUTPUT_DIR)}-merged")
if not config_path.is_file():
    raise SystemExit(f"{config_path} not found: {OUTPUT_DIR} is not a folder written by train.py. "
                     "Train first, or pass --output_dir=<train.py's output_dir>.")
whole = (Path(OUTPUT_DIR) / "config.json").is_file() and not ADAPTER  # a --tuner=full run: nothing to merge
if not whole and not (adapter_dir / "adapter_model.safetensors").is_file():
    raise SystemExit(f"{adapter_dir}: no adapter_model.safetensors to merge. Train first, or pass --adapter=<folder>.")
if DTYPE != "auto" and DTYPE not in DTYPES:
    raise SystemExit(f"--dtype={DTYPE}: expected auto, {', '.join(DTYPES)}.")
train_config = json.loads(config_path.read_text())
image_sizing = chat.recorded_sizing(train_config)
device = modeling.default_device() if DEVICE == "auto" else DEVICE
# bfloat16 is what Qwen2-VL is released in and what servers load; merging on a CPU keeps float32 unless asked.
dtype = DTYPES[DTYPE] if DTYPE != "auto" else torch.bfloat16 if device.startswith("cuda") else torch.float32

# --- model -------------------------------------------------------------------
from transformers import AutoProcessor  # noqa: E402

model_id = OUTPUT_DIR if whole else MODEL_ID or train_config["model_id"]
model, _ = modeling.load_base_model(modeling.resolve_model(model_id), device, dtype=torch.float32 if whole else None)
if not whole:
    model = modeling.load_adapter(model, adapter_dir, model_id)
# W + (alpha / r) * B @ A in every adapted layer: the same function, with no adapter left to run.
merged = model.to(dtype) if whole else model.merge_and_unload().to(dtype)
processor = AutoProcessor.from_pretrained(adapter_dir)  # train.py saved the processor it trained with
if "min_pixels" in image_sizing:
    # The processor then sizes raw images as training did, for any program that uses it (transformers, vLLM).
    processor.image_processor.size = {"shortest_edge": image_sizing["min_pixels"],
                                      "longest_edge": image_sizing["max_pixels"]}
else:
    print(f"note: training resized every image to exactly {train_config['image_size']} px (HxW); "
          "clients of the merged model must resize images so too")
print(f"model: {model_id}" + (" (trained whole)" if whole else f" + adapter {adapter_dir}, merged") +
      f" on {device}, saving as {str(dtype).split('.')[-1]}")

# --- save --------------------------------------------------------------------
export_dir.parent.mkdir(parents=True, exist_ok=True)
staging = Path(tempfile.mkdtemp(dir=export_dir.parent, prefix=f".{export_dir.name}."))
staging.chmod(0o755)  # readable like any model folder (mkdtemp makes it private), e.g. by a server's user
try:
    merged.save_pretrained(staging, max_shard_size=MAX_SHARD_SIZE)  # safetensors only, config and generation config
    processor.save_pretrained(staging)
    shutil.copyfile(config_path, staging / "train_config.json")  # the prompt and image sizing predictions need
    previous = export_dir.with_name(staging.name + ".old")
    if export_dir.exists():
        os.replace(export_dir, previous)
    os.replace(staging, export_dir)
    shutil.rmtree(previous, ignore_errors=True)
except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise

# --- summary -----------------------------------------------------------------
weights = sorted(export_dir.glob("*.safetensors"))
size_gb = sum(p.stat().st_size for p in weights) / 1e9
print(f"done: {export_dir} ({len(weights)} safetensors file(s), {size_gb:.2f} GB); "
      f"next: python infer.py --output_dir={export_dir}")
