"""Shared fixtures: one tiny random Qwen2-VL per test session, and a way to run the scripts as a user does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_FORMULAS = ROOT.parent / "shared" / "data" / "latex_ocr_val_formulas.txt"


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory):
    """Every test, and every script a test starts, shares one model cache and never reaches a network."""
    os.environ["LATEXOCR_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      SWANLAB_ROOT=str(tmp_path_factory.mktemp("swanlab_home")))
    os.environ.pop("SWANLAB_API_KEY", None)


@pytest.fixture(scope="session")
def tiny_model_dir(offline_cache):
    from latexocr import modeling
    return modeling.resolve_model(modeling.TINY_MODEL_ID)


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(tiny_model_dir)


def run_script(script: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the four scripts from `cwd`, as a user would; fail with its output if it fails."""
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=900)
    if check and result.returncode != 0:
        pytest.fail(f"{script} {' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                    f"\n--- stderr\n{result.stderr[-4000:]}")
    return result


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # train.py's default


def synthetic_images(folder: Path, n: int, seed: int) -> list:
    """n synthetic formula images saved in folder, as Samples (id s<i>) with their LaTeX."""
    from latexocr.data import Sample
    from latexocr.synth import synthetic_samples
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, (image, text) in enumerate(synthetic_samples(n, seed=seed)):
        image.save(folder / f"{i}.png")
        samples.append(Sample(f"s{i}", folder / f"{i}.png", text))
    return samples


def synthetic_train_json(folder: Path, n: int, seed: int) -> Path:
    """n synthetic formula images in folder/images, listed with their LaTeX in folder/train.json."""
    from latexocr.data import write_conversations
    samples = synthetic_images(folder / "images", n, seed)
    write_conversations(folder / "train.json", [(s.image, s.text) for s in samples])
    return folder / "train.json"


def trained_briefly(folder: Path, *train_args: str) -> Path:
    """folder with the offline data steps run and an adapter trained for one step on the tiny model."""
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=20", cwd=folder)
    run_script("csv2json.py", cwd=folder)
    run_script("train.py", "--model_id=tiny-random", "--max_steps=1", "--swanlab_mode=disabled", *train_args,
               cwd=folder)
    return folder


def logged_losses(checkpoint: Path) -> tuple[list[float], list[float]]:
    """The losses and gradient norms of the steps train.py logged, from a checkpoint's trainer_state.json."""
    history = [e for e in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    return [e["loss"] for e in history], [e["grad_norm"] for e in history]


def assert_same_adapter(folder: Path, reference: Path) -> dict:
    """The adapters train.py saved in the two folders hold the same weights (to fp32 summation order); returns
    the first one's."""
    import torch
    from safetensors.torch import load_file
    weights = load_file(folder / "adapter_model.safetensors")
    expected = load_file(reference / "adapter_model.safetensors")
    assert weights.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    return weights
