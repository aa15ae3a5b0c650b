"""What every benchmark row trains on: one model folder and one train.json, built once per results folder; and the
ways of generating the generation benchmarks compare.

bench/speed.py and bench/peers.py both read these, so that the tutorial recipe, train.py and the peers
measure the same work: the Qwen2-VL-2B shape with random weights (compute and memory do not depend on
the values) and samples rendered from real LaTeX_OCR formulas.
"""

import time
from pathlib import Path

import torch

from latexocr import modeling, render, tiny
from latexocr.data import write_conversations

# How bench/generation.py and bench/agreement.py generate: mode -> (precision, fp32 products in TF32, compiled:
# modeling.predict's static KV cache with the decode step as CUDA graphs). tfloat32: fp32 weights, TF32 products.
GENERATION_MODES = {"float32": ("float32", False, False), "float32_compiled": ("float32", False, True),
                    "tfloat32": ("float32", True, False), "tfloat32_compiled": ("float32", True, True),
                    "bfloat16": ("bfloat16", False, False), "bfloat16_compiled": ("bfloat16", False, True)}


def machine(on_gpu: bool) -> dict:
    """Where and when a benchmark ran, for its results: the GPU's name (or "cpu") and the date."""
    return dict(device=torch.cuda.get_device_name() if on_gpu else "cpu", date=time.strftime("%Y-%m-%d"))


def generation_modes(names: str) -> list[str]:
    """The comma-separated mode names, checked, the fp32 ones first (fp32 weights are cast to bf16 once, not back)."""
    modes = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in modes if name not in GENERATION_MODES]
    if unknown or not modes:
        raise SystemExit(f"--modes={names}: expected comma-separated names from {', '.join(GENERATION_MODES)}.")
    return sorted(modes, key=lambda name: GENERATION_MODES[name][0] == "bfloat16")


def model_folder(results_dir: Path, tiny_model: bool, tokenizer: str = "qwen2") -> Path:
    """The tiny random model (CPU smoke runs), or the full-size random Qwen2-VL-2B, built on the GPU once, with
    Qwen2-VL's real vocabulary ("qwen2": realistic answer lengths) or the small local one ("tiny")."""
    if tiny_model:
        return modeling.resolve_model(modeling.TINY_MODEL_ID)
    model_dir = results_dir / f"qwen2-vl-2b-random-{tokenizer}"  # one per tokenizer: the other's is never reused
    if not (model_dir / "config.json").is_file():
        print(f"building Qwen2-VL-2B with random weights (bf16, on the GPU) and the {tokenizer} tokenizer")
        tiny.build_model_folder(model_dir, tiny.QWEN2_VL_2B_DIMENSIONS, dtype=torch.bfloat16, device="cuda",
                                tokenizer=tokenizer)
    return model_dir


def train_json(results_dir: Path, samples: int, formulas_path: str) -> Path:
    """results_dir/train.json: `samples` formulas rendered by mathtext, the real ones from formulas_path when it
    exists (else synthetic ones). Kept once written, so that every later run reads the same samples."""
    path = results_dir / "train.json"
    if path.is_file():
        return path
    if Path(formulas_path).is_file():
        formulas = Path(formulas_path).read_text().splitlines()
    else:
        from latexocr.synth import synthetic_texts
        formulas = [text for _, text in zip(range(2 * samples), synthetic_texts(0))]
    image_dir = results_dir / "images"
    image_dir.mkdir(exist_ok=True)
    rendered = []
    for text in formulas:
        try:
            image = render.render_mathtext(text)
        except ValueError:
            continue  # about 5% of real formulas are beyond mathtext
        image_path = image_dir / f"{len(rendered)}.png"
        image.save(image_path)
        rendered.append((image_path, text))
        if len(rendered) == samples:
            break
    write_conversations(path, rendered)
    return path
