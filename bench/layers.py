"""Time of the language model's decoder layers, forward and backward as train.py's CUDA graphs run them, with the
model's own code and then with each of train.py's fused kernels added in turn, side by side in one process.

Each row keeps what the rows above it added: no attention mask (right-padded batches need none), the fused
RMSNorm, LoRA's multiply-add, the MLP's Liger kernel (latexocr/engine/kernels.py); then, with --compile=true,
torch.compile on top. A row
without LoRA at all shows what the adapters cost. Every row's output is compared with the first row's: the same
math. The layers have Qwen2-VL-2B's shape, random weights and train.py's LoRA (r=64 on the seven projections).

Reads:  nothing (the tiny model's tokenizer, built once, for the config)
Writes: nothing; prints the table
Run:    python bench/layers.py                  (a CUDA GPU; under a minute, --compile=true adds about 70 s)
        python bench/layers.py --tiny=true      (CPU, the tiny shape, no graphs: checks the rows agree)
"""

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from latexocr.config import apply_overrides  # noqa: E402

# -----------------------------------------------------------------------------
TINY = False  # the tiny model's shape on a CPU, run eagerly: a smoke run that checks every row's loss
LAYERS = 4  # decoder layers timed (the 2B model has 28; the table scales to them)
BATCH_SIZE = 16  # samples per forward pass (train.py's micro-batch on a large GPU)
LENGTH = 256  # tokens per sample (formula samples: about 190 to 300 with padding)
REPEATS = 20  # timed forward-and-backward passes per row (the median is reported)
COMPILE = False  # add a row with torch.compile on each layer (about 70 s of compiling)
# -----------------------------------------------------------------------------
apply_overrides(globals())

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.helpers import disable_input_dtype_casting  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from latexocr import modeling, tiny  # noqa: E402
from latexocr.engine import kernels  # noqa: E402

ROWS = ["the model's own code, with the padding mask", "no attention mask", "+ fused RMSNorm",
        "+ LoRA multiply-add", "+ Liger SwiGLU (GPU only)"] + (["+ torch.compile"] if COMPILE else [])
on_gpu = torch.cuda.is_available() and not TINY
device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
if not on_gpu and not TINY:
    raise SystemExit("No CUDA GPU: run on a GPU, or use --tiny=true for a CPU smoke run of this script.")
if TINY:
    LAYERS, BATCH_SIZE, LENGTH, REPEATS = 2, 2, 24, 2


def build(row: int, lora: bool = True):
    """The layers (a whole model of LAYERS layers, a small vocabulary and vision tower) as `row` of ROWS runs them."""
    dims = dict(tiny.TINY_DIMENSIONS if TINY else tiny.QWEN2_VL_2B_DIMENSIONS, num_hidden_layers=LAYERS,
                vision_depth=1, vocab_size=tiny.TOKENIZER_VOCAB_SIZE)
    model = tiny.build_model(tiny.build_config(tokenizer, dims), dtype=dtype, device=device)
    if lora:
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():  # B starts at zero, which would hide a wrong adapter output from the output check
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
        kernels.fuse(model, norms=row >= 2, lora=row >= 3, mlp=row >= 4)
    language_model = (model.get_base_model() if lora else model).model.language_model
    if row >= 5:
        for layer in language_model.layers:
            layer.compile(dynamic=True)
    return model.train(), language_model


def measure(row: int, lora: bool = True) -> tuple[float, torch.Tensor]:
    """Median ms per layer for a forward and backward pass, and the output of the first pass."""
    torch.manual_seed(0)
    model, language_model = build(row, lora)
    hidden_size = language_model.config.hidden_size
    generator = torch.Generator(device).manual_seed(1)
    embeds = torch.randn(BATCH_SIZE, LENGTH, hidden_size, device=device, dtype=dtype, generator=generator,
                         requires_grad=not lora)  # without LoRA the backward still runs through the layers
    positions = torch.arange(LENGTH, device=device).expand(3, BATCH_SIZE, LENGTH)
    mask = torch.ones(LENGTH, LENGTH, dtype=torch.bool, device=device).tril().expand(BATCH_SIZE, 1, LENGTH, LENGTH)
    attention = {"attention_mask": {"full_attention": mask}} if row == 0 else {}

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu, cache_enabled=False):
            hidden = language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False,
                                    **attention).last_hidden_state
            loss = hidden.float().pow(2).mean()
        loss.backward()
        return hidden.detach()

    with disable_input_dtype_casting(model):
        torch.manual_seed(2)
        first = step().float()  # before any graph: the output every row must agree on (dropout seeded alike)
        run = step
        if on_gpu:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # warm-up outside the graph (cuBLAS workspaces, Triton and compiled kernels)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
        times = []
        for _ in range(REPEATS):
            if on_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / LAYERS, first


tokenizer = AutoTokenizer.from_pretrained(modeling.resolve_model(modeling.TINY_MODEL_ID))
print(f"{'GPU ' + torch.cuda.get_device_name() if on_gpu else 'CPU'}, torch {torch.__version__}; {LAYERS} layers of "
      f"{'the tiny' if TINY else 'Qwen2-VL-2B'}'s shape, {BATCH_SIZE} x {LENGTH} tokens, "
      f"{'captured as a CUDA graph' if on_gpu else 'eager'}, median of {REPEATS}")
print("| layers | ms per layer, forward + backward | x 28 layers, ms | output as the first row's |")
print("|---|---|---|---|")
reference = None
for row, name in enumerate(ROWS):
    ms, output = measure(row)
    reference = output if reference is None else reference
    # mean difference over mean size; bf16 rounds each row's kernels differently, fp32 on a CPU barely
    difference = ((output - reference).abs().mean() / reference.abs().mean()).item()
    if row >= 5:
        same = f"{difference:.1e} apart (compiled code draws its own dropout)"
    else:
        same = "yes" if difference <= (1e-2 if on_gpu else 1e-5) else f"NO: {difference:.1e} apart"
    print(f"| {name} | {ms:.3f} | {28 * ms:.1f} | {same} |", flush=True)
ms, _ = measure(0, lora=False)
print(f"| no LoRA, the model's own code | {ms:.3f} | {28 * ms:.1f} | (another model) |")
