"""What each script's settings may be: checked right after the command line is read, before anything loads.

A rule takes the setting's name and value and returns the value (an enumeration lower-cased) or stops the run
with a message that names the value and what it may be. config.apply_overrides applies a script's table.
"""

import os
import re
from pathlib import Path


def _stop(name: str, value, expected: str):
    raise SystemExit(f"--{name}={value}: {expected}.")


def positive(name, value):
    if value <= 0:
        _stop(name, value, "must be more than 0")
    return value


def at_least_zero(name, value):
    if value < 0:
        _stop(name, value, "must be 0 or more")
    return value


def steps_or_all(name, value):
    """A count where -1 means "all" (or "no limit")."""
    if value != -1 and value <= 0:
        _stop(name, value, "must be more than 0, or -1 for no limit")
    return value


def fraction(name, value):
    """A probability such as dropout: 0 <= value < 1."""
    if not 0 <= value < 1:
        _stop(name, value, "must be at least 0 and below 1")
    return value


def rate(name, value):
    """A learning rate: positive and below 1 (1e-4 is the default; 1 or more diverges at once)."""
    if not 0 < value < 1:
        _stop(name, value, "must be more than 0 and below 1, e.g. 1e-4")
    return value


def one_of(*options):
    def rule(name, value):
        if str(value).lower() not in options:
            _stop(name, value, f"expected {', '.join(options[:-1])} or {options[-1]}")
        return str(value).lower()
    return rule


def name_or_path(*names):
    """One of `names` in any case (kept lower-case), or else a path, kept as typed."""
    def rule(name, value):
        return value.lower() if value.lower() in names else value
    return rule


def _writable(name, value, path: Path):
    """The nearest existing folder on the way to path can be written into."""
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        _stop(name, value, f"cannot be written ({existing} is a file, not a folder); pass a folder you can write to")
    if not os.access(existing, os.W_OK | os.X_OK):
        _stop(name, value, f"cannot be written ({existing} is not writable); pass a folder you can write to")


def output_folder(name, value):
    """A folder the script will write into: not an existing file, and creatable and writable."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        _stop(name, value, "is a file, not a folder; pass a folder to write into")
    _writable(name, value, path)
    return value


def output_file(name, value):
    """A file the script will write: not a folder, in a folder that is writable (or can be made)."""
    if not value:
        return value
    path = Path(value).expanduser()
    if path.is_dir():
        _stop(name, value, "is a folder; pass a file name")
    _writable(name, value, path.parent)
    return value


def optional(rule):
    """The rule, where "" (none) is allowed too."""
    return lambda name, value: value if value == "" else rule(name, value)


def pixel_size(name, value):
    """"HxW" in px, or "" for none."""
    if value == "":
        return value
    try:
        height, width = (int(v) for v in value.lower().split("x"))
    except ValueError:
        _stop(name, value, "expected HEIGHTxWIDTH in px, e.g. 100x500")
    if height <= 0 or width <= 0:
        _stop(name, value, "both sides must be more than 0 px")
    return value


def listen_address(name, value):
    """A host name or IP address for a server to listen on."""
    if not value.strip() or any(c.isspace() for c in value):
        _stop(name, value, "expected an address to listen on, e.g. 127.0.0.1 (this machine) or 0.0.0.0 (every network)")
    return value


def tcp_port(name, value):
    if not 0 < value < 65536:
        _stop(name, value, "expected a TCP port from 1 to 65535, e.g. 7860")
    return value


def module_names(name, value):
    """Comma-separated module names, at least one."""
    if not [m for m in value.split(",") if m.strip()]:
        _stop(name, value, "expected comma-separated module names, e.g. q_proj,v_proj")
    return value


def shard_size(name, value):
    """A size such as 5GB or 500MB."""
    if not re.fullmatch(r"\d+(\.\d+)?[KMGT]I?B", value.upper()):
        _stop(name, value, "expected a size such as 5GB or 500MB")
    return value


SWITCH = one_of("auto", "true", "false")
DEVICE = one_of("auto", "cuda", "cpu")
PRECISION = one_of("auto", "float32", "bfloat16")
SCHEDULES = one_of("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                   "inverse_sqrt")

DATA2CSV = dict(source=name_or_path("modelscope", "huggingface", "synthetic"), max_data_number=steps_or_all,
                dataset_dir=output_folder, csv_path=output_file, max_val_number=steps_or_all, val_csv_path=output_file)
CSV2JSON = dict(train_json_path=output_file, val_json_path=output_file, rejects_path=output_file,
                val_size=steps_or_all)
TRAIN = dict(
    output_dir=output_folder, min_pixels=at_least_zero, max_pixels=at_least_zero, image_size=pixel_size,
    tuner=one_of("lora", "full"), train_vision=one_of("none", "merger", "all"), lora_rank=positive,
    lora_alpha=positive, lora_dropout=fraction, lora_target_modules=module_names, batch_size=positive,
    micro_batch_size=at_least_zero, max_tokens_per_forward=at_least_zero, learning_rate=rate,
    lr_scheduler_type=SCHEDULES, warmup_steps=at_least_zero, num_train_epochs=positive, max_steps=steps_or_all,
    max_minutes=at_least_zero,
    gradient_checkpointing=SWITCH, cuda_graphs=SWITCH, vision_cache_gib=at_least_zero, logging_steps=positive,
    save_steps=positive, keep_checkpoints=positive, num_workers=at_least_zero, device=DEVICE,
    gpu_memory_gib=at_least_zero, distributed=one_of("ddp", "zero2", "zero3", "fsdp"),
    swanlab_mode=one_of("auto", "cloud", "local", "offline", "disabled"), max_length=positive,
    eval_batch_size=positive, eval_max_new_tokens=positive, eval_precision=PRECISION, eval_compile_generation=SWITCH)
INFER = dict(results_dir=optional(output_folder), batch_size=positive, max_new_tokens=positive, precision=PRECISION,
             device=DEVICE, compile_generation=SWITCH)
EXPORT = dict(export_dir=optional(output_folder), dtype=one_of("auto", "bfloat16", "float16", "float32"),
              device=DEVICE, max_shard_size=shard_size)
APP = dict(host=listen_address, port=tcp_port, precision=optional(PRECISION), max_new_tokens=positive, device=DEVICE,
           examples=at_least_zero, max_image_pixels=positive, compile_generation=SWITCH)
