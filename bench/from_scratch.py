"""A speedrun: a small model of the Qwen2-VL architecture with random weights learns to read formulas in minutes.

Everything a user's run goes through, from nothing: formulas rendered here (the synthetic source and the first
TRAIN_REAL lines of the real LaTeX_OCR formulas), a model folder built like the tiny one at SPEEDRUN_DIMENSIONS,
`train.py --tuner=full --train_vision=all` on them (the same collator, labels, sizing and plan users get), then
`infer.py` on the last TEST_REAL real formulas rendered the same way, which nothing ever trains on (a training
formula equal to one of them is left out). Afterwards each checkpoint scores CURVE_IMAGES of those held-out images,
for the learning curve: train loss and held-out BLEU-4 / exact match against wall time (curve.png).

Reads:  ../shared/data/latex_ocr_val_formulas.txt (FORMULAS_PATH; without it, synthetic formulas stand in for both)
Writes: bench_results/from_scratch/ (RESULTS_DIR): images/, train.json, test.json, the model folder, run/ (train.py's
        output, with infer/ from infer.py), curve.png, from_scratch.json (every number), from_scratch.md (the table)
Run:    python bench/from_scratch.py                 (a CUDA GPU: rendering, training and scoring in ten minutes)
        python bench/from_scratch.py --tiny=true     (CPU, a few hundred formulas and steps: checks the script runs)
"""

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from latexocr.config import apply_overrides  # noqa: E402

# -----------------------------------------------------------------------------
TINY = False  # the CPU smoke run: few formulas, a tiny model, a few steps
FORMULAS_PATH = str(ROOT.parent / "shared" / "data" / "latex_ocr_val_formulas.txt")
TRAIN_REAL = 7475  # the file's first lines, trained on
TEST_REAL = 1000  # the file's last lines, scored by infer.py and never trained on
SYNTHETIC = 20000  # synthetic formulas trained on besides the real ones (rendering: about 500 a second on 16 cores)
TEXT_HIDDEN, TEXT_LAYERS, TEXT_HEADS = 512, 8, 8  # language model (head 64 wide)
VISION_WIDTH, VISION_DEPTH, VISION_HEADS = 384, 6, 6  # vision tower
BATCH_SIZE = 128  # samples per optimizer step
LEARNING_RATE = 8e-4
WARMUP_STEPS = 100
MAX_STEPS = 1600  # optimizer steps of the cosine schedule (at the first run's 457 samples/s, 7.5 minutes)
TRAIN_MINUTES = 5.5  # train.py's --max_minutes: training stops there, saved, so that the whole run fits 10 minutes
SAVE_STEPS = 320  # a checkpoint, and a point of the held-out curve, every so many steps
NUM_WORKERS = 12  # train.py's DataLoader processes
RENDER_PROCESSES = 0  # processes rendering formulas; 0 = one per CPU core
CURVE_IMAGES = 128  # held-out images each checkpoint scores for the curve
VAL_IMAGES = 64  # of the held-out ones, scored by train.py's own evaluation too (bench/agreement.py compares)
MAX_NEW_TOKENS = 200  # generation cap (the real formulas: at most 150 tokens of the small vocabulary)
RESULTS_DIR = "bench_results/from_scratch"
# -----------------------------------------------------------------------------
config = apply_overrides(globals())

import torch  # noqa: E402

from bench import workload  # noqa: E402
from latexocr import metrics, modeling, render, synth, tiny  # noqa: E402
from latexocr.data import read_conversations, write_conversations  # noqa: E402

if TINY:
    TRAIN_REAL, TEST_REAL, SYNTHETIC, BATCH_SIZE, MAX_STEPS, SAVE_STEPS, WARMUP_STEPS = 60, 24, 120, 8, 12, 6, 2
    TRAIN_MINUTES = 0.0
    TEXT_HIDDEN, TEXT_LAYERS, TEXT_HEADS, VISION_WIDTH, VISION_DEPTH, VISION_HEADS = 64, 2, 4, 64, 2, 4
    NUM_WORKERS, CURVE_IMAGES, MAX_NEW_TOKENS, VAL_IMAGES = 0, 8, 16, 4
SPEEDRUN_DIMENSIONS = dict(hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=TEXT_LAYERS,
                           num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_HEADS // 2,
                           mrope_section=[TEXT_HIDDEN // TEXT_HEADS // 8, *[3 * TEXT_HIDDEN // TEXT_HEADS // 16] * 2],
                           vision_depth=VISION_DEPTH, vision_embed_dim=VISION_WIDTH, vision_num_heads=VISION_HEADS,
                           vocab_size=tiny.TOKENIZER_VOCAB_SIZE)


def render_one(job: tuple[int, str, str]) -> tuple[int, bool]:
    """Render formula `text` to `path` as data2csv.py's synthetic source does; False when mathtext cannot."""
    index, text, path = job
    try:
        render.render_mathtext(text).save(path)
    except ValueError:
        return index, False
    return index, True


def rendered(formulas: list[str], folder: Path, prefix: str, processes: int) -> list[tuple[Path, str]]:
    """The formulas mathtext renders, as (image, text), in their order."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, text, str(folder / f"{prefix}{i}.png")) for i, text in enumerate(formulas)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        ok = dict(pool.imap_unordered(render_one, jobs, chunksize=64))
    return [(Path(path), text) for i, text, path in jobs if ok[i]]


def run(script: str, *args: str) -> float:
    """A pipeline script as a user runs it; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / script), *args], check=True, cwd=results_dir)
    return time.perf_counter() - start


def held_out_scores(checkpoint: Path, processor, images: list, references: list[str]) -> dict:
    """BLEU-4 and exact match of a checkpoint on held-out images, generating as infer.py does."""
    model = modeling.load_base_model(checkpoint, device, processor=processor)
    model = modeling.generation_model(model, torch.float32)
    predictions = modeling.predict(model, processor, images, chat_prompt, sizing, batch_size=len(images),
                                   max_new_tokens=MAX_NEW_TOKENS, show_progress=False)
    scores = metrics.score(predictions, references)
    return dict(bleu=scores["bleu"], exact_match=scores["exact_match"])


def plot(curve: list[dict], points: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    loss_axis.plot([p["seconds"] for p in curve], [p["loss"] for p in curve], color="tab:gray", label="train loss")
    loss_axis.set_xlabel("seconds of training")
    loss_axis.set_ylabel("train loss")
    loss_axis.set_yscale("log")
    score_axis = loss_axis.twinx()
    for key, color in (("bleu", "tab:blue"), ("exact_match", "tab:orange")):
        score_axis.plot([p["seconds"] for p in points], [p[key] for p in points], "o-", color=color,
                        label=f"held-out {key.replace('_', ' ')}")
    score_axis.set_ylim(0, 1)
    score_axis.set_ylabel("held-out score")
    figure.legend(loc="center right", bbox_to_anchor=(0.88, 0.5))
    loss_axis.set_title(f"From scratch: {parameters / 1e6:.1f} M parameters, {len(train)} training formulas")
    figure.tight_layout()
    figure.savefig(path)


# --- data --------------------------------------------------------------------
started = time.perf_counter()
results_dir = (ROOT / RESULTS_DIR).resolve()
results_dir.mkdir(parents=True, exist_ok=True)
on_gpu = torch.cuda.is_available() and not TINY
device = "cuda" if on_gpu else "cpu"
if not on_gpu and not TINY:
    raise SystemExit("No CUDA GPU: run on a GPU, or use --tiny=true for a CPU smoke run of this script.")
if Path(FORMULAS_PATH).is_file():
    lines = Path(FORMULAS_PATH).read_text(encoding="utf-8").splitlines()
    real_train, real_test = lines[:TRAIN_REAL], lines[-TEST_REAL:]
else:  # a user's clone: synthetic formulas of another seed stand in for the real ones
    print(f"{FORMULAS_PATH} not found: synthetic formulas stand in for the real ones")
    stand_in = synth.synthetic_texts("speedrun-stand-in")
    real_train, real_test = [next(stand_in) for _ in range(TRAIN_REAL)], [next(stand_in) for _ in range(TEST_REAL)]
test_formulas = {metrics.normalize(text) for text in real_test}
synthetic = synth.synthetic_texts("speedrun")
train_formulas = [text for text in real_train + [next(synthetic) for _ in range(SYNTHETIC)]
                  if metrics.normalize(text) not in test_formulas]
left_out = TRAIN_REAL + SYNTHETIC - len(train_formulas)
processes = RENDER_PROCESSES or os.cpu_count() or 1
test = rendered(real_test, results_dir / "images", "test-", processes)
train = rendered(train_formulas, results_dir / "images", "train-", processes)
write_conversations(results_dir / "train.json", train)
write_conversations(results_dir / "test.json", test)
write_conversations(results_dir / "val.json", test[:VAL_IMAGES])  # train.py's own evaluation, against infer.py's
render_s = time.perf_counter() - started
print(f"data: {len(train)} training and {len(test)} held-out formulas rendered in {render_s:.0f} s "
      f"({left_out} training formulas equal to a held-out one left out)")

# --- model -------------------------------------------------------------------
model_dir = results_dir / "model"
if not (model_dir / "config.json").is_file():
    tiny.build_model_folder(model_dir, SPEEDRUN_DIMENSIONS, seed=0)
parameters = sum(t.numel() for t in modeling.load_base_model(model_dir, "cpu")[0].parameters())
print(f"model: the Qwen2-VL architecture at {SPEEDRUN_DIMENSIONS}, {parameters:,} parameters, random weights")

# --- train and score ----------------------------------------------------------
run_dir = results_dir / "run"
train_s = run("train.py", f"--model_id={model_dir}", "--train_json_path=train.json", "--val_json_path=val.json",
              f"--output_dir={run_dir}", "--tuner=full", "--train_vision=all", f"--batch_size={BATCH_SIZE}",
              f"--learning_rate={LEARNING_RATE}", "--lr_scheduler_type=cosine", f"--warmup_steps={WARMUP_STEPS}",
              f"--max_steps={MAX_STEPS}", f"--max_minutes={TRAIN_MINUTES}", f"--save_steps={SAVE_STEPS}",
              f"--keep_checkpoints={MAX_STEPS}",
              "--logging_steps=20", f"--num_workers={NUM_WORKERS}", f"--eval_max_new_tokens={MAX_NEW_TOKENS}",
              "--swanlab_mode=disabled", "--resume=false",
              *(["--device=cpu"] if TINY else []))
# No rendering of the predictions: a model that does not read yet writes long runs that mathtext renders slowly
# (about 100 s for the 946 in the first run), and BLEU and exact match need none
infer_s = run("infer.py", f"--output_dir={run_dir}", "--image=test.json", "--batch_size=256", "--render_formulas=false",
              f"--max_new_tokens={MAX_NEW_TOKENS}", *(["--device=cpu"] if TINY else []))
final = json.loads((run_dir / "infer" / "metrics.json").read_text())
trained = json.loads((run_dir / "train_results.json").read_text())
total_s = time.perf_counter() - started

# --- the curve (after the timed run) ----------------------------------------------
curve_started = time.perf_counter()
processor = modeling.load_processor(model_dir)
run_config = json.loads((run_dir / "train_config.json").read_text())
chat_prompt = run_config["prompt"]
from latexocr import chat  # noqa: E402
sizing = chat.recorded_sizing(run_config)
held_out = read_conversations(results_dir / "test.json")[:CURVE_IMAGES]
seconds_at = {point["step"]: point["seconds"] for point in trained["curve"]}
points = []
for checkpoint in sorted(run_dir.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[-1])):
    step = int(checkpoint.name.split("-")[-1])
    seconds = seconds_at.get(step, max((s for k, s in seconds_at.items() if k <= step), default=0.0))
    points.append(dict(step=step, seconds=seconds, **held_out_scores(
        checkpoint, processor, [s.image for s in held_out], [s.text for s in held_out])))
    print(f"checkpoint {step}: held-out BLEU {points[-1]['bleu']:.3f}, exact match {points[-1]['exact_match']:.3f}")
plot(trained["curve"], points, results_dir / "curve.png")

# --- summary -----------------------------------------------------------------
summary = dict(
    **workload.machine(on_gpu), versions=run_config["versions"],
    settings={k: v for k, v in config.items() if k != "formulas_path"},
    dimensions=SPEEDRUN_DIMENSIONS, parameters=parameters, train_samples=len(train), test_samples=len(test),
    left_out_as_held_out=left_out, held_out_bleu=final["bleu"], held_out_exact_match=final["exact_match"],
    held_out_edit_distance=final["edit_distance"], steady_samples_per_s=trained["steady_samples_per_s"],
    epochs=trained["steps"] * BATCH_SIZE / len(train), train_loss=trained["train_loss"], curve=points,
    seconds=dict(rendering=render_s, train_py=train_s, train_py_parts=trained["process_s"], infer_py=infer_s,
                 total=total_s, curve_afterwards=time.perf_counter() - curve_started))
(results_dir / "from_scratch.json").write_text(json.dumps(summary, indent=1) + "\n")
table = "\n".join([
    f"{summary['device']}, {summary['date']}; torch {summary['versions']['torch']}, transformers "
    f"{summary['versions']['transformers']}; {parameters / 1e6:.1f} M parameters from scratch",
    "", "| held-out BLEU-4 | exact match | edit distance | samples/s | epochs | rendering s | train.py s | infer.py s |"
    " total s |", "|---|---|---|---|---|---|---|---|---|",
    f"| {final['bleu']:.3f} | {final['exact_match']:.3f} | {final['edit_distance']:.3f} | "
    f"{trained['steady_samples_per_s']:.0f} | {summary['epochs']:.1f} | {render_s:.0f} | {train_s:.0f} | {infer_s:.0f} | "
    f"{total_s:.0f} |", "", "train.py's process: " + ", ".join(f"{k} {v:.1f} s" for k, v in trained["process_s"].items())])
(results_dir / "from_scratch.md").write_text(table + "\n")
print(table)
print(f"done: {results_dir / 'from_scratch.json'}, {results_dir / 'curve.png'}")
