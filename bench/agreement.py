"""How often the way a prediction is made changes it, on a model that reads (the one bench/from_scratch.py trains).

Random weights cannot tell: their logits are nearly flat and any rounding flips a greedy choice. A trained model
can. Against fp32 eager generate one image at a time (the reference), this counts the held-out images whose
prediction differs in each of MODES (bench/workload.py: fp32, TF32 and bf16, each eager and on the static KV cache
with CUDA graphs, infer.py's --compile_generation), one image at a time and in batches of BATCH_SIZE, with the
seconds each took (a compiled one's compiling included); and whether train.py's own evaluation, infer.py and the
model export.py writes predict the same. Predictions are made by the package's predictor, as infer.py makes them.

Reads:  RUN_DIR (train.py's output of bench/from_scratch.py, with eval/ when it had a val set) and TEST_JSON
Writes: RUN_DIR/agreement.json; prints the table
Run:    python bench/agreement.py                  (after bench/from_scratch.py, on the GPU it ran on)
        python bench/agreement.py --run_dir=... --test_json=... --images=8 --device=cpu
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from latexocr.config import apply_overrides  # noqa: E402

# -----------------------------------------------------------------------------
RUN_DIR = "bench_results/from_scratch/run"
TEST_JSON = "bench_results/from_scratch/test.json"
IMAGES = 64  # held-out images compared (each is also generated alone: the slow part)
BATCH_SIZE = 64
MAX_NEW_TOKENS = 200
DEVICE = "auto"
MODES = "float32,float32_compiled,tfloat32,tfloat32_compiled,bfloat16,bfloat16_compiled"  # float32 is the reference
# -----------------------------------------------------------------------------
config = apply_overrides(globals())

import torch  # noqa: E402

from bench import workload  # noqa: E402
from latexocr import modeling, predictor  # noqa: E402
from latexocr.data import read_conversations  # noqa: E402

modes = workload.generation_modes(MODES)
if "float32" not in modes:
    raise SystemExit(f"--modes={MODES}: float32 (eager, the reference the others are compared with) must be one.")
run_dir, images = Path(RUN_DIR).resolve(), [s.image for s in read_conversations(TEST_JSON)[:IMAGES]]
results, predictions, loaded = dict(images=len(images), batch_size=BATCH_SIZE), {}, ""
for mode in modes:
    precision, tf32, compiled = workload.GENERATION_MODES[mode]
    if precision != loaded:  # the fp32 modes come first: each precision loads once
        run, loaded = predictor.load(run_dir, precision=precision, device=DEVICE), precision
    for batch in (1, BATCH_SIZE):
        torch.compiler.reset()  # each compiles its own graphs: its rows, precision and TF32 setting
        start = time.perf_counter()
        predictions[(mode, batch)] = modeling.predict(run.model, run.processor, images, run.prompt, run.image_sizing,
                                                      batch, MAX_NEW_TOKENS, show_progress=False,
                                                      compile_generation=compiled, tf32=tf32)
        results[f"{mode}_batch_{batch}_s"] = time.perf_counter() - start
reference = predictions[("float32", 1)]
for (mode, batch), predicted in predictions.items():
    results[f"{mode}_batch_{batch}_differ"] = sum(a != b for a, b in zip(predicted, reference))

evaluated = run_dir / "eval" / "predictions.jsonl"
if evaluated.is_file():  # train.py's evaluation against the reference, for the images both predicted
    by_image = {str(Path(r["image"]).resolve()): r["prediction"] for r in map(json.loads, evaluated.open())}
    shared = [(by_image[str(Path(i).resolve())], p) for i, p in zip(images, reference) if str(Path(i).resolve())
              in by_image]
    results.update(train_eval_compared=len(shared), train_eval_differ=sum(a != b for a, b in shared))
export_dir = run_dir.parent / f"{run_dir.name}-merged"
for script, args in (("export.py", [f"--output_dir={run_dir}", f"--export_dir={export_dir}", "--dtype=float32"]),
                     ("infer.py", [f"--output_dir={export_dir}", f"--image={Path(TEST_JSON).resolve()}",
                                   f"--max_new_tokens={MAX_NEW_TOKENS}", f"--batch_size={BATCH_SIZE}",
                                   "--render_formulas=false", f"--device={DEVICE}", "--precision=float32"])):
    subprocess.run([sys.executable, str(ROOT / script), *args], check=True)
exported = [json.loads(line)["prediction"] for line in (export_dir / "infer" / "predictions.jsonl").open()][:IMAGES]
results["exported_differ"] = sum(a != b for a, b in zip(exported, reference))

(run_dir / "agreement.json").write_text(json.dumps(results, indent=1) + "\n")
print(f"| against fp32 eager, one image at a time ({len(images)} held-out images) | predictions that differ | s |")
print("|---|---|---|")
for (mode, batch) in predictions:
    print(f"| {mode}, batches of {batch} | {results[f'{mode}_batch_{batch}_differ']} | "
          f"{results[f'{mode}_batch_{batch}_s']:.1f} |")
if "train_eval_compared" in results:
    print(f"| train.py's evaluation ({results['train_eval_compared']} images) | {results['train_eval_differ']} | |")
print(f"| infer.py on export.py's model, fp32, batches of {BATCH_SIZE}, its default --compile_generation | "
      f"{results['exported_differ']} | |")
