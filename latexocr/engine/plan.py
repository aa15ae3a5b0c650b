"""The speed plan: how a run's steps will be run, decided once before training, each choice with its reason.

In order: the vision cache (when the vision side is frozen and its outputs fit the RAM given), the micro-batch
(the largest that fits GPU memory, probed with the longest samples, without activation checkpointing when
possible: checkpointing recomputes every layer's forward, a third more compute, and small micro-batches leave the
GPU idle), CUDA graphs (on one GPU, for the largest micro-batch whose graphs leave the optimizer its memory), and
with one process and no graphs a token budget per forward pass, so that only a batch over it is split.
"""

import time
from dataclasses import dataclass, field

import torch

from latexocr import chat
from latexocr.engine import graphs, memory
from latexocr.engine.batching import AnswerBatches
from latexocr.engine.distributed import Processes
from latexocr.engine.loss import AnswerLoss
from latexocr.engine.vision_cache import VisionCache, levels, size_gib


@dataclass
class Settings:
    """What the plan reads of train.py's configuration (its constants of the same names, lower case)."""
    batch_size: int
    micro_batch_size: int = 0
    max_tokens_per_forward: int = 0
    gradient_checkpointing: str = "auto"
    cuda_graphs: str = "auto"
    vision_cache_gib: float = 8.0
    torch_compile: bool = False
    distributed: str = "ddp"
    gpu_memory_gib: float = 0.0
    num_workers: int = 0
    fast: bool = True


@dataclass
class Plan:
    micro_batch: int
    accumulation: int
    checkpointing: bool
    batches: object  # the training collator
    loss: object  # AnswerLoss, or None: the model's own loss (fast off)
    step_graphs: graphs.StepGraphs | None = None
    vision_cache: VisionCache | None = None
    vision_cache_s: float = 0.0
    notes: list[str] = field(default_factory=list)  # one line per decision, with its reason

    @property
    def max_tokens(self) -> int:
        return getattr(self.batches, "max_tokens", 0)

    def record(self) -> dict:
        """What train_results.json keeps of the plan."""
        return dict(micro_batch_size=self.micro_batch, gradient_accumulation_steps=self.accumulation,
                    activation_checkpointing=self.checkpointing, max_tokens_per_forward=self.max_tokens,
                    vision_cache=self.vision_cache is not None, vision_cache_s=self.vision_cache_s,
                    cuda_graphs_on=self.step_graphs is not None, plan=self.notes)


def enable_checkpointing(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_plan(s: Settings, model, collator: chat.TrainCollator, family, samples: list, lengths: list[int],
              image_tokens: list[int], answer_rows: list[int], processes: Processes, device: str,
              trainable_parameters: int, outside_language_model: str = "", vision_trains: bool = False,
              show_progress: bool = True) -> Plan:
    """samples, lengths (tokens), image_tokens and answer_rows (labelled positions) are the training samples'.
    outside_language_model: what trains outside the language model's layers ("" when nothing does), which keeps the
    graphs off; vision_trains: whether that is part of the vision side, which keeps the vision cache off too (a full
    fine-tune's token embeddings do not change what the frozen vision tower outputs)."""
    on_gpu, sharded = device.startswith("cuda"), s.distributed in ("zero3", "fsdp")
    per_device_batch = s.batch_size // processes.world_size
    notes = []
    longest_first = [sample for _, sample in sorted(zip(lengths, samples), key=lambda pair: -pair[0])]

    # --- the vision cache
    cache, cache_s = None, 0.0
    cache_gib = size_gib(sum(image_tokens), model.config, 2 if on_gpu else 4)
    if not s.fast:
        notes.append("vision cache: off (fast=false)")
    elif vision_trains:
        notes.append(f"vision cache: off with {outside_language_model} training; every step runs the vision tower")
    elif not s.vision_cache_gib:
        notes.append("vision cache: off (vision_cache_gib=0); every step runs the vision tower")
    elif sharded:
        notes.append(f"vision cache: off with --distributed={s.distributed} (no process holds the whole vision tower)")
    elif cache_gib > s.vision_cache_gib:
        notes.append(f"vision cache: off, the vision outputs of {len(samples)} images would take {cache_gib:.1f} GiB "
                     f"of RAM, more than vision_cache_gib={s.vision_cache_gib}; every step runs the vision tower")
    else:
        start = time.perf_counter()
        cache = VisionCache().fill(model, collator, samples, device, s.num_workers, show_progress)
        cache_s = time.perf_counter() - start
        notes.append(f"vision cache: the vision tower's output for {len(samples)} images, {cache_gib:.2f} GiB of RAM, "
                     f"computed in {cache_s:.0f} s and reused at every step")
        memory.free_cached()
    if s.fast:
        batches = AnswerBatches(collator, family.merge_size, cache.outputs if cache else None)
        loss = AnswerLoss(model, cache, logits_in_chunks=not sharded)
        probe_loss = loss
    else:  # the stock Trainer's batches and the model's own loss
        batches, loss = collator, None
        probe_loss = lambda model, batch: model(**batch).loss  # noqa: E731

    # --- the micro-batch
    # With zero3 or fsdp no GPU may hold the whole model, so there is nothing to probe with: the run starts with the
    # smallest footprint (1 sample per forward pass, checkpointing on) unless told otherwise.
    checkpointing = on_gpu and (s.gradient_checkpointing == "true" or (s.gradient_checkpointing == "auto" and sharded))
    micro_batch = s.micro_batch_size or (1 if on_gpu and sharded else per_device_batch)
    reserve = memory.optimizer_bytes(trainable_parameters)
    if on_gpu and sharded and not s.micro_batch_size:
        notes.append(f"memory: not probed with --distributed={s.distributed}; raise --micro_batch_size (and try "
                     "--gradient_checkpointing=false) while the GPUs have room to spare")
    elif on_gpu and not s.micro_batch_size:
        if checkpointing:
            enable_checkpointing(model)
        found = memory.largest_fitting_micro_batch(model, probe_loss, batches, longest_first, per_device_batch,
                                                   reserve, device, processes)
        if s.gradient_checkpointing == "auto" and (found or 0) < min(4, per_device_batch):
            checkpointing = True
            enable_checkpointing(model)
            found = memory.largest_fitting_micro_batch(model, probe_loss, batches, longest_first, per_device_batch,
                                                       reserve, device, processes)
        if found is None:
            free = torch.cuda.mem_get_info(device)[0] / 2**30
            raise SystemExit(f"Not even one sample of the longest kind fits in GPU memory ({free:.1f} GiB free) with "
                             "activation checkpointing. Lower --max_pixels, use a GPU with more memory, or with several "
                             "GPUs --distributed=fsdp to split the model over them.")
        micro_batch = found
        notes.append(f"memory: {found} of the longest samples ({max(lengths)} tokens) fit in a forward and backward "
                     f"pass, leaving {reserve / 2**30:.1f} GiB for the optimizer"
                     + ("; activation checkpointing on, fewer than 4 fit without it" if checkpointing
                        and s.gradient_checkpointing == "auto" else ""))
    if per_device_batch % micro_batch:
        raise SystemExit(f"micro_batch_size={micro_batch} must divide the per-GPU batch size {per_device_batch}.")

    # --- CUDA graphs
    unfit = "fast=false" if not s.fast else graphs.unfit_reason(
        processes.several, s.distributed, checkpointing, s.torch_compile, levels(model.config) > 1,
        bool(s.max_tokens_per_forward), family.name, outside_language_model and f"{outside_language_model} training")
    if s.cuda_graphs == "true" and unfit:
        raise SystemExit(f"--cuda_graphs=true does not work with {unfit}. Use --cuda_graphs=auto (on where it "
                         "works) or false.")
    step_graphs = None
    rows_longest_first = sorted(answer_rows, reverse=True)
    if not (s.cuda_graphs == "true" or (s.cuda_graphs == "auto" and on_gpu and not unfit)):
        if on_gpu:
            notes.append(f"CUDA graphs: off ({unfit or 'cuda_graphs=false'}); every step launches its kernels one "
                         "by one")
    elif not on_gpu:
        # The largest shape first, as on a GPU (below), so that batches of its length run in its padded rows
        step_graphs = graphs.StepGraphs(model, capture=False)
        step_graphs.step(batches(longest_first[:micro_batch]), 1.0, min_rows=sum(rows_longest_first[:micro_batch]))
        model.zero_grad(set_to_none=True)
        notes.append("CUDA graphs: no GPU, nothing to capture; the steps run padded, as the graphs would run them")
    else:
        step_graphs, micro_batch = capture_largest(model, batches, longest_first, rows_longest_first, micro_batch,
                                                   per_device_batch, s, reserve, device, notes)

    # --- the token budget
    # With one process and no graphs, the probe's answer (so many of the longest samples fit) becomes a budget of
    # tokens per forward pass, and only a batch over it is split: most batches are far shorter than the longest.
    if s.fast and not processes.several and not s.micro_batch_size and not step_graphs and \
            (s.max_tokens_per_forward or micro_batch < per_device_batch):
        batches.max_tokens = s.max_tokens_per_forward or micro_batch * max(lengths)
        micro_batch = per_device_batch
    accumulation = per_device_batch // micro_batch
    split = f" (a batch of over {batches.max_tokens:,} tokens is split)" if getattr(batches, "max_tokens", 0) else ""
    notes.append(f"batch: {s.batch_size} samples per optimizer step = {micro_batch} per forward pass{split} x "
                 f"{accumulation} accumulation x {processes.world_size} {'GPU(s)' if on_gpu else 'process(es)'}; "
                 f"activation checkpointing {'on' if checkpointing else 'off'}"
                 + (f"; {s.distributed}" if processes.several or s.distributed != "ddp" else ""))
    return Plan(micro_batch, accumulation, checkpointing, batches, loss, step_graphs, cache, cache_s, notes)


def capture_largest(model, batches, longest_first, rows_longest_first, micro_batch, per_device_batch, s: Settings,
                    reserve: int, device: str, notes: list):
    """The graphs of the largest micro-batch (the longest samples, room for the most labelled positions a batch can
    have) that leaves `reserve` bytes free. Graphs keep their memory, and padding costs some: that can be a smaller
    micro-batch than the probe's. Returns (graphs or None, micro-batch)."""
    limit = s.gpu_memory_gib * 2**30 if s.gpu_memory_gib else torch.cuda.get_device_properties(device).total_memory
    why_not = ""
    sizes = [micro_batch] if s.micro_batch_size else [d for d in memory.divisors_down(per_device_batch)
                                                       if d <= micro_batch]
    for size in sizes:
        step_graphs = graphs.StepGraphs(model, capture=True)
        largest = {k: v.to(device) for k, v in batches(longest_first[:size]).items()}
        step_graphs.step(largest, 1.0, min_rows=sum(rows_longest_first[:size]))
        model.zero_grad(set_to_none=True)
        largest = None
        memory.free_cached()
        room = memory.headroom(device, limit)
        if not step_graphs.failed and room >= reserve:
            smaller = f" ({why_not}: {size} per pass instead)" if why_not else ""
            notes.append(f"CUDA graphs: on{smaller}; the largest batch shape captured in {step_graphs.capture_s:.1f} s, "
                         "each other shape is captured at its first step, then replayed")
            return step_graphs, size
        why_not = step_graphs.failed or (f"a graph of {size} samples leaves {room / 2**30:.1f} GiB, the optimizer "
                                         f"needs {reserve / 2**30:.1f}")
        step_graphs.release(why_not)
    notes.append(f"CUDA graphs: off ({why_not}); every step launches its kernels one by one")
    return None, micro_batch
