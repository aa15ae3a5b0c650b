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


def synthetic_train_json(folder: Path, n: int, seed: int) -> Path:
    """n synthetic formula images in folder/images, listed with their LaTeX in folder/train.json."""
    from latexocr.data import write_conversations
    from latexocr.synth import synthetic_samples
    (folder / "images").mkdir()
    samples = []
    for i, (image, text) in enumerate(synthetic_samples(n, seed=seed)):
        image.save(folder / "images" / f"{i}.png")
        samples.append((folder / "images" / f"{i}.png", text))
    write_conversations(folder / "train.json", samples)
    return folder / "train.json"


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
