"""Where train.py's optimizer steps spend their time: train.py itself, run under torch.profiler.

Runs train.py with the arguments given, exactly as `python train.py ...` would, profiles optimizer steps
PROFILE_FROM to PROFILE_FROM + PROFILE_STEPS - 1 inside the Trainer (data loading, forward, backward,
optimizer), and prints the operators by CPU time and by GPU time, then per step: wall time, GPU busy time,
kernels launched, and the reads back from the GPU (each one makes the CPU wait for the GPU).
Reads:  whatever train.py reads (its arguments)
Writes: whatever train.py writes
Run:    python bench/profile_train.py --model_id=bench_results/qwen2-vl-2b-random-qwen2 \\
            --train_json_path=bench_results/train.json --val_json_path= --max_steps=12 --output_dir=bench_results/profile
        (after bench/speed.py has built the model and the data; on a CPU, with --model_id=tiny-random)
"""

import os
import runpy
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

# Set in the environment, since every argument belongs to train.py:
PROFILE_FROM = int(os.environ.get("PROFILE_FROM", "8"))  # first profiled optimizer step (after warm-up)
PROFILE_STEPS = int(os.environ.get("PROFILE_STEPS", "3"))  # optimizer steps profiled
TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Profile(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == PROFILE_FROM - 1:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            synchronize()
            self.profiler, self.start = profile(activities=activities), time.perf_counter()
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != PROFILE_FROM - 1 + PROFILE_STEPS:
            return
        synchronize()
        wall = (time.perf_counter() - self.start) / PROFILE_STEPS
        self.profiler.__exit__(None, None, None)
        events = self.profiler.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=20))
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        if kernels:
            print(events.table(sort_by="self_device_time_total", row_limit=20))
        gpu_ms = sum(e.self_device_time_total for e in kernels) / PROFILE_STEPS / 1e3
        launches = sum(e.count for e in kernels) / PROFILE_STEPS
        reads = sum(e.count for e in events if e.key == "aten::_local_scalar_dense") / PROFILE_STEPS
        print(f"profile: {1000 * wall:.1f} ms per optimizer step (profiler included), GPU busy {gpu_ms:.1f} ms, "
              f"{launches:.0f} kernels, {reads:.0f} reads back from the GPU")


if __name__ == "__main__":
    trainer_init = transformers.Trainer.__init__

    def init_with_profile(self, *args, **kwargs):
        trainer_init(self, *args, **kwargs)
        self.add_callback(Profile())

    transformers.Trainer.__init__ = init_with_profile
    sys.argv = [str(TRAIN_PY), *sys.argv[1:]]  # --max_steps must reach the profiled steps
    sys.path.insert(0, str(TRAIN_PY.parent))
    runpy.run_path(str(TRAIN_PY), run_name="__main__")
