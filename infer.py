"""Predict LaTeX for formula images with the base model plus the LoRA adapter that train.py saved.

Reads:  output/Qwen2-VL-2B-LatexOCR/ (adapter + train_config.json: base model and its family, prompt, image
        sizing), or the merged model folder export.py wrote (weights + train_config.json),
        and IMAGE: an image file, a folder of images, or a conversation JSON (default: the val JSON
        training used, so ground truth is there and the predictions are scored)
Writes: output/Qwen2-VL-2B-LatexOCR/infer/predictions.jsonl; with ground truth also metrics.json and
        report.html (each image beside its prediction and reference, rendered, worst first)
Run:    python infer.py
        python infer.py --image=formula.png
        python infer.py --adapter=none          (the base model alone, to see what fine-tuning bought)
        python infer.py --precision=bfloat16    (half the memory; then a prediction can depend on the batch size)
        python infer.py --output_dir=output/Qwen2-VL-2B-LatexOCR-merged   (the model export.py merged)
"""

import json
from pathlib import Path

from latexocr import settings
from latexocr.config import apply_overrides

# -----------------------------------------------------------------------------
OUTPUT_DIR = "output/Qwen2-VL-2B-LatexOCR"  # train.py's output folder, or export.py's merged model folder
ADAPTER = ""  # adapter folder; "" = OUTPUT_DIR; none = the base model alone
MODEL_ID = ""  # base model; "" = the one recorded in OUTPUT_DIR/train_config.json
IMAGE = ""  # image file, folder of images, or conversation JSON; "" = the val JSON used in training
RESULTS_DIR = ""  # where predictions go; "" = OUTPUT_DIR/infer (OUTPUT_DIR/infer-base with --adapter=none)
BATCH_SIZE = 64  # images per generation batch
MAX_NEW_TOKENS = 256  # generation cap per formula
PRECISION = "float32"  # float32 (an image's prediction is the same at any batch size) | bfloat16 (half the memory)
RENDER_FORMULAS = True  # render predictions and references: render_match and pictures in report.html
DEVICE = "auto"  # auto (CUDA if present) | cuda | cpu
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), rules=settings.INFER)

# --- setup -------------------------------------------------------------------
from latexocr import evaluate, predictor  # noqa: E402
from latexocr.data import Sample, atomic_write_text, read_conversations  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
train_config = predictor.read_train_config(OUTPUT_DIR)
base_only = ADAPTER.lower() == "none" and not predictor.holds_whole_model(OUTPUT_DIR)
results_dir = Path(RESULTS_DIR or Path(OUTPUT_DIR) / ("infer-base" if base_only else "infer"))

# --- data --------------------------------------------------------------------
if not (IMAGE or train_config["val_json_path"]):
    raise SystemExit("no --image given, and training had no val set to default to: pass --image=<file, folder or JSON>.")
source = Path(IMAGE or train_config["val_json_path"])
if source.suffix.lower() == ".json":
    samples = read_conversations(source)
elif source.is_dir():
    samples = [Sample(p.name, p.resolve(), "") for p in sorted(source.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise SystemExit(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder.")
elif source.is_file():
    samples = [Sample(source.name, source.resolve(), "")]
else:
    raise SystemExit(f"--image={source}: no such file or folder. Give an image, a folder of images or a JSON.")
missing = [s for s in samples if not s.image.is_file()]
if missing:
    raise SystemExit(f"{source}: image not found for {missing[0].id}: {missing[0].image} ({len(missing)} missing)")
has_references = all(s.text for s in samples)
print(f"data: {len(samples)} image(s) from {source}" + (" with ground truth" if has_references else ""))

# --- model -------------------------------------------------------------------
run = predictor.load(OUTPUT_DIR, ADAPTER, MODEL_ID, PRECISION, DEVICE)
print(f"model: {run.description}")

# --- predict -----------------------------------------------------------------
if has_references:
    evaluate.evaluate(run.model, run.processor, samples, run.prompt, run.image_sizing, results_dir, BATCH_SIZE,
                      MAX_NEW_TOKENS, render_formulas=RENDER_FORMULAS)
else:
    predictions = run.predict([s.image for s in samples], BATCH_SIZE, MAX_NEW_TOKENS)
    for sample, prediction in zip(samples, predictions):
        print(f"{sample.image}: {prediction}")
    atomic_write_text(results_dir / "predictions.jsonl",
                      "".join(json.dumps(dict(id=s.id, image=str(s.image), prediction=p), ensure_ascii=False) + "\n"
                              for s, p in zip(samples, predictions)))

# --- summary -----------------------------------------------------------------
print(f"done: {len(samples)} prediction(s) in {results_dir / 'predictions.jsonl'}")
