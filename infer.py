"""Predict LaTeX for formula images with what train.py saved: the base model plus its LoRA adapter, or a full fine-tune.

Reads:  output/Qwen2-VL-2B-LatexOCR/ (adapter or whole model + train_config.json: base model and its family,
        prompt, image sizing), or the merged model folder export.py wrote (weights + train_config.json),
        and IMAGE: an image file, a folder of images, or a conversation JSON (default: the val JSON
        training used, so ground truth is there and the predictions are scored)
Writes: output/Qwen2-VL-2B-LatexOCR/infer/predictions.jsonl; with ground truth also metrics.json and
        report.html (each image beside its prediction and reference, rendered, worst first); rejects.csv naming
        each input that is not a readable image (those are skipped, the others predicted)
Run:    python infer.py
        python infer.py --image=formula.png
        python infer.py --adapter=none          (the base model alone, to see what fine-tuning bought)
        python infer.py --precision=float32     (the default on a CPU; on a GPU the default is bfloat16, 30.7
                                                images/s on an H200, 89.5 on a static KV cache with CUDA graphs
                                                from 2,000 images on, against fp32's 19.6; fp32 gives an image the
                                                same prediction at any batch size)
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
PRECISION = "auto"  # auto (bfloat16 on a CUDA GPU, else float32) | float32 (the same at any batch size) | bfloat16
RENDER_FORMULAS = True  # render predictions and references: render_match and pictures in report.html
DEVICE = "auto"  # auto (CUDA if present) | cuda | cpu
COMPILE_GENERATION = "auto"  # auto (CUDA, bfloat16, 2,000 images or more) | true | false: decode steps as CUDA graphs
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), rules=settings.INFER)

# --- setup -------------------------------------------------------------------
from latexocr import evaluate, predictor  # noqa: E402
from latexocr.data import atomic_write_text, write_csv  # noqa: E402

train_config = predictor.read_train_config(OUTPUT_DIR)
base_only = ADAPTER.lower() == "none" and not predictor.holds_whole_model(OUTPUT_DIR)
results_dir = Path(RESULTS_DIR or Path(OUTPUT_DIR) / ("infer-base" if base_only else "infer"))
settings.output_folder("results_dir", str(results_dir))  # now, not after the predictions are made

# --- data --------------------------------------------------------------------
source = Path(IMAGE) if IMAGE else predictor.val_json(train_config, OUTPUT_DIR)
samples, rejects = predictor.inputs(source)
rejects_path = results_dir / "rejects.csv"
if rejects:
    write_csv(rejects_path, rejects, header=("image_path", "reason"))
    for _, reason in rejects[:5]:
        print(f"skipped {reason}")
    print(f"skipped {len(rejects)} file(s) that cannot be read as images -> {rejects_path}")
else:  # an earlier run's list would name files that are not skipped now
    rejects_path.unlink(missing_ok=True)
if not samples:
    raise SystemExit(f"{source}: nothing to predict, none of its {len(rejects)} file(s) is a readable image (reasons "
                     f"in {rejects_path}).")
unlabelled = [s for s in samples if not s.text.strip()]
has_references = not unlabelled
if unlabelled and source.suffix.lower() == ".json":
    print(f"{len(unlabelled)} of {len(samples)} records in {source} have an empty reference (first: "
          f"{unlabelled[0].id}): predicting without scores. Fill them in to score.")
print(f"data: {len(samples)} image(s) from {source}" + (" with ground truth" if has_references else ""))

# --- model -------------------------------------------------------------------
run = predictor.load(OUTPUT_DIR, ADAPTER, MODEL_ID, PRECISION, DEVICE, COMPILE_GENERATION)
print(f"model: {run.description}")

# --- predict -----------------------------------------------------------------
if has_references:
    evaluate.evaluate(run.model, run.processor, samples, run.prompt, run.image_sizing, results_dir, BATCH_SIZE,
                      MAX_NEW_TOKENS, render_formulas=RENDER_FORMULAS, compile_generation=run.compiles(len(samples)))
else:
    predictions = run.predict([s.image for s in samples], BATCH_SIZE, MAX_NEW_TOKENS)
    for sample, prediction in zip(samples, predictions):
        print(f"{sample.image}: {prediction}")
    for stale in evaluate.clear_scores(results_dir):  # it scored other predictions
        print(f"removed {stale}: it scored an earlier run's predictions, and these have no references")
    atomic_write_text(results_dir / "predictions.jsonl",
                      "".join(json.dumps(dict(id=s.id, image=str(s.image), prediction=p), ensure_ascii=False) + "\n"
                              for s, p in zip(samples, predictions)))

# --- summary -----------------------------------------------------------------
print(f"done: {len(samples)} prediction(s) in {results_dir / 'predictions.jsonl'}"
      + (f", {len(rejects)} file(s) skipped -> {rejects_path}" if rejects else ""))
