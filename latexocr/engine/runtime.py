"""The run around the training: the device and the settings that cannot work on it, torch's switches, timings,
versions, and what is handed back between training and evaluation."""

import contextlib
import importlib.util
import os
import platform
import sys
import time
import warnings

import torch

from latexocr import modeling
from latexocr.engine.distributed import Processes


class Timings:
    """Seconds per part of the process, from its start (`started`, time.perf_counter()) on."""

    def __init__(self, started: float):
        self.last, self.parts = started, {}

    def mark(self, part: str):
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now

    def record(self) -> dict:
        return dict(self.parts, total=sum(self.parts.values()))


def check_setup(config: dict, processes: Processes) -> str:
    """The device to train on; every combination of settings that cannot work here stops the run, before anything
    loads, with what to do instead. The processes other than rank 0 print nothing from here on."""
    import transformers
    device, model_id = config["device"], config["model_id"]
    if device == "auto":
        device = modeling.default_device()
        if device == "cpu" and model_id not in modeling.TINY_MODELS:
            raise SystemExit(f"No CUDA GPU found. Training {model_id} on a CPU would take days.\n"
                             "To try the whole pipeline on this CPU, use the tiny random model:\n"
                             "  python train.py --model_id=tiny-random --max_steps=20\n"
                             "To train on the CPU anyway, pass --device=cpu.")
    device = modeling.check_device(device)
    if not processes.main:  # every process runs the script; rank 0 speaks for all, errors still reach stderr
        sys.stdout = open(os.devnull, "w")
        transformers.logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
    batch, world = config["batch_size"], processes.world_size
    if batch % world:
        raise SystemExit(f"batch_size={batch} (samples per optimizer step, over all processes) does not split evenly "
                         f"over {world} processes. Pass a multiple of {world}, e.g. "
                         f"--batch_size={max(world, batch - batch % world)}.")
    if config["micro_batch_size"] and (batch // world) % config["micro_batch_size"]:
        raise SystemExit(f"--micro_batch_size={config['micro_batch_size']} must divide the samples per optimizer step "
                         f"of each process ({batch // world}).")
    if config["max_tokens_per_forward"] and (world > 1 or config["micro_batch_size"]):
        raise SystemExit("--max_tokens_per_forward splits batches of one process that runs them whole otherwise: not "
                         "with several processes (each must run as many forward passes as the others) nor with "
                         "--micro_batch_size. Use one of the two.")
    distributed = config["distributed"]
    if distributed.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise SystemExit(f"--distributed={distributed} runs on DeepSpeed, which is optional and not installed:\n"
                         "  pip install deepspeed==0.19.8\n"
                         "Or use --distributed=fsdp (shards the model like zero3; nothing to install) or ddp.")
    if distributed == "fsdp" and device != "cuda":  # DeepSpeed has a CPU backend (gloo), accelerate's FSDP has none
        raise SystemExit("--distributed=fsdp needs CUDA GPUs: accelerate applies FSDP only over GPUs (on a CPU it would "
                         "quietly train as ddp). Use --distributed=ddp, zero2 or zero3 on a CPU.")
    if device == "cuda" and processes.local_rank >= torch.cuda.device_count():
        raise SystemExit(f"process {processes.rank} was given GPU {processes.local_rank}, but this machine has "
                         f"{torch.cuda.device_count()}. Start one process per GPU at most (torchrun --nproc_per_node, "
                         "accelerate launch --num_processes).")
    return device


def configure_torch(processes: Processes, on_gpu: bool, gpu_memory_gib: float, seed: int):
    import transformers
    transformers.set_seed(seed)
    if not on_gpu:
        return
    torch.cuda.set_device(processes.local_rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)  # as modeling.fast_attention: cuDNN builds a graph per length
    if gpu_memory_gib:
        total = torch.cuda.get_device_properties(processes.local_rank).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory_gib / total), processes.local_rank)


def versions() -> dict:
    import peft
    import transformers
    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__)


def replace_the_progress_bar(trainer, progress):
    """The Trainer's own progress bar and dict dumps go: `progress` (a ProgressLine) draws the bar and prints a compact
    line per logging interval."""
    from transformers.trainer_callback import ProgressCallback
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)


def adapter_math_in_autocast(model):
    """peft casts each LoRA input to the adapter's fp32; under bf16 autocast that is two full copies of every
    activation per adapted layer. Without the cast the adapter math runs in bf16, its weights stay fp32."""
    if not hasattr(model, "peft_config"):
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting
    return disable_input_dtype_casting(model)


def peak_memory(on_gpu: bool) -> dict:
    return dict(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if on_gpu else 0.0)


def drop_optimizer_state(trainer):
    """AdamW's moments (0.6 GB for the 2B model's adapter) freed once the weights are saved; only a plain torch
    optimizer's, never a DeepSpeed wrapper's."""
    moments = getattr(getattr(trainer, "optimizer", None), "state", None)
    if isinstance(moments, dict):
        moments.clear()
