"""Merge the LoRA adapter that train.py saved into its base model: one standalone model folder (a --tuner=full run's
model is written the same way, in the chosen dtype).

Reads:  output/Qwen2-VL-2B-LatexOCR/ (the adapter, the processor, train_config.json naming the base model)
Writes: output/Qwen2-VL-2B-LatexOCR-merged/ with model*.safetensors, config.json, generation_config.json, the
        processor, train_config.json (prompt, image sizing) and export.json (what export.py wrote there): loads with
        plain transformers, serves with vLLM, and `python infer.py --output_dir=output/Qwen2-VL-2B-LatexOCR-merged`
        predicts with it
Run:    python export.py
        python export.py --dtype=float32        (full precision weights, e.g. to compare with the adapter)
The folder appears whole or not at all (written beside it, then renamed). It replaces only an earlier export
(a folder holding export.py's export.json and nothing added since); any other folder or file there is refused.
"""

from pathlib import Path

from latexocr import settings
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
config = apply_overrides(globals(), rules=settings.EXPORT)

# --- setup -------------------------------------------------------------------
import shutil  # noqa: E402

import torch  # noqa: E402

from latexocr import chat, modeling, predictor  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
train_config = predictor.read_train_config(OUTPUT_DIR)
adapter_dir = Path(ADAPTER or OUTPUT_DIR)
export_dir = Path(EXPORT_DIR or f"{Path(OUTPUT_DIR)}-merged")
# A --tuner=full run holds the whole model: nothing to merge, its weights are saved as a standalone folder alike.
whole = train_config.get("tuner") == "full" and predictor.holds_whole_model(OUTPUT_DIR) and not ADAPTER
if not whole and not (adapter_dir / "adapter_model.safetensors").is_file():
    raise SystemExit(f"{adapter_dir}: no adapter_model.safetensors to merge. " + (
        f"It holds a whole model already (an export): use it as it is, e.g. python infer.py "
        f"--output_dir={adapter_dir}." if predictor.holds_whole_model(adapter_dir) else
        "Train first, or pass --adapter=<folder>."))
image_sizing = chat.recorded_sizing(train_config)
device = modeling.check_device(DEVICE)
# bfloat16 is what Qwen2-VL is released in and what servers load; merging on a CPU keeps float32 unless asked.
dtype = DTYPES[DTYPE] if DTYPE != "auto" else torch.bfloat16 if device.startswith("cuda") else torch.float32
model_dir = Path(OUTPUT_DIR) if whole else predictor.base_model(MODEL_ID, train_config, OUTPUT_DIR)
protected = {"the training output folder": Path(OUTPUT_DIR), "the adapter folder": adapter_dir,
             "the base model folder": model_dir}
replacing = predictor.check_export_dir(export_dir, protected)  # before minutes of merging

# --- model -------------------------------------------------------------------
from transformers import AutoProcessor  # noqa: E402

model_id = OUTPUT_DIR if whole else MODEL_ID or train_config["model_id"]
# a full fine-tune's weights load as saved (fp32), not rounded to the bf16 a base model is released in
model, base_processor = modeling.load_base_model(model_dir, device, dtype=torch.float32 if whole else None)
if not whole:
    model = modeling.load_adapter(model, adapter_dir, model_id)
# W + (alpha / r) * B @ A in every adapted layer: the same function, with no adapter left to run.
merged = model.to(dtype) if whole else model.merge_and_unload().to(dtype)
# train.py saved the processor it trained with; a checkpoint folder holds none, its run's folder does.
processor_dir = next((d for d in (adapter_dir, Path(OUTPUT_DIR)) if (d / "processor_config.json").is_file()), None)
processor = AutoProcessor.from_pretrained(processor_dir) if processor_dir else base_processor
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
staging, leftovers = predictor.start_export(export_dir)
if leftovers:
    print(f"removed {leftovers} unfinished export folder(s) left beside {export_dir} by an interrupted run")
try:
    merged.save_pretrained(staging, max_shard_size=MAX_SHARD_SIZE)  # safetensors only, config and generation config
    processor.save_pretrained(staging)
    shutil.copyfile(Path(OUTPUT_DIR) / "train_config.json", staging / "train_config.json")  # prompt, image sizing
    predictor.check_export_dir(export_dir, protected)  # again: files may have been put there while merging
    predictor.finish_export(staging, export_dir, dict(output_dir=str(Path(OUTPUT_DIR).resolve()), model_id=model_id,
                                                      adapter=str(adapter_dir.resolve()), dtype=str(dtype)))
except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
if replacing:
    print(f"replaced the earlier export in {export_dir}")

# --- summary -----------------------------------------------------------------
weights = sorted(export_dir.glob("*.safetensors"))
size_gb = sum(p.stat().st_size for p in weights) / 1e9
print(f"done: {export_dir} ({len(weights)} safetensors file(s), {size_gb:.2f} GB); "
      f"next: python infer.py --output_dir={export_dir}")
