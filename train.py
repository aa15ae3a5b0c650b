"""Fine-tune Qwen2-VL-2B-Instruct into a LaTeX OCR model (LoRA by default, or every weight), then score it on val.

Reads:  latex_ocr_train.json, latex_ocr_val.json (written by csv2json.py)
Writes: output/Qwen2-VL-2B-LatexOCR/ with the adapter (adapter_model.safetensors, adapter_config.json) or, with
        --tuner=full, the whole model (model*.safetensors, config.json), the processor, train_config.json (the
        configuration this run used), train_results.json (speed, memory, the plan it chose and why, where the time
        went) and eval/ (val predictions, metrics, report.html); checkpoints in checkpoint-*; SwanLab logs in ./swanlog
Run:    python train.py                                          (a CUDA GPU with 12 GB or more)
        torchrun --nproc_per_node=4 train.py                     (4 GPUs, data parallel; see docs/distributed.md)
        python train.py --model_id=tiny-random --max_steps=20   (offline, CPU, a tiny random model)
"""

import os
import time

from latexocr import chat, settings
from latexocr.config import apply_overrides

started = time.perf_counter()
# -----------------------------------------------------------------------------
MODEL_ID = "Qwen/Qwen2-VL-2B-Instruct"  # ModelScope id or local folder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); tiny-random
TRAIN_JSON_PATH = "latex_ocr_train.json"  # from csv2json.py
VAL_JSON_PATH = "latex_ocr_val.json"  # from csv2json.py; scored after training; "" = no scoring
OUTPUT_DIR = "output/Qwen2-VL-2B-LatexOCR"  # weights, processor, config, checkpoints, eval results
PROMPT = chat.PROMPT  # the instruction after the image; infer.py reads it from train_config.json
MIN_PIXELS = 0  # px per image, lower bound; 0 = 32 image tokens (a token is 28x28 px, 32x32 on Qwen3-VL)
MAX_PIXELS = 0  # px per image, upper bound, aspect ratio kept; 0 = 512 image tokens
IMAGE_SIZE = ""  # "HxW" px to resize every image to exactly (the tutorial: 500x100); "" = MIN/MAX_PIXELS
TUNER = "lora"  # lora (adapters, small files) | full (every weight of the parts that train)
TRAIN_VISION = "none"  # none (the vision side frozen) | merger (its merger trains too) | all (the whole vision tower)
LORA_RANK = 64
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
LORA_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # comma-separated; language model
BATCH_SIZE = 16  # samples per optimizer step, over all GPUs (the tutorial's 4 x accumulation 4)
MICRO_BATCH_SIZE = 0  # samples per forward pass; 0 = the most that fit in GPU memory (probed before training)
MAX_TOKENS_PER_FORWARD = 0  # a batch with more (padded) tokens is split into forward passes; 0 = from the probe
LEARNING_RATE = 1e-4
LR_SCHEDULER_TYPE = "linear"  # linear (decay to 0) | constant | cosine | ...
WARMUP_STEPS = 0  # optimizer steps of linear warm-up from 0 to LEARNING_RATE (training from scratch wants some)
NUM_TRAIN_EPOCHS = 2
MAX_STEPS = -1  # optimizer steps; -1 = run NUM_TRAIN_EPOCHS
MAX_MINUTES = 0.0  # minutes of training after which it stops and saves, as at its last step; 0 = no limit
FAST = True  # the speed-ups below; false = the stock Trainer and the model's own loss (the reference; slower)
GRADIENT_CHECKPOINTING = "auto"  # auto (only when memory is short) | true | false; GPU only
TORCH_COMPILE = False  # compile each language-model layer with torch.compile (fewer, fused kernels); GPU only
CUDA_GRAPHS = "auto"  # auto (one GPU, no checkpointing) | true | false: each step's forward and backward as one graph
VISION_CACHE_GIB = 8.0  # RAM for the frozen vision tower's outputs, computed once per image for all epochs; 0 = never
LOGGING_STEPS = 10  # optimizer steps between progress lines
SAVE_STEPS = 100  # optimizer steps between checkpoints
KEEP_CHECKPOINTS = 2  # the newest checkpoints kept; older ones are deleted as new ones are saved
NUM_WORKERS = min(4, os.cpu_count() or 1)  # DataLoader processes that open and size images
SEED = 42
RESUME = True  # continue from the newest complete checkpoint in OUTPUT_DIR when the settings match
DEVICE = "auto"  # auto (CUDA if present) | cuda | cpu
GPU_MEMORY_GIB = 0.0  # use at most this much GPU memory (e.g. to act like a smaller card); 0 = all of it
DISTRIBUTED = "ddp"  # with several GPUs: ddp (a whole model per GPU) | zero2 | zero3 (DeepSpeed) | fsdp
SWANLAB_MODE = "auto"  # auto (cloud if logged in, else local) | cloud | local | offline | disabled
SWANLAB_PROJECT = "Qwen2-VL-LatexOCR"
SWANLAB_EXPERIMENT = "qwen2-vl-2b-lora"
MAX_LENGTH = 2048  # tokens per sample (image + prompt + answer); longer samples stop the run before it starts
EVAL_BATCH_SIZE = 64  # images per generation batch
EVAL_MAX_NEW_TOKENS = 256  # generation cap per formula (real formulas: p95 ~112 tokens)
EVAL_PRECISION = "auto"  # as infer.py's: auto (bfloat16 on a CUDA GPU, else float32) | float32 | bfloat16
EVAL_COMPILE_GENERATION = "auto"  # auto (CUDA, bfloat16, 2,000 val images or more) | true | false: CUDA graphs
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), rules=settings.TRAIN)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation, more fits

# --- setup -------------------------------------------------------------------
import json  # noqa: E402  (imported after the overrides so --help is instant)
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

from latexocr import data, evaluate, families, modeling, tracking  # noqa: E402
from latexocr.engine import checkpoints, distributed, kernels, preflight, runtime, tuning  # noqa: E402
from latexocr.engine.plan import Settings, make_plan  # noqa: E402
from latexocr.engine.trainer import (AnswerLossTrainer, ProgressLine, ReadableFiles, TimeLimit,  # noqa: E402
                                    WorkerSeeds, training_arguments)

timings = runtime.Timings(started)  # where the process's time goes, for train_results.json
processes = distributed.from_environment()
DEVICE = runtime.check_setup(config, processes)  # the device, and every setting that cannot work here refused
on_gpu, sharded = DEVICE == "cuda", DISTRIBUTED in ("zero3", "fsdp")
local_device = f"cuda:{processes.local_rank}" if on_gpu else "cpu"
runtime.configure_torch(processes, on_gpu, GPU_MEMORY_GIB, SEED)
distributed.start(processes, on_gpu)
timings.mark("imports and setup")

# --- data and pre-flight ---------------------------------------------------------
train_samples = data.read_conversations(TRAIN_JSON_PATH)
val_samples = data.read_conversations(VAL_JSON_PATH) if VAL_JSON_PATH else []
print(f"data: {len(train_samples)} training samples from {TRAIN_JSON_PATH}, "
      f"{len(val_samples)} val samples from {VAL_JSON_PATH}")
with distributed.main_process_first(processes):
    model_dir = modeling.resolve_model(MODEL_ID)
family = families.detect(model_dir)  # the px per image token, and where the vision tower is
# Pixel bounds are recorded as used, so that infer.py and a resumed run size images the same way.
MIN_PIXELS = config["min_pixels"] = MIN_PIXELS or chat.MIN_IMAGE_TOKENS * family.token_px ** 2
MAX_PIXELS = config["max_pixels"] = MAX_PIXELS or chat.MAX_IMAGE_TOKENS * family.token_px ** 2
image_sizing = chat.sizing(MIN_PIXELS, MAX_PIXELS, IMAGE_SIZE, family.token_px)
processor = modeling.load_processor(model_dir)
sources = TRAIN_JSON_PATH + (f" and {VAL_JSON_PATH}" if VAL_JSON_PATH else "")
lengths = preflight.check_samples(train_samples + val_samples, processor, PROMPT, image_sizing, MAX_LENGTH, sources,
                                  show_progress=processes.main)
print(lengths.histogram(MAX_LENGTH))
cut_short = lengths.over_cap(EVAL_MAX_NEW_TOKENS, first=len(train_samples))  # the val samples'
if cut_short:
    print(cut_short)
train_lengths = lengths.first(len(train_samples))
timings.mark("data and pre-flight")

# --- resume ------------------------------------------------------------------------
# Checkpoints of other settings are refused here, before the weights load, not minutes later.
config["train_data_sha256"] = data.sha256(TRAIN_JSON_PATH)  # the data by its content, not its file name
resume = checkpoints.decide(Path(OUTPUT_DIR), config, tuning.weights_file(TUNER), RESUME)
if len(set(distributed.gathered(processes, resume.checkpoint))) > 1:  # every process must continue from one step
    raise SystemExit(f"the processes find different checkpoints in {OUTPUT_DIR}: to resume over several machines, "
                     "OUTPUT_DIR must be a folder they all share. Or pass --resume=false.")
if resume.checkpoint:
    print(f"resuming from {resume.checkpoint} (step {checkpoints.step_of(resume.checkpoint)}); "
          "--resume=false starts over")

# --- model -------------------------------------------------------------------
model = modeling.load_base_model(model_dir, DEVICE, place=False, processor=processor,
                                 dtype=torch.float32 if TUNER == "full" else None)
transformers.set_seed(SEED)  # here, so that nothing before (building the tiny model, say) shifts the LoRA init
model = tuning.prepare(model, TUNER, TRAIN_VISION, LORA_RANK, LORA_ALPHA, LORA_DROPOUT,
                       [m.strip() for m in LORA_TARGET_MODULES.split(",") if m.strip()])
trainable, total = tuning.trainable_parameters(model), sum(p.numel() for p in model.parameters())
print(f"model: {MODEL_ID} ({family.name}) from {model_dir}; {TUNER} trains {trainable:,} of {total:,} parameters "
      f"({100 * trainable / total:.2f}%) on {DEVICE}" + (f", the vision side: {TRAIN_VISION}" if TRAIN_VISION != "none"
                                                         else ""))
missing = kernels.missing_internals(model, on_gpu) if FAST else ""
if missing:
    FAST = config["fast"] = False
    print(f"fast path: off, this install lacks what it relies on ({missing}); training the plain way (--fast=false)")
# torch.compile fuses the MLP itself; ZeRO-3 gathers B's weight only when its module is called
fused = kernels.fuse(model, mlp=not TORCH_COMPILE, lora=DISTRIBUTED != "zero3") if FAST else []
if TORCH_COMPILE and on_gpu:  # layer by layer: the layers share one graph, the vision tower's Python stays eager
    for layer in tuning.base_model(model).model.language_model.layers:
        layer.compile(dynamic=True)
    print("torch.compile: each language-model layer (compiling takes a minute at the first steps)")
# The configuration this run uses: saved next to the weights, logged to SwanLab, read back by infer.py.
run_config = dict(config, device=DEVICE, model_dir=str(model_dir), train_samples=len(train_samples),
                  val_samples=len(val_samples), val_json_abspath=str(Path(VAL_JSON_PATH).resolve()) if VAL_JSON_PATH
                  else "", trainable_parameters=trainable, family=family.record(), image_sizing=image_sizing,
                  versions=runtime.versions())
if on_gpu and not sharded:
    model.to(local_device)
timings.mark("model loading")

# --- speed plan ------------------------------------------------------------------
collator = chat.TrainCollator(processor, PROMPT, image_sizing)
plan = None if resume.finished else make_plan(
    Settings(BATCH_SIZE, MICRO_BATCH_SIZE, MAX_TOKENS_PER_FORWARD, GRADIENT_CHECKPOINTING, CUDA_GRAPHS,
             VISION_CACHE_GIB, TORCH_COMPILE, DISTRIBUTED, GPU_MEMORY_GIB, NUM_WORKERS, FAST),
    model, collator, family, train_samples, train_lengths.tokens, train_lengths.image_tokens,
    train_lengths.answer_rows, processes, local_device, trainable, tuning.outside_language_model(TUNER, TRAIN_VISION),
    vision_trains=TRAIN_VISION != "none", show_progress=processes.main)
for note in plan.notes if plan else ["plan: none, nothing is left to train (no vision cache, no memory probe)"]:
    print(note)
timings.mark("speed plan")

# --- train -------------------------------------------------------------------
tracker = tracking.Tracker(SWANLAB_MODE, SWANLAB_PROJECT, SWANLAB_EXPERIMENT, run_config, enabled=processes.main)
if tracker.message:
    print(tracker.message)
if processes.main:
    data.atomic_write_text(Path(OUTPUT_DIR) / "train_config.json", json.dumps(run_config, indent=1) + "\n")
if resume.finished:  # the weights as the checkpoint holds them, saved and scored again below
    checkpoints.load_weights(model, resume.checkpoint, TUNER)
    result, progress, trainer = None, None, None
else:
    args = training_arguments(OUTPUT_DIR, plan, on_gpu, DISTRIBUTED, learning_rate=LEARNING_RATE,
                              lr_scheduler_type=LR_SCHEDULER_TYPE, num_train_epochs=NUM_TRAIN_EPOCHS,
                              max_steps=MAX_STEPS, warmup_steps=WARMUP_STEPS, logging_steps=LOGGING_STEPS,
                              save_steps=SAVE_STEPS, keep_checkpoints=KEEP_CHECKPOINTS, seed=SEED,
                              num_workers=NUM_WORKERS)
    progress = ProgressLine(plan.step_graphs)
    common = dict(model=model, args=args, train_dataset=train_samples, data_collator=plan.batches,
                  callbacks=[*tracker.callbacks, WorkerSeeds(SEED), ReadableFiles(),
                             *([TimeLimit(MAX_MINUTES)] if MAX_MINUTES else [])])
    trainer = AnswerLossTrainer(**common, answer_loss=plan.loss, step_graphs=plan.step_graphs) if FAST else \
        transformers.Trainer(**common)
    runtime.replace_the_progress_bar(trainer, progress)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    timings.mark("trainer setup")
    with runtime.adapter_math_in_autocast(model), checkpoints.weights_resumed(model, resume.checkpoint, TUNER,
                                                                             DISTRIBUTED):
        result = trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume.checkpoint else None)
    timings.mark("training")
    if plan.step_graphs:
        plan.step_graphs.finish(model)
kernels.unfuse(fused)  # evaluation runs the model's own code, as infer.py does

# --- save --------------------------------------------------------------------
if trainer is None:  # no Trainer ran (nor prepared DeepSpeed or FSDP): the model is the plain one
    if processes.main:
        model.save_pretrained(OUTPUT_DIR)
else:
    trainer.save_model(OUTPUT_DIR)  # safetensors; every process takes part, rank 0 writes
distributed.stop(processes)
if processes.main:
    (Path(OUTPUT_DIR) / "training_args.bin").unlink(missing_ok=True)  # a pickle; train_config.json says it all
    processor.save_pretrained(OUTPUT_DIR)
    data.make_readable(OUTPUT_DIR)  # safetensors writes the weights for their owner alone
    timings.mark("saving")
saved = "adapter" if TUNER == "lora" else "model"
if processes.main and resume.finished:
    print(f"saved: {saved} and processor in {OUTPUT_DIR}; nothing left to train, {resume.checkpoint.name} is "
          f"the last of the {resume.planned_steps} steps (--resume=false starts over)")
elif processes.main:
    results = dict(steps=trainer.state.global_step, planned_steps=trainer.state.max_steps,
                   steps_this_run=len(progress.step_ends),
                   train_runtime_s=result.metrics["train_runtime"], samples_per_s=result.metrics[
                       "train_samples_per_second"], **progress.speeds(BATCH_SIZE), **plan.record(),
                   split_batches=getattr(trainer, "split_batches", 0),
                   cuda_graphs=plan.step_graphs.captures if plan.step_graphs else 0,
                   cuda_graph_capture_s=plan.step_graphs.capture_s if plan.step_graphs else 0.0,
                   **runtime.peak_memory(on_gpu), train_loss=result.training_loss, fast=FAST,
                   processes=processes.world_size, resumed_from_step=checkpoints.step_of(resume.checkpoint)
                   if resume.checkpoint else 0,
                   process_s=timings.record(), curve=progress.curve)
    data.atomic_write_text(Path(OUTPUT_DIR) / "train_results.json", json.dumps(results, indent=1) + "\n")
    print(f"saved: {saved} and processor in {OUTPUT_DIR} (train loss {result.training_loss:.4f}, "
          f"{result.metrics['train_runtime']:.0f} s, {results['steady_samples_per_s']:.1f} samples/s"
          + (f"; {results['replayed_samples_per_s']:.1f} leaving out the {results['cuda_graphs']} captures, "
             f"{results['cuda_graph_capture_s']:.1f} s" if results["cuda_graphs"] else "") + ")")

# --- evaluate ------------------------------------------------------------------
if processes.main and val_samples and sharded:
    print(f"eval: skipped, with --distributed={DISTRIBUTED} no process holds the whole model; "
          f"score it with: python infer.py --output_dir={OUTPUT_DIR}")
elif processes.main and val_samples:
    runtime.drop_optimizer_state(trainer)  # AdamW's moments go, to make room for the generation weights
    eval_dtype = modeling.generation_dtype(EVAL_PRECISION, DEVICE)
    model = modeling.generation_model(model, eval_dtype)  # the weights are saved
    # --torch_compile's layers were compiled for training's shapes: generation's would only recompile them, so with
    # it generation is eager
    compile_generation = modeling.compiles_generation(EVAL_COMPILE_GENERATION, DEVICE, eval_dtype,
                                                      len(val_samples)) and not TORCH_COMPILE
    if compile_generation and on_gpu:
        print("eval: static KV cache, the decode steps as CUDA graphs (each new cache length compiles first, about "
              "half a minute; --eval_compile_generation=false generates eagerly)")
    with torch.compiler.set_stance("default" if compile_generation else "force_eager"):
        metrics = evaluate.evaluate(model, processor, val_samples, PROMPT, image_sizing, Path(OUTPUT_DIR) / "eval",
                                    EVAL_BATCH_SIZE, EVAL_MAX_NEW_TOKENS, compile_generation=compile_generation)
    tracker.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    if tracker.mode != "disabled":
        tracker.log({"eval/predictions": evaluate.swanlab_images(Path(OUTPUT_DIR) / "eval")})

# --- summary -----------------------------------------------------------------
if processes.main:
    tracker.finish()
    print(f"done: {saved} in {OUTPUT_DIR}; next: python infer.py --output_dir={OUTPUT_DIR}")
