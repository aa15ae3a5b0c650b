"""The Trainer with the answer-only loss, CUDA-graph steps and split batches, and its progress line."""

import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from latexocr import chat
from latexocr.data import make_readable

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # DeepSpeed's configuration files


def checkpointing_arguments(on: bool, arguments_class) -> dict:
    """TrainingArguments' activation checkpointing switch by its name in this transformers: activation_checkpointing
    from 5.2x on, gradient_checkpointing before (5.17, which ms-swift and Unsloth pin, has only that one)."""
    fields = {field.name for field in dataclasses.fields(arguments_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def training_arguments(output_dir: str, plan, on_gpu: bool, distributed: str, *, learning_rate: float,
                       lr_scheduler_type: str, num_train_epochs: float, max_steps: int, warmup_steps: int,
                       logging_steps: int, save_steps: int, keep_checkpoints: int, seed: int,
                       num_workers: int) -> TrainingArguments:
    fsdp = distributed == "fsdp"
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation, learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler_type, num_train_epochs=num_train_epochs, max_steps=max_steps,
        warmup_steps=warmup_steps, logging_steps=logging_steps, logging_first_step=True, save_steps=save_steps,
        save_total_limit=keep_checkpoints, seed=seed,
        data_seed=seed, bf16=on_gpu, use_cpu=not on_gpu, optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        **checkpointing_arguments(plan.checkpointing and not fsdp, TrainingArguments),
        # Workers persist across epochs (restarting them cost 0.4 s an epoch on 2 CPU cores); WorkerSeeds keeps a
        # resumed run exact with them.
        dataloader_num_workers=num_workers, dataloader_persistent_workers=num_workers > 0,
        dataloader_pin_memory=on_gpu, remove_unused_columns=False, report_to="none",
        # Batches go to the GPU while it still works on the previous one; a blocking copy would wait for it to finish.
        accelerator_config={"non_blocking": on_gpu},
        logging_nan_inf_filter=False,  # the filter reads the loss every micro-batch: a GPU sync that stalls the queue
        # Several processes: the loss of a step is the mean over the answer tokens of all its samples on all GPUs
        # (each GPU divides its token sum by the all-reduced token count), so it equals one process with the same batch.
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,  # every trainable weight is used in every forward; True walks the graph
        deepspeed=str(CONFIGS / f"{distributed}.json") if distributed in ("zero2", "zero3") else None,
        # FSDP2 shards each decoder and vision block (the model's _no_split_modules); the full state dict at saving
        # is what lets the Trainer write the weights as safetensors; FSDP's own checkpointing saves an all-gather.
        fsdp=fsdp, fsdp_config=dict(version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP",
                                    state_dict_type="FULL_STATE_DICT",
                                    activation_checkpointing=plan.checkpointing) if fsdp else None)


class AnswerLossTrainer(Trainer):
    """The Trainer with loss.AnswerLoss, the steps StepGraphs takes, and batches split into forward passes.

    The loss is divided by the labelled tokens of the whole optimizer step (num_items_in_batch) when the Trainer
    counts them, so it is already scaled for accumulation (loss_is_scaled_for_ga, as the Trainer's docstring asks
    of a custom loss), and multiplied by the processes when each process divides by all processes' tokens, as the
    Trainer does for a model's own loss (average_tokens_across_devices)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, answer_loss, step_graphs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_loss, self.step_graphs = answer_loss, step_graphs
        self.model_accepts_loss_kwargs = True  # num_items_in_batch reaches compute_loss, whatever peft reports
        self.split_batches = 0  # batches that ran as several forward passes (AnswerBatches.max_tokens)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A batch StepGraphs takes runs there, as compute_loss and the backward would run it. A batch split by
        AnswerBatches runs as several forward and backward passes; their losses, each divided by the step's
        labelled tokens, add up to the whole batch's loss, and so do their gradients."""
        if self.step_graphs is not None and self.step_graphs.accepts(inputs):
            model.train()
            inputs = {k: v.to(self.args.device, non_blocking=True) for k, v in inputs.items()}
            denominator = num_items_in_batch if num_items_in_batch is not None else \
                len(inputs["answer_targets"]) * self.current_gradient_accumulation_steps  # as compute_loss divides
            loss = self.step_graphs.step(inputs, denominator)
            if loss is not None:
                return loss
            tqdm.write(f"CUDA graphs: off from here on, a batch could not be captured ({self.step_graphs.failed}); "
                       "steps run eagerly")
        if "chunks" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:  # splitting runs with one process and no accumulation: the batch is the step
            num_items_in_batch = (inputs["labels"] != chat.IGNORE_INDEX).sum()
        self.split_batches += 1
        return sum(super(AnswerLossTrainer, self).training_step(model, chunk, num_items_in_batch)
                   for chunk in inputs["chunks"])

    def floating_point_ops(self, inputs):
        if "chunks" not in inputs:
            return super().floating_point_ops(inputs)
        return sum(super(AnswerLossTrainer, self).floating_point_ops(chunk) for chunk in inputs["chunks"])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.answer_loss(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:
            loss = loss / self.current_gradient_accumulation_steps
        elif self.args.average_tokens_across_devices:  # num_items_in_batch counts every process's tokens
            loss = loss * self.accelerator.num_processes
        return loss


class WorkerSeeds(TrainerCallback):
    """The training DataLoader's workers take their base seed from a generator of their own, not from torch's global
    random state, which dropout draws from. A persistent worker pool makes that draw once, at the first epoch; a
    resumed run's new DataLoader makes it again at its first full epoch, after the checkpoint's random state was
    restored, and shifted every later dropout mask (the adapters differed by 2.5e-4 after 12 steps of the tiny
    model). The workers draw no random numbers of their own, so their seed changes nothing else."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # accelerate wraps the DataLoader (DataLoaderShard) and iterates the one it wraps
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        if loader is not None:
            loader.generator = torch.Generator().manual_seed(self.seed)


class TimeLimit(TrainerCallback):
    """Training stops at the first optimizer step after `minutes` of it and saves, as at its last step (the
    schedule is not shortened: the learning rate is where that step left it). With several processes they stop at
    the same step: the slowest clock decides."""

    def __init__(self, minutes: float):
        self.seconds, self.started = 60 * minutes, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        over = time.perf_counter() - self.started >= self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor(float(over), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            over = bool(flag.item())
        if over and not control.should_training_stop:
            control.should_training_stop = control.should_save = True
            if state.is_world_process_zero:
                print(f"time limit: {self.seconds / 60:g} minutes of training reached at step {state.global_step} "
                      f"of {state.max_steps}; saving")


class ReadableFiles(TrainerCallback):
    """Each checkpoint's files with the mode a plain open() gives (safetensors writes them for the owner alone), so
    that another user or a server can read the weights."""

    def on_save(self, args, state, control, **kwargs):
        make_readable(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class ProgressLine(ProgressCallback):
    """The progress bar, plus one compact line per logging interval instead of a dict dump; it keeps the time at
    the end of every step (and the graphs' capture time by then) for the run's steady speed."""

    def __init__(self, step_graphs=None):
        super().__init__()
        self.step_graphs = step_graphs
        self.step_ends, self.capture_s = [], []
        self.curve = []  # per logged step: step, seconds since training began, loss, learning rate

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.began = self.last_time = time.perf_counter()
        self.last_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.step_ends.append(time.perf_counter())
        self.capture_s.append(self.step_graphs.capture_s if self.step_graphs else 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        samples = (state.global_step - self.last_step) * args.train_batch_size * \
            args.gradient_accumulation_steps * args.world_size
        speed = samples / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, state.global_step
        self.curve.append(dict(step=state.global_step, seconds=now - self.began, loss=logs["loss"],
                               learning_rate=logs.get("learning_rate", 0.0)))
        memory = f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_initialized() else ""
        tqdm.write(f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
                   f"grad_norm {logs.get('grad_norm', float('nan')):.3f} | lr {logs.get('learning_rate', 0):.2e} | "
                   f"{speed:.1f} samples/s{memory}")

    def speeds(self, batch_size: int) -> dict:
        """Steady samples/s (the first step left out: DataLoader workers starting, kernels warming up), and the same
        with the graphs' one-time captures left out: the rate of replayed steps."""
        if len(self.step_ends) < 2:
            return dict(steady_samples_per_s=float("nan"), replayed_samples_per_s=float("nan"))
        steady = self.step_ends[-1] - self.step_ends[0]
        replayed = steady - (self.capture_s[-1] - self.capture_s[0])
        steps = len(self.step_ends) - 1
        return dict(steady_samples_per_s=steps * batch_size / steady, replayed_samples_per_s=steps * batch_size / replayed)
