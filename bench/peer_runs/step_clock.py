"""The one piece of bench/peers.py that runs inside each peer's training process: a transformers TrainerCallback
(all four peers train through transformers' Trainer) that notes when every optimizer step ends, the losses the
peer logs, its peak GPU memory and the package versions it imported, and writes them as JSON when training ends.

The JSON's path comes from the environment variable PEER_CLOCK_JSON, so a peer's own configuration stays as its
users would write it; each peer takes the callback its own documented way (bench/peers.py's docstring says which).
"""

import json
import os
import time
from importlib.metadata import PackageNotFoundError, version

import torch
from transformers import TrainerCallback

CLOCK_JSON = "PEER_CLOCK_JSON"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "ms-swift", "llamafactory", "unsloth",
            "unsloth_zoo", "liger-kernel", "qwen-vl-utils")


def installed_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


class StepClock(TrainerCallback):
    """ms-swift builds its callbacks as Callback(args, trainer), the others as Callback(): both are taken."""

    def __init__(self, *_):
        self.step_ends, self.losses = [], []

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.begin_wall = time.time()
        self.begin = time.perf_counter()
        self.batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer reads every step's loss back already (its nan/inf filter), so waiting here costs nothing and
        # makes each time the end of the step's GPU work, not of its launch.
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter() - self.begin)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        on_gpu = torch.cuda.is_initialized()
        record = dict(batch_size=self.batch_size, step_ends_s=self.step_ends, losses=self.losses,
                      train_begin_wall=self.begin_wall, train_end_wall=time.time(),
                      peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if on_gpu else 0.0,
                      gradient_checkpointing=bool(args.gradient_checkpointing), bf16=bool(args.bf16),
                      versions=installed_versions())
        if state.is_world_process_zero and os.environ.get(CLOCK_JSON):
            with open(os.environ[CLOCK_JSON], "w") as f:
                json.dump(record, f, indent=1)
