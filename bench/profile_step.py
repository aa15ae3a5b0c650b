"""Where one training step of train.py's defaults spends its time, on a GPU.

Runs optimizer steps of 16 samples on the benchmark's Qwen2-VL-2B with random weights (made by
bench/speed.py), the way train.py runs them (bf16 autocast, LoRA r=64, fused AdamW, no checkpointing),
times variants that isolate one cost each, and prints torch.profiler's top operators.
Reads:  bench_results/qwen2-vl-2b-random, bench_results/train.json (run bench/speed.py first)
Run:    python bench/profile_step.py
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from latexocr.config import apply_overrides  # noqa: E402

# -----------------------------------------------------------------------------
RESULTS_DIR = "bench_results"
STEPS = 5  # timed optimizer steps per variant
# -----------------------------------------------------------------------------
config = apply_overrides(globals())

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from latexocr import chat, modeling  # noqa: E402
from latexocr.data import read_conversations  # noqa: E402

results_dir = (ROOT / RESULTS_DIR).resolve()
model, processor = modeling.load_base_model(results_dir / "qwen2-vl-2b-random", "cuda")
samples = read_conversations(results_dir / "train.json")[:16]
batch = {k: v.cuda() for k, v in chat.TrainCollator(processor, chat.PROMPT, chat.sizing())(samples).items()}
print(f"batch: {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} tokens, "
      f"{batch['pixel_values'].shape[0]} patches")
torch.backends.cuda.matmul.allow_tf32 = True


def timed(name: str, step) -> float:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / STEPS
    print(f"{name:<48} {1000 * seconds:8.1f} ms/step  {16 / seconds:6.1f} samples/s")
    return seconds


def lora_model(dropout: float):
    lora = LoraConfig(task_type="CAUSAL_LM", r=64, lora_alpha=16, lora_dropout=dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora)


def train_step(peft_model, optimizer):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


peft_model = lora_model(0.05)
optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4, fused=True)
full = train_step(peft_model, optimizer)
timed("train step (train.py defaults)", full)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(2):
        full()
    torch.cuda.synchronize()
averages = prof.key_averages()
print(averages.table(sort_by="cuda_time_total", row_limit=20))
print(averages.table(sort_by="self_cpu_time_total", row_limit=15))
gpu_busy = sum(e.self_device_time_total for e in averages) / 2 / 1e3
print(f"GPU busy per step: {gpu_busy:.1f} ms (sum of kernel times)")
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    timed("forward only, no grad", lambda: peft_model(**batch))
    visual = peft_model.base_model.model.model.visual
    timed("vision tower forward only", lambda: visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]))
model = peft_model.unload()

peft_model = lora_model(0.0)
optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4, fused=True)
timed("train step, LoRA dropout 0", train_step(peft_model, optimizer))
for module in peft_model.modules():  # LoRA weights in bf16: no fp32 adapter matmuls under autocast
    if hasattr(module, "lora_A"):
        module.to(torch.bfloat16)
optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4, fused=True)
no_dropout_bf16 = train_step(peft_model, optimizer)
timed("train step, LoRA dropout 0, LoRA weights bf16", no_dropout_bf16)

