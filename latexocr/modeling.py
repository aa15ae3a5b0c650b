"""Finding, loading and running the model: the same code for train.py and infer.py."""

import concurrent.futures
import contextlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from latexocr import chat, families

TINY_MODEL_ID = "tiny-random"
# Tiny random models, one per family, built locally (tiny.py): model id -> config.json's model_type.
TINY_MODELS = {TINY_MODEL_ID: "qwen2_vl", "tiny-random-qwen2.5-vl": "qwen2_5_vl", "tiny-random-qwen3-vl": "qwen3_vl"}


def cache_dir() -> Path:
    root = os.environ.get("LATEXOCR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latexocr"
    return Path(root)


def resolve_model(model_id: str) -> Path:
    """A local folder for `model_id`: a tiny random model (built once), a local path, or a ModelScope download."""
    if model_id in TINY_MODELS:
        family = families.FAMILIES[TINY_MODELS[model_id]]
        folder = cache_dir() / f"tiny-random-{family.name.lower()}"
        if not (folder / "config.json").is_file():
            from latexocr import tiny
            print(f"building the tiny random {family.name} in {folder} (once; a few seconds)")
            tiny.build_model_folder(folder, model_type=family.model_type)
        return folder
    local = Path(model_id).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise SystemExit(f"model_id {model_id}: the folder has no config.json, so it is not a model folder. "
                             "Point --model_id at the folder that holds config.json and the *.safetensors files.")
        return local
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise SystemExit(f"model_id {model_id}: no such folder, and not a ModelScope id like "
                         f"'Qwen/Qwen2-VL-2B-Instruct'. To run offline use --model_id={' or '.join(TINY_MODELS)}.")
    from modelscope import snapshot_download
    try:
        return Path(snapshot_download(model_id))
    except Exception as e:  # network, unknown id, permissions: all end the run the same way
        raise SystemExit(f"could not download {model_id} from ModelScope ({type(e).__name__}: {e}).\n"
                         "Check the id and the network; offline, download it elsewhere and pass "
                         "--model_id=/path/to/that/folder, or try the pipeline with --model_id=tiny-random.") from None


def fast_attention():
    """Attention by the Flash or memory-efficient kernels, not cuDNN's: cuDNN builds a graph for every new sequence
    length, 2 to 3 ms of CPU time per call, and the lengths change at every batch and every generated token."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """The device to run on ("auto": CUDA if present); asking for CUDA where there is none says what to pass."""
    if device == "auto":
        return default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={device}: no CUDA GPU is visible here (torch.cuda.is_available() is False). "
                         "Pass --device=cpu, or --device=auto to use a GPU only where there is one.")
    return device


def load_processor(model_dir: Path):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(model_dir)


def load_base_model(model_dir: Path, device: str, place: bool = True, processor=None,
                    dtype: torch.dtype | str | None = None):
    """The model in bf16 for a GPU (fp32 for a CPU), or in `dtype` ("auto": as saved), and its processor (loaded
    unless given). No remote code is ever run.

    place=False leaves the weights on the CPU for a Trainer to move (to each process's own GPU). Returns
    (model, processor), or the model alone when the processor was given.
    """
    from transformers import AutoModelForImageTextToText
    if not list(Path(model_dir).glob("*.safetensors")):
        raise SystemExit(f"{model_dir} has no *.safetensors weights. Pickled weights (.bin, .pt) are never loaded: "
                         "they can run code. Convert them to safetensors, or download a safetensors release.")
    families.detect(model_dir)  # a model of another kind stops here, with the kinds that work
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    model = model.to(device) if place else model
    return model if processor is not None else (model, load_processor(model_dir))


@contextlib.contextmanager
def peft_quietly():
    """peft 0.21 wraps a model reading transformers' deprecated is_gradient_checkpointing: not our warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapter(model, adapter_dir: Path, model_id: str):
    """The base model with train.py's LoRA adapter; an adapter of another base model ends the run with a message."""
    from peft import PeftModel
    try:
        with peft_quietly():
            return PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError) as e:  # shape mismatches: the adapter belongs to another base model
        trained_on = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise SystemExit(f"the adapter in {adapter_dir} does not fit {model_id}: it was trained on {trained_on}. "
                         f"Pass that base model as --model_id ({str(e).splitlines()[0][:200]}).") from None


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def generation_dtype(precision: str, device: str = "cpu") -> torch.dtype:
    """The weights' dtype for generating: float32, bfloat16, or auto = bfloat16 on a CUDA GPU and float32 elsewhere.
    On an H200 bf16 made 89.5 images/s against fp32's 19.6 (batches of 64, bench/generation.py), and on a model that
    reads it changed 1 of 100 predictions, at batch 1 as at 64 (docs/speed.md); a CPU computes bf16 no faster."""
    if precision == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if precision not in PRECISIONS:
        raise SystemExit(f"precision {precision}: expected auto, {' or '.join(PRECISIONS)}.")
    return PRECISIONS[precision]


@contextlib.contextmanager
def full_precision_float32():
    """fp32 matrix products and convolutions in full precision, not TF32's 10-bit mantissa (train.py trains with it)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def generation_model(model, dtype: torch.dtype):
    """The model as predict() should run it: in `dtype`, and with a LoRA adapter merged into the weights it adapts
    (W + alpha / r * B @ A once, instead of two more matrix products per adapted layer at every generated token).

    float32 gives an image the same prediction at any batch size. In bf16 a batch of another size runs other kernels,
    which round differently, and where two tokens score almost alike the greedy choice can flip."""
    if dtype == torch.float32:
        model = model.to(dtype)  # a bf16 base in fp32 before merging, so that the sum W + B @ A is not rounded
    if hasattr(model, "merge_and_unload"):
        # B @ A in the adapter's own fp32, and the sum rounded once to the base's dtype; with TF32 off, as train.py
        # trains with it on, and infer.py's merge must give the same W
        with full_precision_float32():
            model = model.merge_and_unload()
    model.config.use_cache = True  # training may have turned it off (activation checkpointing)
    return model.to(dtype)


# --- generation with a static KV cache, its decode step as CUDA graphs ---------
# transformers' generate with cache_implementation="static" and a CompileConfig runs the prompt once, eagerly (the
# prefill), and compiles the step that decodes one token for every row (torch.compile, mode reduce-overhead: CUDA
# graphs). That step's shapes are the batch's rows and the cache's length, not the prompt's (one token and its
# positions per row, and a padding mask as long as the cache), so prompts need no padding to a bucket: batches of
# other prompt lengths in one bucket compile once (tests/test_generation.py). Every batch gets the same rows, and
# the cache a length from buckets of prompt length (static_cache_length). Each new shape compiles again: the first
# call took 24 s (bf16) to 33 s (fp32) for Qwen2-VL-2B at batch 64 on an H200. There, with 64 new tokens per image,
# eager bf16 made 41.1 images/s and compiled bf16 113.4; fp32 30.6 and 32.4 (its prompt and vision passes in full
# fp32 take most of its time, probably).
# Buckets of 128 tokens: prompts of up to 640 tokens (Qwen2-VL's with 512 image tokens are about 540) fall in 5, so
# at most 5 shapes, within torch.compile's 8 recompiles of one function; the cost is a cache up to 127 tokens longer
# than needed, masked entries the decode step's attention reads.
CACHE_LENGTH_MULTIPLE = 128
# Images from which compiling pays back its first call. On the H200 (2026-12-01, batches of 64, 64 new tokens) eager
# bf16 made 30.7 images/s, compiled 89.5 after a first call of 36.5 s: even at 1,705 images, with one cache length;
# each further length compiles again.
COMPILE_PAYS_FROM = 2000


def compiles_generation(setting: str, device: str, dtype: torch.dtype, images: int) -> bool:
    """Whether a COMPILE_GENERATION setting (auto | true | false) means the static cache and CUDA graphs on `device`
    for weights of `dtype`, predicting `images` images. auto: on a CUDA GPU, in bf16 (in fp32 compiling did not pay:
    30.6 -> 32.4 images/s above), and for COMPILE_PAYS_FROM images or more: fewer finish sooner eagerly."""
    if setting == "auto":
        return device.startswith("cuda") and dtype == torch.bfloat16 and images >= COMPILE_PAYS_FROM
    return setting == "true"


def static_cache_length(prompt_length: int, max_new_tokens: int) -> int:
    """The static KV cache's length, in tokens, for a batch whose (left-padded) prompts are prompt_length long."""
    return -(-prompt_length // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE + max_new_tokens


def decode_shapes(prompt_lengths: list[int], rows: int, max_new_tokens: int) -> list[tuple[int, int]]:
    """The (rows, cache length) shapes the decode step is compiled for, in order, over batches with these prompt
    lengths: transformers keeps the longest static cache a model has had and reuses it for shorter prompts
    (GenerationMixin._prepare_static_cache), so a batch compiles only when it needs a longer cache than any before."""
    shapes, longest = [], 0
    for length in prompt_lengths:
        longest = max(longest, static_cache_length(length, max_new_tokens))
        if (rows, longest) not in shapes:
            shapes.append((rows, longest))
    return shapes


def decode_compile_config(device: torch.device):
    """How transformers compiles the decode step: into CUDA graphs on a GPU, of static shapes (dynamic=False: a
    symbolic length would not make one graph). None off a GPU, where transformers runs the static cache eagerly."""
    from transformers import CompileConfig
    return CompileConfig(mode="reduce-overhead", dynamic=False) if device.type == "cuda" else None


def encoded_batches(processor, images: list, prompt: str, image_sizing: dict, batch_size: int, rows: int):
    """(images in the batch, its encoded prompts) for each batch of `images`, each batch padded to `rows` with
    copies of its last image. The next batch is opened, sized and encoded in a thread while the caller generates
    the current one (0.2 to 0.3 s of CPU work for 64 formula images here, a third of a bf16 batch's time on an
    H200); an image that cannot be read raises its error here, in the caller, when its batch's turn comes."""
    def encode(start: int):
        batch = [chat.load_image(x, image_sizing) for x in images[start:start + batch_size]]
        size = len(batch)
        return size, chat.encode_prompts(processor, batch + [batch[-1]] * (rows - size), prompt)

    starts = range(0, len(images), batch_size)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        upcoming = pool.submit(encode, starts[0]) if starts else None
        for start in starts:
            current = upcoming.result()
            upcoming = pool.submit(encode, start + batch_size) if start + batch_size < len(images) else None
            yield current


@torch.inference_mode()
@fast_attention()  # scoped to generation: a benchmark runs the tutorial's own code in the same process
def predict(model, processor, images: list, prompt: str, image_sizing: dict, batch_size: int = 16,
            max_new_tokens: int = 256, show_progress: bool = True, compile_generation: bool = False,
            tf32: bool = False) -> list[str]:
    """Greedy LaTeX for each image (path or PIL image), batched with left padding, stopping at <|im_end|> (the end of
    a chat turn, as trained) or at <|endoftext|> (the end of a document, which a base model may emit instead).

    compile_generation: a static KV cache (static_cache_length) and the decode step compiled into CUDA graphs on a
    GPU (decode_compile_config; on a CPU the same static cache, eagerly); every batch then has the same rows, the
    last one padded with copies of its last image, whose predictions are dropped. tf32: fp32 products in TF32
    (faster on a GPU, and a prediction may change); off, they run in full fp32, as training's evaluation must.
    On a GPU in bf16 the vision tower attends over all of a batch's images in one call per layer
    (kernels.vision_attention), not once per image and layer."""
    from latexocr.engine import kernels  # the engine imports this module
    model.eval()
    tokenizer = processor.tokenizer
    end_id = [tokenizer.convert_tokens_to_ids(token) for token in chat.END_TOKENS]
    device = next(model.parameters()).device
    rows = min(batch_size, len(images)) if compile_generation else 0
    generated = []
    progress = tqdm(total=-(-len(images) // batch_size), desc="predicting", unit="batch", disable=not show_progress)
    with contextlib.nullcontext() if tf32 else full_precision_float32(), kernels.fused_vision_attention(model), \
            progress:
        for size, inputs in encoded_batches(processor, images, prompt, image_sizing, batch_size, rows):
            inputs = inputs.to(device)
            static = dict(cache_implementation="static", compile_config=decode_compile_config(device),
                          max_cache_len=static_cache_length(inputs["input_ids"].shape[1], max_new_tokens)
                          ) if compile_generation else {}
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_id,
                                    pad_token_id=tokenizer.pad_token_id, **static)
            generated += output[:size, inputs["input_ids"].shape[1]:].cpu()  # a row per image
            progress.update()
    # decoded once the encoding thread is done: one tokenizer used by two threads at once can raise "Already borrowed"
    return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
