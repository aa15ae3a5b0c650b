"""Fine-tune Qwen2-VL-2B-Instruct with LoRA into a LaTeX OCR model, then score it on the val set.

Reads:  latex_ocr_train.json, latex_ocr_val.json (written by csv2json.py)
Writes: output/Qwen2-VL-2B-LatexOCR/ with adapter_model.safetensors, adapter_config.json, the processor,
        train_config.json (the configuration this run used) and eval/ (val predictions and metrics);
        checkpoints in output/Qwen2-VL-2B-LatexOCR/checkpoint-*; SwanLab logs in ./swanlog
        train_results.json (speed, memory, the micro-batch size and checkpointing it chose)
Run:    python train.py                                          (a CUDA GPU with 12 GB or more)
        torchrun --nproc_per_node=4 train.py                     (4 GPUs, data parallel; see README "Several GPUs")
        python train.py --model_id=tiny-random --max_steps=20   (offline, CPU, a tiny random model)
"""

import contextlib
import gc
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.utils.checkpoint

from latexocr import chat
from latexocr.config import apply_overrides

# -----------------------------------------------------------------------------
MODEL_ID = "Qwen/Qwen2-VL-2B-Instruct"  # ModelScope id or local folder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); tiny-random
TRAIN_JSON_PATH = "latex_ocr_train.json"  # from csv2json.py
VAL_JSON_PATH = "latex_ocr_val.json"  # from csv2json.py; scored after training; "" = no scoring
OUTPUT_DIR = "output/Qwen2-VL-2B-LatexOCR"  # adapter, processor, config, checkpoints, eval results
PROMPT = chat.PROMPT  # the instruction after the image; infer.py reads it from train_config.json
MIN_PIXELS = 0  # px per image, lower bound; 0 = 32 image tokens (a token is 28x28 px, 32x32 on Qwen3-VL)
MAX_PIXELS = 0  # px per image, upper bound, aspect ratio kept; 0 = 512 image tokens
IMAGE_SIZE = ""  # "HxW" px to resize every image to exactly (the tutorial: 500x100); "" = MIN/MAX_PIXELS
LORA_RANK = 64
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
LORA_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # comma-separated; language model only
BATCH_SIZE = 16  # samples per optimizer step, over all GPUs (the tutorial's 4 x accumulation 4)
MICRO_BATCH_SIZE = 0  # samples per forward pass; 0 = the most that fit in GPU memory (probed before training)
MAX_TOKENS_PER_FORWARD = 0  # a batch with more (padded) tokens is split into forward passes; 0 = from the probe
LEARNING_RATE = 1e-4
LR_SCHEDULER_TYPE = "linear"  # linear (decay to 0) | constant | cosine | ...
NUM_TRAIN_EPOCHS = 2
MAX_STEPS = -1  # optimizer steps; -1 = run NUM_TRAIN_EPOCHS
GRADIENT_CHECKPOINTING = "auto"  # auto (only when memory is short) | true | false; GPU only
TORCH_COMPILE = False  # compile each language-model layer with torch.compile (fewer, fused kernels); GPU only
CUDA_GRAPHS = "auto"  # auto (one GPU, no checkpointing) | true | false: each step's forward and backward as one graph
VISION_CACHE_GIB = 8.0  # RAM for the frozen vision tower's outputs, computed once per image for all epochs; 0 = never
LOGGING_STEPS = 10  # optimizer steps between progress lines
SAVE_STEPS = 100  # optimizer steps between checkpoints
NUM_WORKERS = min(4, os.cpu_count() or 1)  # DataLoader processes that open and size images
SEED = 42
RESUME = True  # continue from the newest complete checkpoint in OUTPUT_DIR when the settings match
DEVICE = "auto"  # auto (CUDA if present) | cuda | cpu
GPU_MEMORY_GIB = 0.0  # use at most this much GPU memory (e.g. to act like a smaller card); 0 = all of it
DISTRIBUTED = "ddp"  # with several GPUs: ddp (a whole model per GPU) | zero2 | zero3 (DeepSpeed) | fsdp; see README
SWANLAB_MODE = "auto"  # auto (cloud if logged in, else local) | cloud | local | offline | disabled
SWANLAB_PROJECT = "Qwen2-VL-LatexOCR"
SWANLAB_EXPERIMENT = "qwen2-vl-2b-lora"
MAX_LENGTH = 2048  # tokens per sample (image + prompt + answer); longer samples stop the run before it starts
EVAL_BATCH_SIZE = 64  # images per generation batch
EVAL_MAX_NEW_TOKENS = 256  # generation cap per formula (real formulas: p95 ~112 tokens)
EVAL_PRECISION = "float32"  # float32 (as infer.py: a prediction does not depend on the batch size) | bfloat16
# -----------------------------------------------------------------------------
config = apply_overrides(globals())
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation, more fits

# --- setup -------------------------------------------------------------------
import transformers  # noqa: E402  (imported after the overrides so --help is instant)
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402
from peft.helpers import disable_input_dtype_casting  # noqa: E402
from transformers import AutoProcessor, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import ProgressCallback  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from latexocr import evaluate, families, modeling  # noqa: E402
from latexocr.data import atomic_write_text, image_problem, read_conversations  # noqa: E402

if DEVICE == "auto":
    DEVICE = modeling.default_device()
    if DEVICE == "cpu" and MODEL_ID not in modeling.TINY_MODELS:
        raise SystemExit(f"No CUDA GPU found. Training {MODEL_ID} on a CPU would take days.\n"
                         "To try the whole pipeline on this CPU, use the tiny random model:\n"
                         "  python train.py --model_id=tiny-random --max_steps=20\n"
                         "To train on the CPU anyway, pass --device=cpu.")
if DEVICE == "cuda" and not torch.cuda.is_available():
    raise SystemExit("--device=cuda, but torch sees no CUDA GPU. Check the driver, or use --device=cpu.")
on_gpu = DEVICE == "cuda"
# torchrun and accelerate launch start one process per GPU and tell each where it stands in these variables.
rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # this process's GPU on its machine
main_process = rank == 0  # the one process that prints, tracks, saves and scores
if not main_process:  # every process runs this script; rank 0 speaks for all, errors still reach stderr
    sys.stdout = open(os.devnull, "w")
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
if GRADIENT_CHECKPOINTING not in ("auto", "true", "false"):
    raise SystemExit(f"--gradient_checkpointing={GRADIENT_CHECKPOINTING}: expected auto, true or false.")
if CUDA_GRAPHS not in ("auto", "true", "false"):
    raise SystemExit(f"--cuda_graphs={CUDA_GRAPHS}: expected auto, true or false.")
if BATCH_SIZE % world_size:
    raise SystemExit(f"batch_size={BATCH_SIZE} (samples per optimizer step, over all processes) does not split evenly "
                     f"over {world_size} processes. Pass a multiple of {world_size}, e.g. "
                     f"--batch_size={max(world_size, BATCH_SIZE - BATCH_SIZE % world_size)}.")
if MAX_TOKENS_PER_FORWARD and (world_size > 1 or MICRO_BATCH_SIZE):
    raise SystemExit("--max_tokens_per_forward splits batches of one process that runs them whole otherwise: not with "
                     "several processes (each must run as many forward passes as the others) nor with "
                     "--micro_batch_size. Use one of the two.")
eval_dtype = modeling.generation_dtype(EVAL_PRECISION)
if DISTRIBUTED not in ("ddp", "zero2", "zero3", "fsdp"):
    raise SystemExit(f"--distributed={DISTRIBUTED}: expected ddp, zero2, zero3 or fsdp.")
if DISTRIBUTED.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
    raise SystemExit(f"--distributed={DISTRIBUTED} runs on DeepSpeed, which is optional and not installed:\n"
                     "  pip install deepspeed==0.19.8\n"
                     "Or use --distributed=fsdp (shards the model like zero3; nothing to install) or ddp.")
if DISTRIBUTED == "fsdp" and not on_gpu:  # DeepSpeed has a CPU backend (gloo), accelerate's FSDP has none
    raise SystemExit("--distributed=fsdp needs CUDA GPUs: accelerate applies FSDP only over GPUs (on a CPU it would "
                     "quietly train as ddp). Use --distributed=ddp, zero2 or zero3 on a CPU.")
if on_gpu and local_rank >= torch.cuda.device_count():
    raise SystemExit(f"process {rank} was given GPU {local_rank}, but this machine has {torch.cuda.device_count()}. "
                     "Start one process per GPU at most (torchrun --nproc_per_node, accelerate launch "
                     "--num_processes).")
sharded = DISTRIBUTED in ("zero3", "fsdp")  # the frozen weights too are split over the GPUs, none holds the whole model
transformers.set_seed(SEED)
if on_gpu:
    torch.cuda.set_device(local_rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)  # as modeling.fast_attention: a graph built per sequence length
    if GPU_MEMORY_GIB:
        total = torch.cuda.get_device_properties(local_rank).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, GPU_MEMORY_GIB / total), local_rank)
if world_size > 1:
    # Made here rather than by the Trainer (which takes it over), so that rank 0 can fetch the model first and
    # the memory probe can agree on one micro-batch for all processes.
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo",
                                         device_id=torch.device("cuda", local_rank) if on_gpu else None)


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (downloading the model, building the tiny one); the other processes then find
    the files in place instead of writing the same files at the same time."""
    if world_size > 1 and not main_process:
        torch.distributed.barrier()
    yield
    if world_size > 1 and main_process:
        torch.distributed.barrier()


def swanlab_mode(requested: str) -> str:
    """Cloud only with credentials, so a run never stops at a login prompt."""
    if requested != "auto":
        return requested
    credentials = [Path.cwd() / ".swanlab" / ".netrc",
                   Path(os.environ.get("SWANLAB_ROOT", Path.home() / ".swanlab")) / ".netrc"]
    if os.environ.get("SWANLAB_API_KEY") or any(p.is_file() for p in credentials):
        return "cloud"
    return "local"


# Settings that must match for a checkpoint to be continued; the rest (steps, logging) may change.
RESUME_KEYS = ("model_id", "train_json_path", "prompt", "min_pixels", "max_pixels", "image_size", "lora_rank",
               "lora_alpha", "lora_dropout", "lora_target_modules", "batch_size", "learning_rate",
               "lr_scheduler_type", "seed", "distributed")
# Where each DISTRIBUTED setting keeps the optimizer state in a checkpoint (DeepSpeed writes `latest` after its states).
OPTIMIZER_STATE = {"ddp": "optimizer.pt", "zero2": "latest", "zero3": "latest", "fsdp": "optimizer.bin"}


def is_whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint-N holding the Trainer's state (written last, in place), adapter and optimizer; a
    folder left by a crash lacks one of them, or holds half of the state, and is passed over."""
    needed = ("adapter_model.safetensors", OPTIMIZER_STATE[DISTRIBUTED])
    complete = [c for c in output_dir.glob("checkpoint-*") if c.name.split("-")[-1].isdigit() and all(
        (c / name).is_file() for name in needed) and is_whole_json(c / "trainer_state.json")]
    return max(complete, key=lambda c: int(c.name.split("-")[-1]), default=None)


def divisors_down(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


class VisionCache:
    """The frozen vision tower's output for every training image, computed once before training, in large
    batches, and handed to the model at every step in place of the pixels.

    LoRA adapts the language model only and the vision tower has no dropout, so an image's output is the same
    at every step of every epoch. Computed inside the step, it costs a third of the step's time: the tower
    runs one attention call per image per layer, and reads sizes back from the GPU at each layer.
    Kept in CPU memory: output tokens x hidden size x (1 + Qwen3-VL's deepstack levels) numbers per image."""

    def __init__(self):
        self.outputs = {}  # sample id -> (levels, image tokens, hidden): the output, then each deepstack level
        self.output_class = None

    def fill(self, model, collator, samples, device: str, batch_size: int = 32):
        """Run the vision tower over the samples' images (sized and preprocessed as for training)."""
        loader = torch.utils.data.DataLoader(samples, batch_size=batch_size, collate_fn=collator,
                                             num_workers=NUM_WORKERS)
        with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=on_gpu):
            for n, batch in enumerate(tqdm(loader, desc="vision cache", unit="batch", disable=not main_process)):
                output = model.get_base_model().get_image_features(
                    batch["pixel_values"].to(device), batch["image_grid_thw"].to(device), return_dict=True)
                levels = [output.pooler_output, *(getattr(output, "deepstack_features", None) or [])]
                for i, sample in enumerate(samples[n * batch_size:(n + 1) * batch_size]):
                    self.outputs[sample.id] = torch.stack([level[i] for level in levels]).cpu()
        self.output_class = type(output)

    def collate(self, samples, batch: dict[str, torch.Tensor]):
        """The batch's images as vision outputs instead of pixels, in the order of their tokens."""
        del batch["pixel_values"]
        batch["vision_outputs"] = torch.cat([self.outputs[s.id] for s in samples], dim=1)

    def encoder_outputs(self, vision_outputs: torch.Tensor) -> dict:
        """The model's mm_encoder_outputs argument: what its vision tower would have returned."""
        deepstack = {"deepstack_features": [(level,) for level in vision_outputs[1:]]} if len(vision_outputs) > 1 else {}
        return {"image": self.output_class(pooler_output=(vision_outputs[0],), **deepstack)}


class HeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy summed over rows of hidden states through a frozen head (weight), `chunk` rows at a time, with the
    rows' gradient made in the forward pass: (softmax(logits) - one-hot(target)) @ weight. So a chunk's logits exist
    once, and the head's product runs twice per row instead of three times (forward, the forward again for the
    backward, backward). Rows whose target is IGNORE_INDEX add nothing, to the loss or to the gradient."""

    @staticmethod
    def forward(ctx, rows, weight, targets, chunk: int):
        total, gradient = rows.new_zeros((), dtype=torch.float32), torch.empty_like(rows)
        for i in range(0, len(rows), chunk):
            # Under mixed precision accelerate hands the model's outputs back in fp32; the head computes as in the model.
            logits = torch.nn.functional.linear(rows[i:i + chunk].to(weight.dtype), weight).float()
            labelled = (targets[i:i + chunk] != chat.IGNORE_INDEX).unsqueeze(1)
            target = targets[i:i + chunk].clamp(min=0).unsqueeze(1)
            log_total = torch.logsumexp(logits, dim=1, keepdim=True)
            total += ((log_total - logits.gather(1, target)) * labelled).sum()
            probabilities = logits.sub_(log_total).exp_()
            probabilities.scatter_add_(1, target, -labelled.float()).mul_(labelled)
            gradient[i:i + chunk] = probabilities.to(weight.dtype) @ weight
        ctx.save_for_backward(gradient)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        gradient, = ctx.saved_tensors
        return gradient * grad_total.to(gradient.dtype), None, None, None


class AnswerLogits:
    """The language-model head applied only where a label is (the answer and its end token), and the loss there.

    The model's own loss builds logits at every position, (batch, length, 151,936) in fp32 and bf16 with
    their gradients: the largest tensors of a step, though only the answer's ~20% of positions have a label.
    Picking those positions before the head, and going through them 256 at a time (HeadCrossEntropy), gives the
    same loss: sum of token losses / labelled tokens.

    As the collator, it also computes on the CPU what the model would otherwise work out on the GPU, reading
    values back and stalling it each time: those positions, the rotary positions, and (with a VisionCache)
    the vision tower's output. With max_tokens set, a batch with more tokens (padding included) than that
    becomes several forward passes ("chunks") of similar lengths: the batch stays the same, and so does the
    loss, but a batch of long samples no longer decides the memory every batch is given."""

    ROWS_PER_CHUNK = 256  # labelled positions whose logits (151,936 each, fp32 with gradient) exist at once

    def __init__(self, model, collator, merge_size: int, vision_cache: VisionCache | None = None,
                 logits_in_chunks: bool = True):
        self.collator, self.merge_size, self.vision_cache, self.positions = collator, merge_size, vision_cache, None
        # With zero3 or fsdp the head's weight is whole only inside the model's forward: the logits are made there.
        self.logits_in_chunks, self.max_tokens = logits_in_chunks, 0
        self.head = model.get_output_embeddings()
        self.head_forward = self.head.forward
        self.head.forward = self.head_or_rows

    def __call__(self, samples) -> dict:
        examples = self.collator.encode(samples)
        groups = self.split(examples)
        if len(groups) == 1:
            return self.batch(samples, examples)
        chunks = [self.batch([samples[i] for i in group], [examples[i] for i in group]) for group in groups]
        # "labels" only for the Trainer, which counts the labelled tokens of a step before running it
        return {"chunks": chunks, "labels": torch.cat([chunk["labels"].flatten() for chunk in chunks])}

    def split(self, examples) -> list[list[int]]:
        """Sample indices per forward pass: all in one, or shortest first in passes of at most max_tokens."""
        lengths = [len(e["input_ids"]) for e in examples]
        if not self.max_tokens or len(lengths) * max(lengths) <= self.max_tokens:
            return [list(range(len(lengths)))]
        groups, group = [], []
        for i in sorted(range(len(lengths)), key=lengths.__getitem__):
            if group and (len(group) + 1) * lengths[i] > self.max_tokens:  # padded to the longest, lengths[i]
                groups.append(group)
                group = []
            group.append(i)
        return groups + [group]

    def batch(self, samples, examples) -> dict[str, torch.Tensor]:
        batch = self.collator.pad(examples)
        batch["position_ids"] = chat.rope_positions(batch, self.merge_size)
        if self.vision_cache is not None:
            self.vision_cache.collate(samples, batch)
        labels = batch["labels"]
        predicts_a_label = torch.zeros_like(labels, dtype=torch.bool)
        predicts_a_label[:, :-1] = labels[:, 1:] != chat.IGNORE_INDEX  # position i predicts token i + 1
        batch["answer_positions"] = predicts_a_label.flatten().nonzero().squeeze(1)  # in the flattened batch
        batch["answer_targets"] = labels.flatten()[batch["answer_positions"] + 1]
        return batch

    def head_or_rows(self, hidden):
        """The head's forward: logits everywhere (generation, evaluation), or during the loss only the hidden
        states of the labelled positions, for the loss to turn into logits chunk by chunk."""
        if self.positions is None:
            return self.head_forward(hidden)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.positions)
        return rows if self.logits_in_chunks else self.head_forward(rows)

    def chunk_loss(self, hidden, targets):
        # Under mixed precision accelerate hands the model's outputs back in fp32; the head computes as in the model.
        logits = self.head_forward(hidden.to(self.head.weight.dtype))
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")

    def loss(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """Cross-entropy summed over the labelled tokens, divided by the labelled tokens of the whole optimizer step
        (num_items_in_batch, as the Trainer counts them) or of this batch."""
        # Batches are right-padded: with causal attention alone no real token sees the padding, and the attention runs
        # the Flash kernel, which takes no mask (and padded positions carry no label).
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", "attention_mask")}
        self.positions, targets = inputs.pop("answer_positions"), inputs.pop("answer_targets")
        if "vision_outputs" in inputs:
            inputs["mm_encoder_outputs"] = self.vision_cache.encoder_outputs(inputs.pop("vision_outputs"))
        try:
            output = model(**inputs).logits  # the labelled positions' hidden states or logits, see head_or_rows
        finally:
            self.positions = None
        if not self.logits_in_chunks:
            total = torch.nn.functional.cross_entropy(output.float(), targets, reduction="sum")
        else:
            total = self.summed_loss(output, targets)
        return total / (num_items_in_batch if num_items_in_batch is not None else len(targets))

    def summed_loss(self, rows, targets) -> torch.Tensor:
        """Cross-entropy summed over labelled rows (hidden states), through the head ROWS_PER_CHUNK rows at a time.
        A head that trains (LoRA on lm_head) goes through its own forward, each chunk's logits recomputed for the
        backward: the chunks draw no random numbers, so the checkpoint need not save the RNG state (nor can it, in a
        CUDA graph)."""
        if type(self.head) is torch.nn.Linear and not self.head.weight.requires_grad and self.head.bias is None:
            return HeadCrossEntropy.apply(rows, self.head.weight, targets, self.ROWS_PER_CHUNK)
        return sum(torch.utils.checkpoint.checkpoint(self.chunk_loss, rows[i:i + self.ROWS_PER_CHUNK],
                                                     targets[i:i + self.ROWS_PER_CHUNK], use_reentrant=False,
                                                     preserve_rng_state=False)
                   for i in range(0, len(targets), self.ROWS_PER_CHUNK))


class StepGraphs:
    """A step's language-model forward, loss and backward, captured once per batch shape as a CUDA graph and then
    replayed: one launch from the CPU instead of about 7,000. Run eagerly, a step is paced by the CPU launching
    kernels one at a time from Python, and the GPU waits for it more than half of the step.

    A graph replays fixed shapes at fixed addresses. So each batch is copied into buffers kept for its shape: its
    length padded to a multiple of LENGTH_MULTIPLE (after its own padding, which attention needs no mask for) and
    its labelled positions to a multiple of ROWS_MULTIPLE, or to the rows of a shape of the same batch and length
    already seen with more of them (the padded ones carry no target). Loss and gradients stay those of the batch.
    Outside the graph, eagerly, run what reads sizes back from the GPU (the embedding lookup, placing the image
    features, the vision tower when it is not cached) and the optimizer. The gradients are added into one buffer
    per LoRA weight, which the optimizer reads as the weights' .grad.
    A shape seen for the first time is captured, then replayed. The largest is captured before training (capture
    first): its memory, freed inside the graphs' shared pool, then holds every smaller shape's graph.
    Without a GPU nothing is captured and the same padded steps run directly, which is how the tests check them."""

    LENGTH_MULTIPLE = 32  # tokens; larger means fewer graphs, more padding
    ROWS_MULTIPLE = 2 * AnswerLogits.ROWS_PER_CHUNK  # labelled positions

    def __init__(self, model, answer_logits: AnswerLogits, capture: bool):
        self.answer_logits, self.capture = answer_logits, capture
        self.base = model.get_base_model()
        self.language_model, self.image_token_id = self.base.model.language_model, self.base.config.image_token_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.shapes = {}  # (batch, length, rows) -> [buffers, graph, loss]; graph None when run without one
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # shared: one shape's graph runs at a time
        self.warm_up_stream = torch.cuda.Stream() if capture else None
        self.captures, self.capture_s, self.failed = 0, 0.0, ""

    def accepts(self, inputs) -> bool:
        return not self.failed and "chunks" not in inputs

    def embeddings(self, inputs) -> torch.Tensor:
        """The language model's input: token embeddings with the image features in place of the image tokens."""
        with torch.no_grad(), torch.autocast(inputs["input_ids"].device.type, dtype=torch.bfloat16, enabled=on_gpu):
            embeds = self.base.get_input_embeddings()(inputs["input_ids"])
            if "vision_outputs" in inputs:
                image = inputs["vision_outputs"][0]
            else:
                image = torch.cat(self.base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                          return_dict=True).pooler_output)
            placeholders = (inputs["input_ids"] == self.image_token_id).unsqueeze(-1)
            return embeds.masked_scatter(placeholders, image.to(embeds.dtype))

    def body(self, buffers: dict) -> torch.Tensor:
        """What the graph holds: the forward with the loss, and the backward into the gradient buffers."""
        with torch.autocast(buffers["embeds"].device.type, dtype=torch.bfloat16, enabled=on_gpu, cache_enabled=False):
            hidden = self.language_model(inputs_embeds=buffers["embeds"], position_ids=buffers["position_ids"],
                                         use_cache=False).last_hidden_state  # no mask: see AnswerLogits.loss
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, buffers["positions"])
            loss = self.answer_logits.summed_loss(rows, buffers["targets"]) / buffers["denominator"]
        loss.backward()
        return loss.detach()

    def fill(self, buffers: dict, inputs, embeds: torch.Tensor, denominator):
        length, padded = inputs["input_ids"].shape[1], buffers["embeds"].shape[1]
        buffers["embeds"][:, :length].copy_(embeds)
        buffers["embeds"][:, length:].zero_()
        buffers["position_ids"][..., :length].copy_(inputs["position_ids"])
        buffers["position_ids"][..., length:].zero_()
        positions, rows = inputs["answer_positions"], len(inputs["answer_positions"])
        buffers["positions"][:rows].copy_(positions + positions // length * (padded - length))  # into the padded rows
        buffers["positions"][rows:].zero_()
        buffers["targets"][:rows].copy_(inputs["answer_targets"])
        buffers["targets"][rows:].fill_(chat.IGNORE_INDEX)
        if isinstance(denominator, torch.Tensor) and denominator.device == buffers["denominator"].device:
            buffers["denominator"].copy_(denominator)
        else:  # a number (or one on the CPU): filled in as a kernel argument, with no copy to wait for
            buffers["denominator"].fill_(float(denominator))

    def new_buffers(self, length: int, rows: int, embeds: torch.Tensor) -> dict:
        batch, device = len(embeds), embeds.device
        return dict(embeds=embeds.new_zeros(batch, length, embeds.shape[-1]),
                    position_ids=torch.zeros(3, batch, length, dtype=torch.long, device=device),
                    positions=torch.zeros(rows, dtype=torch.long, device=device),
                    targets=torch.full((rows,), chat.IGNORE_INDEX, dtype=torch.long, device=device),
                    denominator=torch.ones((), device=device))

    def attach_gradients(self):
        """Point every trainable weight's .grad at its buffer: zeroed for a new step (the Trainer set them to None
        after the last optimizer step), or holding what earlier micro-batches of this step added."""
        fresh = [buffer for p, buffer in zip(self.params, self.grads) if p.grad is None]
        moved = [(buffer, p.grad) for p, buffer in zip(self.params, self.grads)
                 if p.grad is not None and p.grad is not buffer]
        if fresh:
            torch._foreach_zero_(fresh)
        if moved:
            torch._foreach_copy_(*map(list, zip(*moved)))
        for p, buffer in zip(self.params, self.grads):
            p.grad = buffer

    def captured(self, buffers: dict):
        """A graph of body() on these buffers, or None (and eager steps from then on) when it cannot be captured.

        Before the first capture one eager run on a side stream sets up what is set up lazily (cuBLAS workspaces,
        kernel choices); later shapes need none, and skipping it keeps that run's memory from sitting, cached for
        the side stream, next to the graphs' memory."""
        torch.cuda.synchronize()  # the GPU's queued work is no part of the capture (torch.cuda.graph waits for it too)
        start = time.perf_counter()
        if not self.captures:
            kept = [p.grad for p in self.params]
            for p in self.params:  # the warm-up's gradients are thrown away
                p.grad = None
            self.warm_up_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.warm_up_stream):
                self.body(buffers)
            torch.cuda.current_stream().wait_stream(self.warm_up_stream)
            for p, grad in zip(self.params, kept):
                p.grad = grad
        self.attach_gradients()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the DataLoader's pin-memory thread keeps calling CUDA while this thread captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                loss = self.body(buffers)
        except RuntimeError as error:  # out of memory, or an operation a graph cannot hold
            failure = str(error).splitlines()[0]
        else:
            self.captures, self.capture_s = self.captures + 1, self.capture_s + time.perf_counter() - start
            return graph, loss
        # Out here, not in the except block, whose traceback would keep the graphs' memory referenced.
        self.release(failure)
        return None

    def release(self, failure: str):
        """Graphs off for the rest of the run, their memory handed back for the eager steps."""
        self.failed = failure
        self.shapes.clear()
        gc.collect()
        torch.cuda.empty_cache()

    def step(self, inputs, denominator, min_rows: int = 0) -> torch.Tensor | None:
        """Forward, loss (divided by `denominator`) and backward of one batch; returns the loss, or None when the
        batch could not be captured (the caller runs it eagerly). min_rows: labelled positions to make room for."""
        embeds = self.embeddings(inputs)
        length = -(-embeds.shape[1] // self.LENGTH_MULTIPLE) * self.LENGTH_MULTIPLE
        rows = -(-max(len(inputs["answer_positions"]), min_rows) // self.ROWS_MULTIPLE) * self.ROWS_MULTIPLE
        shape = (len(embeds), length, rows)
        if shape not in self.shapes:
            roomier = [s for s in self.shapes if s[:2] == shape[:2] and s[2] > rows]
            if roomier:  # its padded rows cost about 1 ms per 512; a capture, 200 ms
                shape = min(roomier)
            else:
                self.shapes[shape] = [self.new_buffers(length, rows, embeds), None, None]
        entry = self.shapes[shape]
        self.fill(entry[0], inputs, embeds, denominator)
        if self.capture and entry[1] is None:
            graph = self.captured(entry[0])
            if graph is None:
                return None
            entry[1:] = graph
        self.attach_gradients()
        if entry[1] is None:
            return self.body(entry[0])
        entry[1].replay()
        return entry[2].clone()


class AnswerLossTrainer(Trainer):
    """The Trainer with AnswerLogits' loss; scaled for accumulation and processes as the model's own loss is."""

    def __init__(self, *args, answer_logits: AnswerLogits, step_graphs: StepGraphs | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_logits, self.step_graphs, self.loss_is_scaled_for_ga = answer_logits, step_graphs, True
        self.split_batches = 0  # batches that ran as several forward passes (AnswerLogits.max_tokens)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A batch StepGraphs takes runs there, as compute_loss and the backward would run it. A batch split by
        AnswerLogits runs as several forward and backward passes; their losses, each divided by the step's
        labelled tokens, add up to the whole batch's loss, and so do their gradients."""
        if self.step_graphs is not None and self.step_graphs.accepts(inputs):
            model.train()
            inputs = self._prepare_inputs(inputs)
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
        loss = self.answer_logits.loss(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:
            loss = loss / self.current_gradient_accumulation_steps
        elif self.args.average_tokens_across_devices:  # num_items_in_batch counts every process's tokens
            loss = loss * self.accelerator.num_processes
        return loss


def fits_in_memory(model, answer_logits: AnswerLogits, samples, reserve_bytes: int, device: str) -> bool:
    """Whether a forward and backward on these samples fit in GPU memory with reserve_bytes left over."""
    batch = {k: v.to(device) for k, v in answer_logits(samples).items()}
    try:
        reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            answer_logits.loss(model, batch).backward()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        batch = reserve = None  # dropped before empty_cache, so their memory goes back too
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()


def largest_fitting_micro_batch(model, answer_logits: AnswerLogits, longest, per_device_batch: int,
                                reserve_bytes: int, device: str) -> int | None:
    """The largest micro-batch (a divisor of the per-GPU batch, so accumulation keeps the batch size) whose
    forward and backward on the longest samples (`longest`, longest first) fit in GPU memory, leaving
    reserve_bytes for the optimizer state; None when not even one sample fits.

    With several processes it is the smallest any of them found: every process must use the same one, or
    with different gradient accumulation they would synchronise gradients at different forward passes."""
    micro = next((m for m in divisors_down(per_device_batch)
                  if fits_in_memory(model, answer_logits, longest[:m], reserve_bytes, device)), None)
    if world_size == 1:
        return micro
    smallest = torch.tensor(micro or 0, device=device)
    torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
    return int(smallest) or None


class ProgressLine(ProgressCallback):
    """The progress bar, plus one compact line per logging interval instead of a dict dump."""

    def __init__(self, step_graphs: StepGraphs | None):
        super().__init__()
        self.step_graphs = step_graphs

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.last_time, self.last_step = time.perf_counter(), state.global_step
        self.step_ends = []  # wall-clock time at the end of each optimizer step, for steady-state speed
        self.capture_s = []  # the graphs' capture time so far, at the end of each step

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
        memory = f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if on_gpu else ""
        tqdm.write(f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
                   f"grad_norm {logs.get('grad_norm', float('nan')):.3f} | lr {logs.get('learning_rate', 0):.2e} | "
                   f"{speed:.1f} samples/s{memory}")


# --- data --------------------------------------------------------------------
train_samples = read_conversations(TRAIN_JSON_PATH)
val_samples = read_conversations(VAL_JSON_PATH) if VAL_JSON_PATH else []
if not train_samples:
    raise SystemExit(f"{TRAIN_JSON_PATH} has no samples. Run data2csv.py and csv2json.py first.")
print(f"data: {len(train_samples)} training samples from {TRAIN_JSON_PATH}, "
      f"{len(val_samples)} val samples from {VAL_JSON_PATH}")

# --- pre-flight ----------------------------------------------------------------
# Every image opens and every sample fits, checked before any weights are loaded or GPU time is spent.
with main_process_first():
    model_dir = modeling.resolve_model(MODEL_ID)
family = families.detect(model_dir)  # the px per image token, and where the vision tower is
# Pixel bounds are recorded as used, so that infer.py and a resumed run size images the same way.
MIN_PIXELS = config["min_pixels"] = MIN_PIXELS or chat.MIN_IMAGE_TOKENS * family.token_px ** 2
MAX_PIXELS = config["max_pixels"] = MAX_PIXELS or chat.MAX_IMAGE_TOKENS * family.token_px ** 2
image_sizing = chat.sizing(MIN_PIXELS, MAX_PIXELS, IMAGE_SIZE, family.token_px)
processor = AutoProcessor.from_pretrained(model_dir)
one_token = chat.sizing(image_size=f"{family.token_px}x{family.token_px}", token_px=family.token_px)
blank = chat.load_image(Image.new("RGB", (family.token_px, family.token_px), "white"), one_token)
prompt_tokens = len(chat.encode_prompts(processor, [blank], PROMPT)["input_ids"][0]) - 1  # less the 1 image token
answer_tokens = processor.tokenizer([s.text for s in train_samples + val_samples], add_special_tokens=False)
lengths, image_token_counts, problems = [], [], []
for sample, answer in zip(tqdm(train_samples + val_samples, desc="pre-flight", unit="sample",
                               disable=not main_process), answer_tokens["input_ids"]):
    problem = image_problem(sample.image)
    if problem:
        problems.append(f"record {sample.id}: {problem}: {sample.image}")
        continue
    with Image.open(sample.image) as image:
        image_token_counts.append(chat.image_tokens(*image.size, image_sizing))
    length = prompt_tokens + image_token_counts[-1] + len(answer) + 1
    lengths.append(length)
    if length > MAX_LENGTH:
        problems.append(f"record {sample.id}: {length} tokens, more than max_length={MAX_LENGTH} "
                        f"(answer of {len(answer)} tokens, image {sample.image})")
if problems:
    sources = TRAIN_JSON_PATH + (f" and {VAL_JSON_PATH}" if VAL_JSON_PATH else "")
    raise SystemExit(f"{len(problems)} sample(s) in {sources} cannot be used:\n  "
                     + "\n  ".join(problems[:10]) + "\nFix or remove them (csv2json.py skips such rows), "
                     "or raise --max_length / lower --max_pixels.")
longest_first = [s for _, s in sorted(zip(lengths, train_samples), key=lambda pair: -pair[0])]
edges = [0, 64, 128, 256, 512, 1024, MAX_LENGTH + 1]
counts = [sum(lo <= n < hi for n in lengths) for lo, hi in zip(edges, edges[1:])]
print("sample length (tokens): " + ", ".join(f"{lo}-{hi - 1}: {c}" for lo, hi, c in zip(edges, edges[1:], counts) if c)
      + f"; longest {max(lengths)}")

# Checkpoints of other settings are refused here, before the weights load, not minutes later.
checkpoint = last_complete_checkpoint(Path(OUTPUT_DIR)) if RESUME else None
if world_size > 1:  # every process must continue from the same step
    seen = [None] * world_size
    torch.distributed.all_gather_object(seen, checkpoint)
    if len(set(seen)) > 1:
        found = ", ".join(sorted(map(str, set(seen))))
        raise SystemExit(f"the processes find different checkpoints in {OUTPUT_DIR} ({found}): to resume over "
                         "several machines, OUTPUT_DIR must be a folder they all share. Or pass --resume=false.")
finished = False  # the checkpoint is this run's last step: the same command run again
if checkpoint:
    previous = json.loads((Path(OUTPUT_DIR) / "train_config.json").read_text())
    changed = [f"{k}: {previous.get(k)!r} -> {config[k]!r}" for k in RESUME_KEYS if previous.get(k) != config[k]]
    if changed:
        raise SystemExit(f"{OUTPUT_DIR} holds checkpoints of a run with other settings ({'; '.join(changed)}). "
                         "Use another --output_dir, or --resume=false to start over there.")
    # The Trainer, resumed at its last step, would run one step more; the steps planned are known when MAX_STEPS
    # is given, or when the epochs are the checkpointed run's (same data and batch size, checked above).
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    same_plan = previous.get("max_steps") == MAX_STEPS and previous.get("num_train_epochs") == NUM_TRAIN_EPOCHS
    planned = MAX_STEPS if MAX_STEPS > 0 else state["max_steps"] if same_plan else None
    finished = planned is not None and state["global_step"] >= planned
    print(f"resuming from {checkpoint} (step {checkpoint.name.split('-')[-1]}); --resume=false starts over")

# --- model -------------------------------------------------------------------
model, processor = modeling.load_base_model(model_dir, DEVICE, place=False)
lora = LoraConfig(task_type="CAUSAL_LM", r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                  target_modules=[m.strip() for m in LORA_TARGET_MODULES.split(",") if m.strip()],
                  exclude_modules=families.LORA_EXCLUDE_MODULES)
transformers.set_seed(SEED)  # here, so that nothing before (building the tiny model, say) shifts the LoRA init
model = get_peft_model(model, lora)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
# torch.compile fuses the MLP itself (and is not asked to trace Liger's Triton kernel); ZeRO-3: see the function
fused = modeling.fuse_language_model(model, mlp=not TORCH_COMPILE, lora=DISTRIBUTED != "zero3")
optimizer_bytes = 2 * 4 * trainable + 2**29  # GPU memory kept free: AdamW's two fp32 moments, and 0.5 GiB of slack
total = sum(p.numel() for p in model.parameters())
print(f"model: {MODEL_ID} ({family.name}) from {model_dir}; LoRA r={LORA_RANK} trains {trainable:,} of "
      f"{total:,} parameters ({100 * trainable / total:.2f}%) on {DEVICE}")
if TORCH_COMPILE and on_gpu:
    # Layer by layer: the layers share one compiled graph, and the vision tower's per-image Python stays eager.
    for layer in model.get_base_model().model.language_model.layers:
        layer.compile(dynamic=True)
    print("torch.compile: each language-model layer (compiling takes a minute at the first steps)")

# The configuration this run uses: saved next to the adapter, logged to SwanLab, read back by infer.py.
run_config = dict(config, device=DEVICE, model_dir=str(model_dir), train_samples=len(train_samples),
                  val_samples=len(val_samples), trainable_parameters=trainable,
                  family=family.record(), image_sizing=image_sizing,
                  versions=dict(python=platform.python_version(), torch=torch.__version__,
                                transformers=transformers.__version__,
                                peft=__import__("peft").__version__))

# --- vision cache --------------------------------------------------------------
local_device = f"cuda:{local_rank}" if on_gpu else "cpu"
if on_gpu and not sharded:
    model.to(local_device)
collator = chat.TrainCollator(processor, PROMPT, image_sizing)
text_config = model.config.get_text_config()
levels = 1 + len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or [])
cache_gib = sum(image_token_counts[:len(train_samples)]) * levels * text_config.hidden_size * \
    (2 if on_gpu else 4) / 2**30
vision_cache, vision_cache_s = None, 0.0
if finished:
    print("vision cache: not needed, nothing is left to train")
elif not VISION_CACHE_GIB:
    print("vision cache: off (vision_cache_gib=0); every step runs the vision tower")
elif sharded:
    print(f"vision cache: off with --distributed={DISTRIBUTED} (no process holds the whole vision tower)")
elif cache_gib > VISION_CACHE_GIB:
    print(f"vision cache: off, the vision outputs of {len(train_samples)} images would take {cache_gib:.1f} GiB of RAM, "
          f"more than vision_cache_gib={VISION_CACHE_GIB}; every step runs the vision tower")
else:
    start = time.perf_counter()
    vision_cache = VisionCache()
    vision_cache.fill(model, collator, train_samples, local_device)
    vision_cache_s = time.perf_counter() - start
    print(f"vision cache: the vision tower's output for {len(train_samples)} images, {cache_gib:.2f} GiB of RAM, "
          f"computed in {vision_cache_s:.0f} s and reused at every step")
    if on_gpu:
        torch.cuda.empty_cache()
answer_logits = AnswerLogits(model, collator, family.merge_size, vision_cache, logits_in_chunks=not sharded)

# --- memory ------------------------------------------------------------------
# The largest micro-batch that fits, without activation checkpointing when possible: checkpointing
# recomputes every layer's forward (a third more compute), small micro-batches leave the GPU idle.
# With zero3 or fsdp no GPU may hold the whole model, so there is nothing to probe with: the run starts
# with the smallest footprint (1 sample per forward pass, checkpointing on) unless told otherwise.
per_device_batch = BATCH_SIZE // world_size
checkpointing = on_gpu and (GRADIENT_CHECKPOINTING == "true" or (GRADIENT_CHECKPOINTING == "auto" and sharded))
micro_batch = MICRO_BATCH_SIZE or (1 if on_gpu and sharded else per_device_batch)
if on_gpu and sharded and not MICRO_BATCH_SIZE:
    print(f"memory: not probed with --distributed={DISTRIBUTED}; raise --micro_batch_size (and try "
          "--gradient_checkpointing=false) while the GPUs have room to spare")
if on_gpu and not MICRO_BATCH_SIZE and not sharded and not finished:
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    micro_batch = largest_fitting_micro_batch(model, answer_logits, longest_first, per_device_batch,
                                                  optimizer_bytes, local_device)
    if GRADIENT_CHECKPOINTING == "auto" and (micro_batch or 0) < min(4, per_device_batch):
        checkpointing = True
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        micro_batch = largest_fitting_micro_batch(model, answer_logits, longest_first, per_device_batch,
                                                  optimizer_bytes, local_device)
    if micro_batch is None:
        free = torch.cuda.mem_get_info(local_device)[0] / 2**30
        raise SystemExit(f"Not even one sample of the longest kind fits in GPU memory ({free:.1f} GiB free) with "
                         "activation checkpointing. Lower --max_pixels, use a GPU with more memory, or with several "
                         "GPUs --distributed=fsdp to split the model over them.")
if per_device_batch % micro_batch:
    raise SystemExit(f"micro_batch_size={micro_batch} must divide the per-GPU batch size {per_device_batch}.")

# --- CUDA graphs -----------------------------------------------------------------
# Settings a graph cannot hold: collective calls inside the backward (several processes), DeepSpeed's or FSDP's own
# backward, the recomputed forward of checkpointing (it saves and restores the RNG state), code torch.compile
# manages, Qwen3-VL's deepstack features (added inside the language model), batches split into passes of any size.
graphs_unfit = ("several processes" if world_size > 1 else f"--distributed={DISTRIBUTED}" if DISTRIBUTED != "ddp"
                else "activation checkpointing" if checkpointing else "--torch_compile" if TORCH_COMPILE
                else f"{family.name}" if levels > 1 else "--max_tokens_per_forward" if MAX_TOKENS_PER_FORWARD else "")
if CUDA_GRAPHS == "true" and graphs_unfit:
    raise SystemExit(f"--cuda_graphs=true does not work with {graphs_unfit}. Use --cuda_graphs=auto (on where it "
                     "works) or false.")
step_graphs = None
answer_rows = sorted((len(a) + 1 for a in answer_tokens["input_ids"][:len(train_samples)]), reverse=True)
if finished or not (CUDA_GRAPHS == "true" or (CUDA_GRAPHS == "auto" and on_gpu and not graphs_unfit)):
    if on_gpu and not finished:
        print(f"CUDA graphs: off ({graphs_unfit or 'cuda_graphs=false'}); every step launches its kernels one by one")
elif not on_gpu:
    # The largest shape first, as on a GPU (below), so that batches of its length run in its padded rows
    step_graphs = StepGraphs(model, answer_logits, capture=False)
    step_graphs.step(answer_logits(longest_first[:micro_batch]), 1.0, min_rows=sum(answer_rows[:micro_batch]))
    model.zero_grad(set_to_none=True)
    print("CUDA graphs: no GPU, nothing to capture; the steps run padded, as the graphs would run them")
else:
    # The largest shape first (the longest samples, room for the most labelled positions a batch can have), for the
    # largest micro-batch whose graphs leave optimizer_bytes free (AdamW's moments are made at the first step).
    # Graphs keep their memory, and padding costs some: that can be a smaller micro-batch than the probe's.
    limit = GPU_MEMORY_GIB * 2**30 if GPU_MEMORY_GIB else torch.cuda.get_device_properties(local_device).total_memory
    why_not = ""
    for size in [micro_batch] if MICRO_BATCH_SIZE else [d for d in divisors_down(per_device_batch) if d <= micro_batch]:
        step_graphs = StepGraphs(model, answer_logits, capture=True)
        largest = {k: v.to(local_device) for k, v in answer_logits(longest_first[:size]).items()}
        step_graphs.step(largest, 1.0, min_rows=sum(answer_rows[:size]))
        model.zero_grad(set_to_none=True)
        largest = None
        torch.cuda.empty_cache()
        headroom = min(limit - torch.cuda.memory_reserved(local_device), torch.cuda.mem_get_info(local_device)[0])
        if not step_graphs.failed and headroom >= optimizer_bytes:
            micro_batch = size
            break
        why_not = step_graphs.failed or (f"a graph of {size} samples leaves {headroom / 2**30:.1f} GiB, the optimizer "
                                         f"needs {optimizer_bytes / 2**30:.1f}")
        step_graphs.release(why_not)
        step_graphs = None
        gc.collect()
        torch.cuda.empty_cache()
    if step_graphs:
        smaller = f" ({why_not}: {micro_batch} per pass instead)" if why_not else ""
        print(f"CUDA graphs: on{smaller}; the largest batch shape captured in {step_graphs.capture_s:.1f} s, each "
              "other shape is captured at its first step, then replayed")
    else:
        print(f"CUDA graphs: off ({why_not}); every step launches its kernels one by one")

# With one process and no graphs, the probe's answer (so many of the longest samples fit) becomes a budget of tokens
# per forward pass, and only a batch over it is split: most batches are far shorter than the longest samples.
if world_size == 1 and not MICRO_BATCH_SIZE and not step_graphs and (MAX_TOKENS_PER_FORWARD or
                                                                     micro_batch < per_device_batch):
    answer_logits.max_tokens = MAX_TOKENS_PER_FORWARD or micro_batch * max(lengths[:len(train_samples)])
    micro_batch = per_device_batch
accumulation = per_device_batch // micro_batch
split = f" (a batch of over {answer_logits.max_tokens:,} tokens is split)" if answer_logits.max_tokens else ""
print(f"batch: {BATCH_SIZE} samples per optimizer step = {micro_batch} per forward pass{split} x {accumulation} "
      f"accumulation x {world_size} {'GPU(s)' if on_gpu else 'process(es)'}; "
      f"activation checkpointing {'on' if checkpointing else 'off'}"
      + (f"; {DISTRIBUTED}" if world_size > 1 or DISTRIBUTED != "ddp" else ""))

# --- train -------------------------------------------------------------------
callbacks = []
tracking = swanlab_mode(SWANLAB_MODE)
if tracking != "disabled" and main_process:
    from swanlab.integration.transformers import SwanLabCallback
    swanlab_callback = SwanLabCallback(project=SWANLAB_PROJECT, experiment_name=SWANLAB_EXPERIMENT, mode=tracking)
    swanlab_callback.update_config(run_config)
    callbacks.append(swanlab_callback)
    if tracking == "local":
        print("SwanLab: no login found, logging locally to ./swanlog. View with `swanlab watch ./swanlog` "
              "(pip install 'swanlab[dashboard]'); log in with `swanlab login` for the cloud.")
    else:
        print(f"SwanLab: mode {tracking}, project {SWANLAB_PROJECT}")

fsdp = DISTRIBUTED == "fsdp"
args = TrainingArguments(
    output_dir=OUTPUT_DIR, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
    learning_rate=LEARNING_RATE, lr_scheduler_type=LR_SCHEDULER_TYPE, num_train_epochs=NUM_TRAIN_EPOCHS,
    max_steps=MAX_STEPS, logging_steps=LOGGING_STEPS, logging_first_step=True, save_steps=SAVE_STEPS,
    save_total_limit=2, seed=SEED, data_seed=SEED, bf16=on_gpu, use_cpu=not on_gpu,
    optim="adamw_torch_fused" if on_gpu else "adamw_torch", activation_checkpointing=checkpointing and not fsdp,
    activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing and not fsdp else None,
    dataloader_num_workers=NUM_WORKERS, dataloader_persistent_workers=NUM_WORKERS > 0,
    dataloader_pin_memory=on_gpu, remove_unused_columns=False, report_to="none",
    # Batches go to the GPU while it still works on the previous one; a blocking copy would wait for it to finish.
    accelerator_config={"non_blocking": on_gpu},
    logging_nan_inf_filter=False,  # the filter reads the loss every micro-batch: a GPU sync that stalls the queue
    # Several processes: the loss of a step is the mean over the answer tokens of all its samples on all GPUs
    # (each GPU divides its token sum by the all-reduced token count), so it equals one process with the same batch.
    average_tokens_across_devices=True,
    ddp_find_unused_parameters=False,  # every LoRA weight is used in every forward; True costs a graph walk per step
    deepspeed=str(Path(__file__).resolve().parent / "configs" / f"{DISTRIBUTED}.json")
    if DISTRIBUTED in ("zero2", "zero3") else None,
    # FSDP2 shards each decoder and vision block (the model's _no_split_modules); the full state dict at saving
    # is what lets the Trainer write the adapter as safetensors; FSDP's own checkpointing saves an all-gather.
    fsdp=fsdp, fsdp_config=dict(version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP", state_dict_type="FULL_STATE_DICT",
                                activation_checkpointing=checkpointing) if fsdp else None)
trainer = AnswerLossTrainer(model=model, args=args, train_dataset=train_samples, data_collator=answer_logits,
                            callbacks=callbacks, answer_logits=answer_logits, step_graphs=step_graphs)
trainer.remove_callback(ProgressCallback)
progress = ProgressLine(step_graphs)
trainer.add_callback(progress)
if on_gpu:
    torch.cuda.reset_peak_memory_stats()
if main_process:
    Path(OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(OUTPUT_DIR) / "train_config.json", json.dumps(run_config, indent=1) + "\n")
# peft casts each LoRA input to the adapter's fp32; under bf16 autocast that is two full copies of every
# activation per adapted layer. Without the cast the adapter math runs in bf16, its weights stay fp32.
if finished:  # the adapter as the checkpoint holds it, saved and scored again below
    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
else:
    with disable_input_dtype_casting(model):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
if step_graphs:  # their memory and the gradient buffers go back before evaluation generates
    model.zero_grad(set_to_none=True)
    step_graphs.grads.clear()
    step_graphs.release("training is over")
for module in fused:  # evaluation runs the model's own code, as infer.py does
    del module.forward

# --- save --------------------------------------------------------------------
if finished:  # no Trainer ran (nor prepared DeepSpeed or FSDP): the model is the plain one
    if main_process:
        model.save_pretrained(OUTPUT_DIR)
else:
    trainer.save_model(OUTPUT_DIR)  # the adapter only, as safetensors; every process takes part, rank 0 writes
if world_size > 1:
    torch.distributed.destroy_process_group()  # the work that needs all processes ends here; rank 0 goes on alone
if main_process:
    (Path(OUTPUT_DIR) / "training_args.bin").unlink(missing_ok=True)  # a pickle; train_config.json says it all
    processor.save_pretrained(OUTPUT_DIR)
if main_process and finished:
    print(f"saved: adapter and processor in {OUTPUT_DIR}; nothing left to train, {checkpoint.name} is the last "
          f"of the {planned} steps (--resume=false starts over)")
elif main_process:
    # Steady state leaves out the first step (DataLoader workers starting, kernels warming up).
    steady = progress.step_ends[-1] - progress.step_ends[0] if len(progress.step_ends) > 1 else float("nan")
    # Capturing a graph is a one-time cost per batch shape, with the GPU idle: left out, the rate of replayed steps.
    replayed = steady - (progress.capture_s[-1] - progress.capture_s[0]) if len(progress.step_ends) > 1 else steady
    results = dict(steps=trainer.state.global_step, steps_this_run=len(progress.step_ends),
                   train_runtime_s=result.metrics["train_runtime"],
                   samples_per_s=result.metrics["train_samples_per_second"],
                   steady_samples_per_s=(len(progress.step_ends) - 1) * BATCH_SIZE / steady,
                   replayed_samples_per_s=(len(progress.step_ends) - 1) * BATCH_SIZE / replayed,
                   micro_batch_size=micro_batch, vision_cache_s=vision_cache_s,
                   max_tokens_per_forward=answer_logits.max_tokens, split_batches=trainer.split_batches,
                   cuda_graphs=step_graphs.captures if step_graphs else 0,
                   cuda_graph_capture_s=step_graphs.capture_s if step_graphs else 0.0,
                   gradient_accumulation_steps=accumulation, activation_checkpointing=checkpointing,
                   peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if on_gpu else 0.0,
                   train_loss=result.training_loss)
    (Path(OUTPUT_DIR) / "train_results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"saved: adapter and processor in {OUTPUT_DIR} (train loss {result.training_loss:.4f}, "
          f"{result.metrics['train_runtime']:.0f} s, {results['steady_samples_per_s']:.1f} samples/s"
          + (f"; {results['replayed_samples_per_s']:.1f} leaving out the {results['cuda_graphs']} captures, "
             f"{results['cuda_graph_capture_s']:.1f} s" if results["cuda_graphs"] else "") + ")")

# --- evaluate ------------------------------------------------------------------
if main_process and val_samples and sharded:
    print(f"eval: skipped, with --distributed={DISTRIBUTED} no process holds the whole model; "
          f"score the adapter with: python infer.py --output_dir={OUTPUT_DIR}")
elif main_process and val_samples:
    moments = getattr(trainer.optimizer, "state", None)
    if isinstance(moments, dict):  # AdamW's (0.6 GB for the 2B model's adapter), gone to make room for fp32 weights
        moments.clear()
    model = modeling.generation_model(model, eval_dtype)  # the adapter is saved: merging it in changes no file
    model.config.use_cache = True
    with torch.compiler.set_stance("force_eager"):  # generation's growing shapes would only recompile
        metrics = evaluate.evaluate(model, processor, val_samples, PROMPT, image_sizing,
                                    Path(OUTPUT_DIR) / "eval", EVAL_BATCH_SIZE, EVAL_MAX_NEW_TOKENS)
    if tracking != "disabled":
        import swanlab
        swanlab.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        swanlab.log({"eval/predictions": evaluate.swanlab_images(Path(OUTPUT_DIR) / "eval")})

# --- summary -----------------------------------------------------------------
if main_process:
    if tracking != "disabled":
        import swanlab
        swanlab.finish()
    print(f"done: adapter in {OUTPUT_DIR}; next: python infer.py --output_dir={OUTPUT_DIR}")
