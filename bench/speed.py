"""Speed and memory of train.py and infer.py against the tutorial recipe, side by side, in one run.

Both train the same Qwen2-VL-2B shape (random weights: compute and memory do not depend on the values;
Qwen2-VL's real vocabulary by default, TOKENIZER, so answers are as many tokens long as for the real model) with
the same LoRA, the same effective batch of 16 and the same samples, rendered from real LaTeX_OCR formulas
(bench/workload.py). Rows: the tutorial recipe; train.py at the tutorial's image size (the same work, for the ratio);
train.py with its own defaults; the same with --torch_compile=true; the defaults capped to 24 and
12 GiB of GPU memory. A short train.py run goes first, unmeasured: on a freshly started machine the first
training process ran at half speed, whichever it was. Then generation: the tutorial's one-image loop
against infer.py's batched path in fp32 (its default) and in bf16, same images, same token cap, and the
batch's output against that of the same images one at a time.

Reads:  ../shared/data/latex_ocr_val_formulas.txt when present (else synthetic formulas)
Writes: bench_results/bench.json (every number below) and bench_results/bench.md (the table)
Run:    python bench/speed.py                  (a CUDA GPU; about 12 minutes, the first 40 s an unmeasured warm-up)
        python bench/speed.py --tiny=true      (CPU, the tiny model, a few steps: checks the script runs)
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
TINY = False  # the tiny random model on CPU, a few steps: a smoke run of this script
SAMPLES = 996  # training samples (the tutorial's 1000 minus its 4 val)
TUTORIAL_STEPS = 10  # optimizer steps timed for the tutorial (its 2 epochs are 126 of the same steps)
OUR_STEPS = 0  # optimizer steps run for each train.py row; 0 = all of its 2 epochs, measured whole
EVAL_IMAGES = 64  # images for infer.py's batched generation
TUTORIAL_EVAL_IMAGES = 4  # images for the tutorial's one-at-a-time loop (its speed per image is steady)
COMPARED_IMAGES = 8  # of infer.py's batch, generated again one at a time, to compare with the batch's output
EVAL_MAX_NEW_TOKENS = 64  # token cap for both; random weights never stop early, so every image uses it all
FORMULAS_PATH = str(ROOT.parent / "shared" / "data" / "latex_ocr_val_formulas.txt")
RESULTS_DIR = "bench_results"
WARM_UP = True  # a short unmeasured train.py run first (a freshly started machine ran its first one at half speed)
TOKENIZER = "qwen2"  # the 2B random model's: "qwen2" (Qwen2-VL's vocabulary) or "tiny" (the small BPE --tiny=true has)
RUNS = "tutorial,ours_tutorial_size,ours,ours_compiled,ours_24gib,ours_12gib,eval"  # which rows to measure
# -----------------------------------------------------------------------------
config = apply_overrides(globals())

import torch  # noqa: E402

from bench import workload  # noqa: E402
from bench.tutorial_recipe import predict_tutorial, train_tutorial  # noqa: E402
from latexocr import chat, modeling  # noqa: E402
from latexocr.data import Sample, read_conversations  # noqa: E402
from latexocr.engine import runtime  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

PEAK_FLOPS = 790e12  # H200 dense bf16
LANGUAGE_PARAMS, VISION_PARAMS = 1.5436e9, 630.65e6  # Qwen2-VL-2B, from DEVICE.md's MFU formula
EPOCH_STEPS = 2 * -(-SAMPLES // 16)  # optimizer steps in 2 epochs at batch 16 (each epoch ends with a short batch)


def mfu(samples_per_s: float, tokens_per_sample: float, patches_per_sample: float, checkpointing: bool) -> float:
    """Model-FLOPs utilisation: frozen base, so 4 x params per token (6 x when activations are recomputed)."""
    flops = ((6 if checkpointing else 4) * LANGUAGE_PARAMS * tokens_per_sample
             + 2 * VISION_PARAMS * patches_per_sample) * samples_per_s
    return flops / PEAK_FLOPS


def patches_per_sample(samples: list[tuple[Path, str]], image_sizing: dict) -> float:
    sizes = [chat.load_image(image, image_sizing).size for image, _ in samples]
    return sum((w // 14) * (h // 14) for w, h in sizes) / len(sizes)


_lengths = {}  # the image sizing -> each sample's tokens, encoded once for every row that sizes images so


def tokens_per_sample(samples: list[tuple[Path, str]], image_sizing: dict) -> tuple[float, float]:
    """Tokens per sample without padding (image, template, prompt, answer: the work a step must do), and in
    right-padded batches of 16 as train.py forms them (shuffled, seeded; the first 8 batches), where each batch
    is as long as its longest sample."""
    key = tuple(sorted(image_sizing.items()))
    if key not in _lengths:
        collator = chat.TrainCollator(processor, chat.PROMPT, image_sizing)
        _lengths[key] = [collator([Sample(str(j), *sample)])["input_ids"].numel() for j, sample in enumerate(samples)]
    lengths = _lengths[key]
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(42)).tolist()
    batches = [order[i:i + 16] for i in range(0, min(len(order), 16 * 8), 16)]
    padded = sum(len(batch) * max(lengths[j] for j in batch) for batch in batches) / sum(map(len, batches))
    return sum(lengths) / len(lengths), padded


def run_train_py(name: str, *flags: str, steps: int = 0) -> dict:
    """train.py as a user runs it, on the benchmark data, for `steps` optimizer steps (0 = OUR_STEPS, and 0 there
    = its 2 epochs); returns its train_results.json, or what failed (the other rows still run)."""
    output_dir = results_dir / name
    command = [sys.executable, str(ROOT / "train.py"), f"--model_id={model_dir}", f"--train_json_path={train_json}",
               "--val_json_path=", f"--output_dir={output_dir}", f"--max_steps={steps or OUR_STEPS or -1}",
               "--logging_steps=10", "--save_steps=1000000", "--resume=false", "--swanlab_mode=disabled",
               *(["--device=cpu"] if TINY else []), *flags]
    start = time.perf_counter()
    status = subprocess.run(command, cwd=results_dir).returncode
    wall = time.perf_counter() - start
    if status:
        return dict(failed=f"train.py exited with status {status} (its output is above)", flags=list(flags))
    result = json.loads((output_dir / "train_results.json").read_text())
    result["process_wall_s"] = wall  # start-up, loading and the memory probe included
    result["flags"] = list(flags)
    return result


# --- setup -------------------------------------------------------------------
results_dir = (ROOT / RESULTS_DIR).resolve()
results_dir.mkdir(parents=True, exist_ok=True)
on_gpu = torch.cuda.is_available() and not TINY
if not on_gpu and not TINY:
    raise SystemExit("No CUDA GPU: run on a GPU, or use --tiny=true for a CPU smoke run of this script.")
if TINY:
    SAMPLES, TUTORIAL_STEPS, OUR_STEPS, EVAL_IMAGES, TUTORIAL_EVAL_IMAGES, EVAL_MAX_NEW_TOKENS = 48, 2, 2, 4, 2, 4
    COMPARED_IMAGES = 4
    EPOCH_STEPS = 2 * -(-SAMPLES // 16)
results_path = results_dir / "bench.json"
results = json.loads(results_path.read_text()) if results_path.is_file() else {}
results["environment"] = dict(**workload.machine(on_gpu), **runtime.versions(), samples=SAMPLES)

# --- model and data ----------------------------------------------------------
model_dir = workload.model_folder(results_dir, TINY, TOKENIZER)
train_json = workload.train_json(results_dir, SAMPLES, FORMULAS_PATH)
samples = [(s.image, s.text) for s in read_conversations(train_json)]
print(f"data: {len(samples)} samples in {train_json}")
processor = AutoProcessor.from_pretrained(model_dir)

# --- work: training ------------------------------------------------------------
runs = RUNS.split(",")
tutorial_sizing = chat.sizing(image_size="500x100")
if on_gpu and WARM_UP:  # the first training process on a fresh machine ran at half speed: warm up, unmeasured
    run_train_py("warmup", steps=5)
if "tutorial" in runs:
    result = train_tutorial(model_dir, train_json, results_dir / "tutorial", max_steps=TUTORIAL_STEPS,
                            device="cuda" if on_gpu else "cpu")
    result["patches_per_sample"] = result["image_patches"] / result["samples"]
    result["tokens_per_sample"] = result["padded_tokens"] / result["samples"]
    result["activation_checkpointing"] = on_gpu
    results["tutorial"] = result
    results_path.write_text(json.dumps(results, indent=1) + "\n")
for name, flags in [("ours_tutorial_size", ["--image_size=500x100"]), ("ours", []),
                    ("ours_compiled", ["--torch_compile=true"]), ("ours_24gib", ["--gpu_memory_gib=24"]),
                    ("ours_12gib", ["--gpu_memory_gib=12"])]:
    if name in runs and (on_gpu or "gib" not in name):
        result = results[name] = run_train_py(name, *flags)
        if "failed" not in result:
            sizing = tutorial_sizing if "--image_size=500x100" in flags else chat.sizing()
            result["patches_per_sample"] = patches_per_sample(samples, sizing)
            result["real_tokens_per_sample"], result["tokens_per_sample"] = tokens_per_sample(samples, sizing)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
for name in ("tutorial", "ours_tutorial_size", "ours", "ours_compiled", "ours_24gib", "ours_12gib"):
    if name in results and "failed" not in results[name]:
        r = results[name]
        # The tutorial's .map; train.py's vision cache (it prepares images on the fly, in DataLoader workers)
        r["preprocess_s"] = r.get("preprocess_s", r.get("vision_cache_s", 0.0))
        # Measured when the row ran its 2 epochs (graph captures, the short last batches included), else projected
        whole = r.get("steps") == EPOCH_STEPS and r.get("steps_this_run") == EPOCH_STEPS
        training_s = r["train_runtime_s"] if whole else EPOCH_STEPS * 16 / r["steady_samples_per_s"]
        r["two_epochs_s"] = r["preprocess_s"] + training_s
        r["tokens_per_s"] = r["tokens_per_sample"] * r["steady_samples_per_s"]
        # With the vision cache a step does no vision FLOPs: they were done once, before training
        vision_patches = 0.0 if r.get("vision_cache_s") else r["patches_per_sample"]
        r["mfu"] = mfu(r["steady_samples_per_s"], r["tokens_per_sample"], vision_patches, r["activation_checkpointing"])
        if "real_tokens_per_sample" in r:  # padding left out: only the tokens the samples have
            r["mfu_real_tokens"] = mfu(r["steady_samples_per_s"], r["real_tokens_per_sample"], vision_patches,
                                       r["activation_checkpointing"])
        if r.get("cuda_graphs"):  # steps that replayed a graph, the one-time captures left out
            r["mfu_replayed"] = mfu(r["replayed_samples_per_s"], r["tokens_per_sample"], vision_patches, False)
        results_path.write_text(json.dumps(results, indent=1) + "\n")

# --- work: generation ------------------------------------------------------------
if "eval" in runs:
    from peft import LoraConfig, PeftModel, get_peft_model
    images = [image for image, _ in samples[:EVAL_IMAGES]]
    device = "cuda" if on_gpu else "cpu"
    model, processor = modeling.load_base_model(model_dir, device)
    lora = LoraConfig(task_type="CAUSAL_LM", r=64, lora_alpha=16, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tutorial_model = get_peft_model(model, lora)
    start = time.perf_counter()
    predict_tutorial(tutorial_model, processor, images[:TUTORIAL_EVAL_IMAGES], max_new_tokens=EVAL_MAX_NEW_TOKENS)
    tutorial_s = time.perf_counter() - start
    model = tutorial_model.unload()
    adapter = results_dir / "ours_tutorial_size"
    ours_model = PeftModel.from_pretrained(model, adapter) if (adapter / "adapter_model.safetensors").is_file() \
        else get_peft_model(model, lora)
    sizing = chat.sizing()
    results["eval"] = dict(tutorial_images_per_s=TUTORIAL_EVAL_IMAGES / tutorial_s, max_new_tokens=EVAL_MAX_NEW_TOKENS,
                           ours_batch_size=EVAL_IMAGES, compared_images=COMPARED_IMAGES)
    # infer.py's default (fp32: the same output at any batch size), then the same merged weights in bf16
    ours_model = modeling.generation_model(ours_model, torch.float32)
    for precision in ("float32", "bfloat16"):
        ours_model.to(modeling.PRECISIONS[precision])
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        modeling.predict(ours_model, processor, images[:8], chat.PROMPT, sizing, 8, 4, show_progress=False)  # warm-up
        start = time.perf_counter()
        batched = modeling.predict(ours_model, processor, images, chat.PROMPT, sizing, EVAL_IMAGES,
                                   EVAL_MAX_NEW_TOKENS)
        ours_s = time.perf_counter() - start
        one_by_one = [modeling.predict(ours_model, processor, [image], chat.PROMPT, sizing, 1, EVAL_MAX_NEW_TOKENS,
                                       show_progress=False)[0] for image in images[:COMPARED_IMAGES]]
        results["eval"][precision] = dict(images_per_s=EVAL_IMAGES / ours_s, peak_allocated_gib=(
            torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0), equal_to_one_by_one=sum(
            a == b for a, b in zip(batched, one_by_one)))
    results_path.write_text(json.dumps(results, indent=1) + "\n")

# --- summary -----------------------------------------------------------------
env = results["environment"]
lines = [f"{env['device']}, {env['date']}; torch {env['torch']}, transformers {env['transformers']}, "
         f"peft {env['peft']}; {env['samples']} samples, effective batch 16", "",
         "| run | samples/s (graphs replayed) | tokens/s | preprocess s | 2 epochs s | peak alloc / reserved GiB | "
         "MFU (graphs replayed) | MFU, real tokens only | micro-batch x accum, checkpointing | vs tutorial |",
         "|---|---|---|---|---|---|---|---|---|---|"]
base = results.get("tutorial")
for name in ("tutorial", "ours_tutorial_size", "ours", "ours_compiled", "ours_24gib", "ours_12gib"):
    if name not in results:
        continue
    r = results[name]
    if "failed" in r:
        lines.append(f"| {name} | failed: {r['failed']} ||||||||")
        continue
    micro = (4, 4) if name == "tutorial" else (r["micro_batch_size"], r["gradient_accumulation_steps"])
    shape = f"{micro[0]} x {micro[1]}, {'on' if r['activation_checkpointing'] else 'off'}"
    if r.get("cuda_graphs"):
        shape += f"; {r['cuda_graphs']} CUDA graphs captured in {r['cuda_graph_capture_s']:.1f} s"
    if r.get("max_tokens_per_forward"):
        shape += f"; split over {r['max_tokens_per_forward']:,} tokens: {r['split_batches']} of {r['steps_this_run']}"
    ratio = (f"{r['steady_samples_per_s'] / base['steady_samples_per_s']:.1f}x speed, "
             f"{base['two_epochs_s'] / r['two_epochs_s']:.1f}x wall") if base else ""
    speed, utilisation = f"{r['steady_samples_per_s']:.1f}", f"{100 * r['mfu']:.1f}%"
    real_tokens = f"{100 * r['mfu_real_tokens']:.1f}%" if "mfu_real_tokens" in r else ""
    if "mfu_replayed" in r:
        speed += f" ({r['replayed_samples_per_s']:.1f})"
        utilisation += f" ({100 * r['mfu_replayed']:.1f}%)"
    lines.append(f"| {name} | {speed} | {r['tokens_per_s']:.0f} | {r['preprocess_s']:.1f} | "
                 f"{r['two_epochs_s']:.0f} | {r['peak_allocated_gib']:.1f} / {r['peak_reserved_gib']:.1f} | "
                 f"{utilisation} | {real_tokens} | {shape} | {ratio} |")
if "eval" in results:
    e = results["eval"]
    lines += ["", f"generation, {e['max_new_tokens']} new tokens: tutorial one image at a time "
              f"{e['tutorial_images_per_s']:.3f} images/s"]
    for precision in ("float32", "bfloat16"):
        r = e[precision]
        ratio = r["images_per_s"] / e["tutorial_images_per_s"]
        lines.append(f"infer.py in {precision}, batch {e['ours_batch_size']}: {r['images_per_s']:.2f} images/s "
                     f"({ratio:.0f}x), peak {r['peak_allocated_gib']:.1f} GiB; "
                     f"equal to batch size 1 for {r['equal_to_one_by_one']} of {e['compared_images']} images")
table = "\n".join(lines)
(results_dir / "bench.md").write_text(table + "\n")
print(table)
print(f"done: {results_path}, {results_dir / 'bench.md'}")
