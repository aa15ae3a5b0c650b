"""Checkpoints: which one a run continues from, and whether the run asked for is the one they belong to.

The Trainer writes checkpoint-N/ with the weights, the optimizer state and (last, in place) trainer_state.json.
A folder left by a crash lacks one of them, or holds half of the state, and is passed over.
"""

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

# Settings that must match for a checkpoint to be continued; the rest (steps, logging, speed settings) may change.
RESUME_KEYS = ("model_id", "train_data_sha256", "prompt", "min_pixels", "max_pixels", "image_size", "tuner",
               "train_vision", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "batch_size",
               "learning_rate", "lr_scheduler_type", "seed", "distributed")
# Where each DISTRIBUTED setting keeps the optimizer state in a checkpoint (DeepSpeed writes `latest` after its states).
OPTIMIZER_STATE = {"ddp": "optimizer.pt", "zero2": "latest", "zero3": "latest", "fsdp": "optimizer.bin"}
# Schedules whose rate does not depend on the number of steps planned: a run of them may be extended.
STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def read_json(path: Path):
    """The JSON in `path`, or None when it is missing or cut short."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def step_of(folder: Path) -> int:
    return int(folder.name.split("-")[-1])


def last_complete(output_dir: Path, weights_file: str, distributed: str) -> Path | None:
    """The newest checkpoint-N that holds the weights, the optimizer state and a whole trainer_state.json."""
    needed = (weights_file, OPTIMIZER_STATE[distributed])
    complete = [c for c in Path(output_dir).glob("checkpoint-*") if c.name.split("-")[-1].isdigit()
                and all((c / name).is_file() for name in needed) and read_json(c / "trainer_state.json") is not None]
    return max(complete, key=step_of, default=None)


@dataclass
class Resume:
    checkpoint: Path | None = None  # continue from here; None: start over
    finished: bool = False  # the checkpoint is the run's last step: the same command run again
    planned_steps: int | None = None


def decide(output_dir: Path, config: dict, weights_file: str, resume: bool) -> Resume:
    """Continue from the newest complete checkpoint when its run had the same settings; refuse one of other settings
    (before any weights load), and say how to start over."""
    checkpoint = last_complete(output_dir, weights_file, config["distributed"]) if resume else None
    if checkpoint is None:
        return Resume()
    previous = read_json(Path(output_dir) / "train_config.json")
    if not isinstance(previous, dict):
        raise SystemExit(f"{output_dir} holds {checkpoint.name} but no readable train_config.json (the settings of the "
                         "run that wrote it), so it cannot be told whether that run is this one. Use another "
                         "--output_dir, or --resume=false to start over there.")
    changed = [f"{k}: {previous.get(k, 'not recorded')!r} -> {config[k]!r}" for k in RESUME_KEYS
               if previous.get(k, 'not recorded') != config[k]]
    if changed:
        raise SystemExit(f"{output_dir} holds checkpoints of a run with other settings ({'; '.join(changed)}). "
                         "Use another --output_dir, or --resume=false to start over there.")
    state = read_json(checkpoint / "trainer_state.json")
    same_plan = previous.get("max_steps") == config["max_steps"] and \
        previous.get("num_train_epochs") == config["num_train_epochs"]
    if not same_plan and config["lr_scheduler_type"] not in STEP_FREE_SCHEDULES:
        raise SystemExit(
            f"{output_dir} holds a run planned for {state['max_steps']} steps (max_steps={previous.get('max_steps')}, "
            f"num_train_epochs={previous.get('num_train_epochs')}); continued to another length, its "
            f"{config['lr_scheduler_type']} learning-rate schedule would be another one (a rate that decayed to 0 "
            "would jump back up). Run the same length again to finish it, use --lr_scheduler_type=constant for a run "
            "you mean to extend, or start over with --resume=false or another --output_dir.")
    # The Trainer, resumed at its last step, would run one step more; the steps planned are known when max_steps is
    # given, or when the epochs are the checkpointed run's (same data and batch size, checked above).
    planned = config["max_steps"] if config["max_steps"] > 0 else state["max_steps"] if same_plan else None
    return Resume(checkpoint, planned is not None and state["global_step"] >= planned, planned)


def load_weights(model, checkpoint: Path, tuner: str):
    """The trained weights a checkpoint holds, into the model: the adapter's, or (full fine-tuning) the whole model's,
    read through from_pretrained, which maps the saved names back to the model's (Qwen2-VL's checkpoints name
    `model.embed_tokens`, the model `model.language_model.embed_tokens`)."""
    if tuner == "lora":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        return
    from transformers import AutoModelForImageTextToText
    saved = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=next(model.parameters()).dtype,
                                                        use_safetensors=True)
    model.load_state_dict(saved.state_dict())


class _TrainersOwnLoad(logging.Filter):
    """The Trainer's warnings from its own load of a full model's checkpoint, which matches none of the names."""

    def filter(self, record):
        return "keys in the checkpoint model loaded" not in record.getMessage()


@contextlib.contextmanager
def weights_resumed(model, checkpoint: Path | None, tuner: str, distributed: str):
    """Around trainer.train(resume_from_checkpoint=...): a full fine-tune's weights loaded here, since the Trainer's
    own load (a plain load_state_dict of the saved names) matches none of the model's and leaves the base weights
    in place, silently but for a warning that lists every weight. Adapters, DeepSpeed and FSDP load their own."""
    if checkpoint is None or tuner == "lora" or distributed != "ddp":
        yield
        return
    load_weights(model, checkpoint, tuner)
    trainer_log, quiet = logging.getLogger("transformers.trainer"), _TrainersOwnLoad()
    trainer_log.addFilter(quiet)
    try:
        yield
    finally:
        trainer_log.removeFilter(quiet)
