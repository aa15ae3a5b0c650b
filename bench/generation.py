"""Generation speed: eager generate against the static KV cache with its decode step as CUDA graphs (infer.py's
--compile_generation), in fp32, in TF32 (fp32 weights, TF32 matrix products) and in bf16, through modeling.predict.

The model is the Qwen2-VL-2B shape with random weights (bench/workload.py, as bench/speed.py builds it) or MODEL_DIR;
the images are formulas rendered as bench/workload.py renders them. Every image gets exactly NEW_TOKENS new tokens:
the model's generation_config.min_new_tokens holds the end tokens back until then and max_new_tokens stops there,
so every batch runs NEW_TOKENS - 1 decode steps after its prefill. Each row times its first call apart (a compiled
row compiles then: once per cache length), then the mean of REPEATS calls; and the prompt alone (1 new token, no
decode step), so that ms per decode step = (steady call - prompt alone) / batches / (NEW_TOKENS - 1).
How often each mode changes a trained model's predictions: bench/agreement.py.

Reads:  ../shared/data/latex_ocr_val_formulas.txt when present (else synthetic formulas); MODEL_DIR when given
Writes: bench_results/generation.json (every number), bench_results/generation.md (the table), with --profile
        bench_results/generation_profile.txt; the rendered images in bench_results/generation/, and the random
        model folder as bench/speed.py does
Run:    python bench/generation.py                 (a CUDA GPU; the compiled rows compile for about half a minute each)
        python bench/generation.py --tiny=true     (CPU, the tiny model, a few tokens: checks the script runs)
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from latexocr.config import apply_overrides  # noqa: E402

# -----------------------------------------------------------------------------
TINY = False  # the tiny random model on CPU, a few tokens: a smoke run of this script
MODEL_DIR = ""  # a model folder (config.json + safetensors); "" = the random Qwen2-VL-2B (the tiny one with --tiny)
IMAGES = 256  # formula images generated per call: several batches, as infer.py's (the next is encoded ahead)
BATCH_SIZE = 64  # images per generation batch
NEW_TOKENS = 64  # new tokens per image, exactly (at least 2)
REPEATS = 3  # calls timed after the first, for the steady rate
MODES = "float32,float32_compiled,tfloat32,tfloat32_compiled,bfloat16,bfloat16_compiled"  # bench/workload.py's
PROFILE = ""  # a mode whose steady call is profiled as well (torch.profiler): its top operations, CPU and GPU
TOKENIZER = "qwen2"  # the random 2B model's: "qwen2" (Qwen2-VL's vocabulary) or "tiny" (the small BPE)
FORMULAS_PATH = str(ROOT.parent / "shared" / "data" / "latex_ocr_val_formulas.txt")
RESULTS_DIR = "bench_results"
# -----------------------------------------------------------------------------
config = apply_overrides(globals())

import torch  # noqa: E402

from bench import workload  # noqa: E402
from latexocr import chat, modeling  # noqa: E402
from latexocr.data import read_conversations  # noqa: E402
from latexocr.engine import runtime  # noqa: E402

on_gpu = torch.cuda.is_available() and not TINY
if not on_gpu and not TINY:
    raise SystemExit("No CUDA GPU: run on a GPU, or use --tiny=true for a CPU smoke run of this script.")
if TINY:
    IMAGES, BATCH_SIZE, NEW_TOKENS, REPEATS = 3, 2, 3, 1
if NEW_TOKENS < 2:
    raise SystemExit(f"--new_tokens={NEW_TOKENS}: at least 2, so that a call runs decode steps after its prompt.")
modes = workload.generation_modes(MODES)
results_dir = (ROOT / RESULTS_DIR).resolve()
results_dir.mkdir(parents=True, exist_ok=True)
device = "cuda" if on_gpu else "cpu"

# --- model and data ----------------------------------------------------------
model_dir = Path(MODEL_DIR) if MODEL_DIR else workload.model_folder(results_dir, TINY, TOKENIZER)
image_dir = results_dir / "generation"  # its own: bench/speed.py's train.json in results_dir keeps its sample count
image_dir.mkdir(exist_ok=True)
images = [s.image for s in read_conversations(workload.train_json(image_dir, IMAGES, FORMULAS_PATH))]
model, processor = modeling.load_base_model(model_dir, device, dtype=torch.float32)
sizing = chat.sizing()
batches = -(-len(images) // BATCH_SIZE)
print(f"data: {len(images)} images, batches of {BATCH_SIZE}, {NEW_TOKENS} new tokens each; model {model_dir}")


def timed(new_tokens: int, compiled: bool, tf32: bool) -> float:
    """Seconds for one predict() over every image, each getting exactly new_tokens tokens."""
    model.generation_config.min_new_tokens = new_tokens
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    modeling.predict(model, processor, images, chat.PROMPT, sizing, BATCH_SIZE, new_tokens, show_progress=False,
                     compile_generation=compiled, tf32=tf32)
    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def profile(mode: str, compiled: bool, tf32: bool):
    """One steady call under torch.profiler: the operations taking the most GPU and CPU time, and how much of the
    call the GPU was busy, into generation_profile.txt."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as profiler:
        call_s = timed(NEW_TOKENS, compiled, tf32)
    averages = profiler.key_averages()
    # kernels only, as the table's total counts them: a compiled graph's annotation spans the kernels it ran
    gpu_s = sum(event.self_device_time_total for event in averages
                if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation) / 1e6
    text = [f"{mode}: one call of {len(images)} images, {call_s:.2f} s under the profiler; GPU busy {gpu_s:.2f} s "
            f"({100 * gpu_s / call_s:.0f}%; the profiler slows the CPU side)", "",
            averages.table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=25), "",
            averages.table(sort_by="self_cpu_time_total", row_limit=25)]
    (results_dir / "generation_profile.txt").write_text("\n".join(text) + "\n")
    print(text[0])


# --- work --------------------------------------------------------------------
rows = {}
for mode in modes:
    precision, tf32, compiled = workload.GENERATION_MODES[mode]
    model = modeling.generation_model(model, modeling.PRECISIONS[precision])
    torch.compiler.reset()  # each compiled row compiles its own graphs, in its precision and with its TF32 setting
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    first_s = timed(NEW_TOKENS, compiled, tf32)
    steady_s = sum(timed(NEW_TOKENS, compiled, tf32) for _ in range(REPEATS)) / REPEATS
    prompt_s = timed(1, compiled, tf32)
    rows[mode] = dict(precision=precision, tf32=tf32, compiled=compiled, first_call_s=first_s, steady_call_s=steady_s,
                      images_per_s=len(images) / steady_s, prompt_s_per_batch=prompt_s / batches,
                      ms_per_decode_step=1000 * (steady_s - prompt_s) / batches / (NEW_TOKENS - 1),
                      peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0)
    if mode == PROFILE:
        profile(mode, compiled, tf32)
    print(f"{mode}: {rows[mode]['images_per_s']:.1f} images/s, {rows[mode]['ms_per_decode_step']:.1f} ms per decode "
          f"step, first call {first_s:.1f} s")

# --- save and summary --------------------------------------------------------
results = dict(environment=dict(**workload.machine(on_gpu), **runtime.versions()),
               model_dir=str(model_dir), images=len(images), batch_size=BATCH_SIZE, new_tokens=NEW_TOKENS,
               repeats=REPEATS, cache_length_multiple=modeling.CACHE_LENGTH_MULTIPLE, rows=rows)
(results_dir / "generation.json").write_text(json.dumps(results, indent=1) + "\n")
env = results["environment"]
lines = [f"{env['device']}, {env['date']}; torch {env['torch']}, transformers {env['transformers']}; {len(images)} "
         f"images in batches of {BATCH_SIZE}, exactly {NEW_TOKENS} new tokens each", "",
         "| mode | images/s | ms per decode step | prompt s per batch | first call s | peak alloc GiB |",
         "|---|---|---|---|---|---|"]
lines += [f"| {mode} | {r['images_per_s']:.1f} | {r['ms_per_decode_step']:.1f} | {r['prompt_s_per_batch']:.2f} | "
          f"{r['first_call_s']:.1f} | {r['peak_allocated_gib']:.1f} |" for mode, r in rows.items()]
table = "\n".join(lines)
(results_dir / "generation.md").write_text(table + "\n")
print(table)
print(f"done: {results_dir / 'generation.json'}, {results_dir / 'generation.md'}")
