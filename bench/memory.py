"""GPU memory and speed of each training setting (TUNER x TRAIN_VISION) on the Qwen2-VL-2B shape, and what fits 24 GB.

For each setting, train.py as a user runs it (`--tuner=... --train_vision=...`, everything else at its defaults)
for a few optimizer steps on the benchmark's samples (bench/workload.py: the 2B shape with random weights and
Qwen2-VL's vocabulary; formulas rendered from real LaTeX_OCR text), once with the whole GPU and once capped to
CAP_GIB (`--gpu_memory_gib`), where the plan picks the micro-batch and checkpointing that fit, or says that nothing
does. The numbers are what train_results.json records: the peak memory the steps reached (the optimizer's state
included: it is made at the first step), the plan's choices and the steady samples/s.

Reads:  ../shared/data/latex_ocr_val_formulas.txt when present (else synthetic formulas)
Writes: bench_results/memory.json (every row; a later run replaces the rows it measures again, keeps the others)
        and bench_results/memory.md (the table)
Run:    python bench/memory.py                 (a CUDA GPU; about 30 s a row)
        python bench/memory.py --tiny=true     (CPU, the tiny model: checks the script runs)
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
TINY = False  # the tiny random model on CPU: a smoke run of this script
SETTINGS = "lora/none,lora/merger,lora/all,full/none,full/merger,full/all"  # tuner/train_vision, comma-separated
CAP_GIB = 24.0  # the smaller card each setting is also tried on; 0 = only the whole GPU
WHOLE_GPU = True  # also each setting with the whole GPU
STEPS = 6  # optimizer steps per row (the first makes the optimizer's state; the rest give the speed)
SAMPLES = 996  # benchmark samples (shared with bench/speed.py and bench/peers.py)
FORMULAS_PATH = str(ROOT.parent / "shared" / "data" / "latex_ocr_val_formulas.txt")
RESULTS_DIR = "bench_results"
# -----------------------------------------------------------------------------
config = apply_overrides(globals())

import torch  # noqa: E402

from bench import workload  # noqa: E402
from latexocr.engine import runtime  # noqa: E402

# --- setup -------------------------------------------------------------------
results_dir = (ROOT / RESULTS_DIR).resolve()
results_dir.mkdir(parents=True, exist_ok=True)
on_gpu = torch.cuda.is_available() and not TINY
if not on_gpu and not TINY:
    raise SystemExit("No CUDA GPU: run on a GPU, or use --tiny=true for a CPU smoke run of this script.")
settings = [tuple(s.strip().split("/")) for s in SETTINGS.split(",") if s.strip()]
if TINY:
    SAMPLES, STEPS = 32, 2
model_dir = workload.model_folder(results_dir, TINY)
train_json = workload.train_json(results_dir, SAMPLES, FORMULAS_PATH)
caps = ([0.0] if WHOLE_GPU or not CAP_GIB else []) + ([CAP_GIB] if CAP_GIB and on_gpu else [])
environment = dict(**workload.machine(on_gpu), **runtime.versions())
results_path = results_dir / "memory.json"
rows = json.loads(results_path.read_text())["rows"] if results_path.is_file() else []

# --- work ----------------------------------------------------------------------
for tuner, train_vision in settings:
    for cap in caps:
        name = f"memory_{tuner}_{train_vision}" + (f"_{cap:g}gib" if cap else "")
        output_dir = results_dir / name
        command = [sys.executable, str(ROOT / "train.py"), f"--model_id={model_dir}", f"--train_json_path={train_json}",
                   "--val_json_path=", f"--output_dir={output_dir}", f"--max_steps={STEPS}", f"--tuner={tuner}",
                   f"--train_vision={train_vision}", "--logging_steps=1", "--save_steps=1000000", "--resume=false",
                   "--swanlab_mode=disabled", *([f"--gpu_memory_gib={cap}"] if cap else []),
                   *(["--device=cpu"] if TINY else [])]
        print(f"--- {tuner}/{train_vision}, {f'capped to {cap:g} GiB' if cap else 'the whole GPU'}", flush=True)
        start = time.perf_counter()
        process = subprocess.run(command, cwd=results_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(process.stdout[-3000:])
        row = dict(tuner=tuner, train_vision=train_vision, cap_gib=cap, process_s=time.perf_counter() - start)
        if process.returncode:
            last = [line for line in process.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
            row["failed"] = f"exit status {process.returncode}: {last[0][:300]}"
        else:
            result = json.loads((output_dir / "train_results.json").read_text())
            trained = json.loads((output_dir / "train_config.json").read_text())["trainable_parameters"]
            row.update(trainable_parameters=trained, **{k: result.get(k) for k in (
                "peak_allocated_gib", "peak_reserved_gib", "steady_samples_per_s", "micro_batch_size",
                "gradient_accumulation_steps", "activation_checkpointing", "cuda_graphs_on", "vision_cache")})
        rows = [r for r in rows if (r["tuner"], r["train_vision"], r["cap_gib"]) != (tuner, train_vision, cap)] + [row]
        results_path.write_text(json.dumps(dict(**environment, steps=STEPS, rows=rows), indent=1) + "\n")

# --- summary -----------------------------------------------------------------
lines = [f"{environment['device']}, {environment['date']}; torch {environment['torch']}, "
         f"transformers {environment['transformers']}; {STEPS} steps of 16 samples per row", "",
         "| tuner / train_vision | GPU memory | trains (parameters) | peak allocated / reserved GiB | samples/s | "
         "micro-batch x accumulation, checkpointing, graphs, vision cache |", "|---|---|---|---|---|---|"]
parts = ("none", "merger", "all")
for r in sorted(rows, key=lambda r: (r["tuner"] != "lora", parts.index(r["train_vision"]) if r["train_vision"] in parts
                                     else len(parts), r["cap_gib"])):
    where = f"capped to {r['cap_gib']:g} GiB" if r["cap_gib"] else "whole GPU"
    if "failed" in r:
        lines.append(f"| {r['tuner']} / {r['train_vision']} | {where} | does not run: {r['failed']} ||||")
        continue
    plan = (f"{r['micro_batch_size']} x {r['gradient_accumulation_steps']}, "
            f"{'on' if r['activation_checkpointing'] else 'off'}, {'on' if r['cuda_graphs_on'] else 'off'}, "
            f"{'on' if r['vision_cache'] else 'off'}")
    lines.append(f"| {r['tuner']} / {r['train_vision']} | {where} | {r['trainable_parameters'] / 1e6:,.1f} M | "
                 f"{r['peak_allocated_gib']:.1f} / {r['peak_reserved_gib']:.1f} | {r['steady_samples_per_s']:.1f} | "
                 f"{plan} |")
table = "\n".join(lines)
(results_dir / "memory.md").write_text(table + "\n")
print(table)
